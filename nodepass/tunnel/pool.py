"""The pools of pre-opened data connections: the client keeps them filled, the
server hands them out.  Each connection is used once and never reused.

Client rule (docs/how-it-works.md), applied every round of ``interval`` seconds:

- a connection taken is replaced at once, so the pool does not wait for a round;
- the server's DEMAND(n) (n users waiting) gets at least n connections in flight;
- capacity doubles (up to the maximum) when more than 80 % of it was taken in
  the round, and shrinks by an eighth (down to the minimum) when less than 20 %
  was; surplus idle connections are closed;
- the interval shrinks by 100 ms (down to the minimum) when fewer than 20 % of
  the capacity sit idle after the round, and grows by 100 ms (up to the maximum)
  when more than 80 % do — as NodePass does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.timers import cancelled

INTERVAL_STEP = 0.1
# Data connections being opened at once; more wait their turn.  Each is a TCP (and
# under TLS a TLS) handshake: a thousand at once finish no sooner on two cores, keep
# the first users waiting for the last, and leave the heap fragmented for good.
MAX_DIALING = 32
POOL_WAIT_TIMEOUT = 5.0  # how long a user waits for a pooled connection


class Closable(Protocol):
    def close(self) -> None: ...


class ClientPool:
    """Idle authenticated data connections kept open ahead of demand."""

    log = logs.logger("nodepass")

    def __init__(
        self,
        clock: Any,
        dial: Callable[[], Deferred[Any]],
        min_capacity: int,
        max_capacity: int,
        min_interval: float,
        max_interval: float,
    ) -> None:
        self._clock = clock
        self._dial = dial
        self.asked_min_capacity = min_capacity  # min=, before a server's max bounds it
        self.min_capacity = min(min_capacity, max_capacity)
        self.max_capacity = max_capacity
        self.min_interval, self.max_interval = min_interval, max_interval
        self.capacity = self.min_capacity
        self.interval = min_interval
        # Idle connections, and (in forward mode, where this end launches them) the
        # users waiting for one.
        self.ready = IdlePool(clock, max_capacity, POOL_WAIT_TIMEOUT, self.demand)
        self.opening = 0  # being dialed
        self.queued = 0  # wanted, waiting for a dial (MAX_DIALING)
        self.taken_in_round = 0
        self.failed_in_round = 0
        self.last_failure = ""
        self.running = False
        self._round_call: Any = None
        self._throttle = logs.Throttle(clock, 30.0)

    @property
    def idle(self) -> deque[Closable]:
        return self.ready.idle

    @property
    def wait_timeout(self) -> float:
        return self.ready.wait_timeout

    def start(self, max_capacity: int | None = None) -> None:
        """Begin filling; ``max_capacity``, the server's bound, replaces this end's own
        (as NodePass does: the server decides how many connections it holds)."""
        if max_capacity is not None:
            self.max_capacity = max(1, max_capacity)
            self.min_capacity = min(self.asked_min_capacity, self.max_capacity)
            self.capacity = min(max(self.capacity, self.min_capacity), self.max_capacity)
            self.ready.limit = self.max_capacity
        self.running = True
        self.refill()
        self._schedule()

    def stop(self) -> None:
        self.running = False
        self.queued = 0
        self._round_call = cancelled(self._round_call)
        self.ready.flush()

    def refill(self) -> None:
        self._want(self.capacity - len(self.idle) - self.opening - self.queued)

    def demand(self, waiting: int) -> None:
        """The server has ``waiting`` users and no idle connection for them."""
        self._want(min(waiting, self.max_capacity) - self.opening - self.queued)

    def _want(self, count: int) -> None:
        self.queued += max(0, count)
        while self.queued > 0 and self.opening < MAX_DIALING:
            self.queued -= 1
            self._open()

    def taken(self, conn: Closable) -> None:
        """``conn`` was launched: it leaves the pool for good and is replaced."""
        self.discard(conn)
        self.taken_in_round += 1
        if self.running:
            self.refill()

    def discard(self, conn: Closable) -> None:
        """``conn`` closed or went stale."""
        self.ready.discard(conn)

    # In forward mode this end launches its own connections, as the server does in
    # reverse mode: the same take/cancel/give_back, and taking counts as ``taken``.

    def take(self, on_ready: Callable[[Any], None],
             on_unavailable: Callable[[str], None]) -> Any:
        return self.ready.take(self._handing_out(on_ready), on_unavailable)

    def take_udp(self, on_ready: Callable[[Any], None],
                 on_unavailable: Callable[[str], None]) -> Any:
        return self.ready.take_udp(self._handing_out(on_ready), on_unavailable)

    def _handing_out(self, on_ready: Callable[[Any], None]) -> Callable[[Closable], None]:
        def hand_out(conn: Closable) -> None:
            self.taken(conn)
            on_ready(conn)

        return hand_out

    def cancel(self, waiter: Any) -> None:
        self.ready.cancel(waiter)

    def give_back(self, conn: Closable) -> None:
        self.ready.give_back(conn)

    def _open(self) -> None:
        self.opening += 1
        self._dial().addCallbacks(self._opened, self._failed)

    def _opened(self, conn: Closable) -> None:
        self.opening -= 1
        if not self.running or not self.ready.add(conn):
            conn.close()
        self._want(0)

    def _failed(self, reason: Failure) -> None:
        self.opening -= 1
        self.failed_in_round += 1
        self.last_failure = reason.getErrorMessage()
        if self.running:  # (the next round retries what failed; the queue goes on)
            self._want(0)

    def _schedule(self) -> None:
        self._round_call = self._clock.callLater(self.interval, self._round)

    def _round(self) -> None:
        self._round_call = None
        self.adapt()
        if self.failed_in_round and (held := self._throttle.allow()) is not None:
            self.log.warn("pool: {n} data connections failed to open ({reason})",
                          n=self.failed_in_round + held, reason=self.last_failure)
        self.taken_in_round = self.failed_in_round = 0
        while len(self.idle) > self.capacity:
            self.idle.popleft().close()
        self.refill()
        self._schedule()

    def adapt(self) -> None:
        """Move capacity and interval within their bounds from the last round."""
        used = self.taken_in_round
        if used > 0.8 * self.capacity:
            self.capacity = min(self.max_capacity, self.capacity * 2)
        elif used < 0.2 * self.capacity:
            self.capacity = max(self.min_capacity, self.capacity - max(1, self.capacity // 8))
        idle_share = len(self.idle) / self.capacity
        if idle_share < 0.2:
            self.interval = max(self.min_interval, self.interval - INTERVAL_STEP)
        elif idle_share > 0.8:
            self.interval = min(self.max_interval, self.interval + INTERVAL_STEP)


class _Waiter:
    def __init__(self, on_ready: Callable[[Any], None],
                 on_unavailable: Callable[[str], None]) -> None:
        self.on_ready = on_ready
        self.on_unavailable = on_unavailable
        self.timer: Any = None


class IdlePool:
    """Idle data connections, handed out first come, first served — TCP users before
    UDP sources, so that UDP cannot take the connections TCP users wait for.

    A user who arrives when the pool is empty waits up to ``wait_timeout``
    seconds; the client is asked for more connections meanwhile.
    """

    def __init__(self, clock: Any, limit: int, wait_timeout: float,
                 request_more: Callable[[int], None]) -> None:
        self._clock = clock
        self.limit = limit
        self.wait_timeout = wait_timeout
        self._request_more = request_more
        self.idle: deque[Closable] = deque()
        self.waiters: deque[_Waiter] = deque()  # TCP users
        self.udp_waiters: deque[_Waiter] = deque()  # UDP sources, served after them

    def add(self, conn: Closable) -> bool:
        """Offer a newly authenticated connection; False when the pool is full."""
        queue = self.waiters or self.udp_waiters
        if queue:
            waiter = queue.popleft()
            waiter.timer.cancel()
            waiter.on_ready(conn)
            return True
        if len(self.idle) >= self.limit:
            return False
        self.idle.append(conn)
        return True

    def discard(self, conn: Closable) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def take(self, on_ready: Callable[[Any], None],
             on_unavailable: Callable[[str], None]) -> _Waiter | None:
        """Call ``on_ready(conn)`` now or when one arrives, else ``on_unavailable(why)``."""
        return self._take(self.waiters, on_ready, on_unavailable)

    def take_udp(self, on_ready: Callable[[Any], None],
                 on_unavailable: Callable[[str], None]) -> _Waiter | None:
        """As :meth:`take`, for a UDP source: never ahead of a waiting TCP user."""
        return self._take(self.udp_waiters, on_ready, on_unavailable)

    def _take(self, queue: deque[_Waiter], on_ready: Callable[[Any], None],
              on_unavailable: Callable[[str], None]) -> _Waiter | None:
        if self.idle and not self.waiters:
            on_ready(self.idle.popleft())
            return None
        waiter = _Waiter(on_ready, on_unavailable)
        waiter.timer = self._clock.callLater(self.wait_timeout, self._expire, queue, waiter)
        queue.append(waiter)
        self._request_more(len(self.waiters) + len(self.udp_waiters))
        return waiter

    def give_back(self, conn: Closable) -> None:
        """A connection taken but never launched (its user left first)."""
        if not self.add(conn):
            conn.close()

    def cancel(self, waiter: _Waiter) -> None:
        for queue in (self.waiters, self.udp_waiters):
            if waiter in queue:
                queue.remove(waiter)
                waiter.timer.cancel()

    def _expire(self, queue: deque[_Waiter], waiter: _Waiter) -> None:
        queue.remove(waiter)
        waiter.on_unavailable(f"no pooled connection within {self.wait_timeout:g}s")

    def flush(self) -> None:
        """The session ended: close idle connections and turn waiters away."""
        while self.idle:
            self.idle.popleft().close()
        for queue in (self.waiters, self.udp_waiters):
            while queue:
                waiter = queue.popleft()
                waiter.timer.cancel()
                waiter.on_unavailable("the tunnel session ended")
