"""The per-instance traffic controls: rate (token buckets), slots, idle timeouts,
and the valve through which a relay pauses a connection for more than one reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from nodepass.timers import cancelled

BURST_SECONDS = 0.05  # a bucket holds this much of its rate (at least MIN_BURST bytes)
MIN_BURST = 64 * 1024


def mbit_to_bytes(mbit_per_s: int) -> float:
    return mbit_per_s * 1_000_000 / 8


class TokenBucket:
    """``rate`` bytes per second, refilled lazily from the reactor's clock.

    TCP takes what it has already read and may run into debt; the debt is the
    time its connection stays paused.  UDP only passes a datagram the bucket can
    pay for now, otherwise the datagram is dropped.
    """

    def __init__(self, clock: Any, rate: float) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = max(MIN_BURST, rate * BURST_SECONDS)
        self.tokens = self.burst
        self.stamp = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: int) -> float:
        """Pay for ``n`` bytes already read; the seconds to wait before reading more."""
        self._refill()
        self.tokens -= n
        return self.delay()

    def delay(self) -> float:
        """The seconds until the debt is paid (0 when there is none)."""
        self._refill()
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def try_take(self, n: int) -> bool:
        """Pay for ``n`` bytes if the bucket holds them now."""
        self._refill()
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class RateLimit:
    """One bucket per direction: ``inbound`` for bytes read from users and targets
    (towards the tunnel), ``outbound`` for bytes read from the tunnel."""

    def __init__(self, clock: Any, mbit_per_s: int) -> None:
        self.inbound = TokenBucket(clock, mbit_to_bytes(mbit_per_s))
        self.outbound = TokenBucket(clock, mbit_to_bytes(mbit_per_s))


@implementer(IPushProducer)
class Valve:
    """The producer a relay registers for one connection: its reading stops while
    any reason holds it (the consumer's full buffer, the rate limit, not started
    yet) and resumes when none is left."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = {"start"}

    def hold(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, called by the other connection's transport
    def pauseProducing(self) -> None:
        self.hold("consumer")

    def resumeProducing(self) -> None:
        self.release("consumer")

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class Pacer:
    """Holds a valve while a bucket is in debt: the relay's side of ``rate=``."""

    def __init__(self, clock: Any, bucket: TokenBucket, valve: Valve) -> None:
        self.clock = clock
        self.bucket = bucket
        self.valve = valve
        self.timer: Any = None

    def paid(self, n: int) -> None:
        wait = self.bucket.take(n)
        if wait > 0 and self.timer is None:
            self.valve.hold("rate")
            self.timer = self.clock.callLater(wait, self._check)

    def _check(self) -> None:
        wait = self.bucket.delay()
        if wait > 0:
            self.timer = self.clock.callLater(wait, self._check)
            return
        self.timer = None
        self.valve.release("rate")

    def cancel(self) -> None:
        self.timer = cancelled(self.timer)


class IdleWatch:
    """Calls ``on_idle`` once ``timeout`` seconds pass without :meth:`touch` (``read=``)."""

    def __init__(self, clock: Any, timeout: float, on_idle: Callable[[], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self.on_idle = on_idle
        self.last = clock.seconds()
        self.timer: Any = clock.callLater(timeout, self._check)

    def touch(self, _n: int = 0) -> None:
        # Cheaper than resetting the timer on every read: the timer checks when it fires.
        self.last = self.clock.seconds()

    def _check(self) -> None:
        idle = self.clock.seconds() - self.last
        if idle < self.timeout:
            self.timer = self.clock.callLater(self.timeout - idle, self._check)
            return
        self.timer = None
        self.on_idle()

    def cancel(self) -> None:
        self.timer = cancelled(self.timer)


def slot_limit(slot: int, semaphore_limit: int) -> tuple[int, str]:
    """The concurrency bound in force and its name: the smaller of ``slot=`` (0 =
    unlimited) and SEMAPHORE_LIMIT."""
    if slot and slot <= semaphore_limit:
        return slot, f"slot limit ({slot})"
    return semaphore_limit, f"SEMAPHORE_LIMIT ({semaphore_limit})"
