"""What one instance carries right now, and the controls on it.

Both ends of a tunnel (and the single-end forwarder) keep their live relays, UDP
sessions and counters here.  Every new connection or UDP session first
:meth:`~Flows.reserve`\\ s a :class:`Slot` (``slot=`` and SEMAPHORE_LIMIT bound how
many are held at once) and gives it back when it ends, however it ends.
:meth:`Flows.join` starts the relay for a connection pair with ``rate=``,
``read=`` and ``block=`` applied, on the splice(2) fast path when it can.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from nodepass import logs
from nodepass.stats import Traffic
from nodepass.tunables import Tunables
from nodepass.tunnel import splice
from nodepass.tunnel.channel import peer_of
from nodepass.tunnel.firstbytes import FirstBytes
from nodepass.tunnel.limits import IdleWatch, RateLimit, slot_limit
from nodepass.tunnel.relay import Relay, RelayProtocol, RelaySet
from nodepass.tunnel.udp import UdpCounters, UdpSession
from nodepass.url import DEFAULT_SLOT, ClientConfig, ServerConfig


class Slot:
    """One connection or UDP session counted against the limits (each set in
    ``held``), from admission until it ends; :meth:`release` may be called any number
    of times."""

    __slots__ = ("_held",)

    def __init__(self, *held: set[Slot]) -> None:
        self._held = held
        for counted in held:
            counted.add(self)

    def release(self) -> None:
        for counted in self._held:
            counted.discard(self)


def udp_session_limit(tunables: Tunables, limit: int, notcp: int = 0) -> int:
    """How many UDP sessions may be held at once: UDP_MAX_SESSIONS, never more than
    half the slot limit in force — the rest is kept for TCP users — unless TCP is off."""
    share = limit if notcp else max(1, limit // 2)
    return min(tunables.udp_max_sessions or share, share)


class FarSide(Protocol):
    """What a UDP session sends its peer's datagrams through (a launched tunnel
    connection, or in single-end mode the target's socket)."""

    def send_datagram(self, payload: bytes) -> None: ...

    def carry_udp(self, session: UdpSession) -> None: ...

    def close(self) -> None: ...


class Flows:
    log = logs.logger("nodepass")

    def __init__(self, clock: Any, tunables: Tunables, slot: int = DEFAULT_SLOT,
                 rate: int = 0, read: float = 0.0, block: str = "", notcp: int = 0) -> None:
        self.clock = clock
        self.tunables = tunables
        self.traffic = Traffic()
        self.relays = RelaySet()
        self.udp_sessions: set[UdpSession] = set()
        self.udp_drops = UdpCounters()
        self.slots: set[Slot] = set()
        self.udp_slots: set[Slot] = set()
        self.refused = 0
        self.limit, self.limit_name = slot_limit(slot, tunables.semaphore_limit)
        self.udp_limit = udp_session_limit(tunables, self.limit, notcp)
        if slot != DEFAULT_SLOT and (slot == 0 or slot > tunables.semaphore_limit):
            self.log.warn("slot={slot} is above SEMAPHORE_LIMIT ({limit}): at most {limit} "
                          "at once (raise SEMAPHORE_LIMIT to allow more)", slot=slot,
                          limit=tunables.semaphore_limit)
        self.rate = RateLimit(clock, rate) if rate else None
        self.read_timeout = read
        self.udp_timeout = read or tunables.udp_read_timeout
        self.block = block
        self._throttle = logs.Throttle(clock)

    @classmethod
    def for_config(cls, clock: Any, tunables: Tunables,
                   config: ServerConfig | ClientConfig) -> Flows:
        """An instance's flows with its ``slot=``, ``rate=``, ``read=`` and ``block=``."""
        return cls(clock, tunables, config.slot, config.rate, config.read, config.block,
                   config.notcp)

    def in_use(self) -> int:
        """What the slot limit counts: relays, connections on their way, UDP sessions."""
        return len(self.slots)

    def reserve(self, what: str) -> Slot | None:
        """A slot for one more connection or session, or None (then it is counted as
        refused and logged)."""
        if len(self.slots) < self.limit:
            return Slot(self.slots)
        self.refuse(what, f"{self.limit_name} reached")
        return None

    def reserve_udp(self, what: str) -> Slot | None:
        """A slot for one more UDP session, or None: UDP sessions have their own limit
        within the slot limit, so a UDP flood cannot take every slot from TCP users."""
        if len(self.udp_slots) >= self.udp_limit:
            self.refuse(what, f"the UDP session limit ({self.udp_limit}) is reached")
            return None
        if len(self.slots) >= self.limit:
            self.refuse(what, f"{self.limit_name} reached")
            return None
        return Slot(self.slots, self.udp_slots)

    def refuse(self, what: str, why: str) -> None:
        self.refused += 1
        self.warn(f"refused {what}: {why}")

    def warn(self, text: str) -> None:
        self._throttle.warn(self.log, "{text}", text=text)

    # -- TCP -------------------------------------------------------------

    def join(self, local: RelayProtocol, conn: Any, slot: Slot, to_conn: bytes = b"",
             to_local: bytes = b"", user: bool = False) -> None:
        """Relay ``local`` (a user or target connection) with ``conn`` (a tunnel
        connection, or the target in single-end mode) for as long as ``slot`` is held.
        ``to_conn``/``to_local`` are protocol bytes written first (LAUNCH, a PROXY
        header); what ``conn`` read before (see ``take_held``) is delivered first.
        ``user``: ``local`` is a user, whose first bytes ``block=`` judges."""
        screened = user and bool(self.block)
        conn_pending, conn_eof = conn.take_held()
        count_in, count_out = self.traffic.add_tcp_in, self.traffic.add_tcp_out
        watch: IdleWatch | None = None
        if self.read_timeout:
            watch = IdleWatch(self.clock, self.read_timeout, lambda: self._idle(relay))
            count_in, count_out = _touching(count_in, watch), _touching(count_out, watch)

        def ended(finished: Any) -> None:
            if watch is not None:
                watch.cancel()
            slot.release()
            self.relays.discard(finished)

        relay: Any
        if not screened and self._may_splice(local, conn):
            head = to_local + conn_pending
            sent_conn = splice.send_now(conn.transport, to_conn) if to_conn else 0
            sent_local = splice.send_now(local.transport, head) if head else 0
            count_out(len(conn_pending))
            if sent_conn == len(to_conn) and sent_local == len(head):
                relay = splice.SpliceRelay(self.clock, local, conn, count_in, count_out, ended)
                self.relays.add(relay)
                relay.start(b_eof=conn_eof)
                return
            # What did not go at once goes through Twisted, and the ordinary relay follows.
            to_conn, to_local, conn_pending = to_conn[sent_conn:], head[sent_local:], b""
        if to_conn:
            conn.transport.write(to_conn)
        if to_local:
            local.transport.write(to_local)
        rate = self.rate
        screen, on_blocked = None, None
        if screened:
            screen = FirstBytes(self.block)
            on_blocked = partial(self._blocked, peer_of(local.transport))
        relay = Relay(local, conn, count_in, count_out, ended,
                      rate.inbound if rate else None, rate.outbound if rate else None,
                      self.clock, screen, on_blocked)
        self.relays.add(relay)
        relay.start(b_pending=conn_pending, b_eof=conn_eof)

    def _may_splice(self, local: RelayProtocol, conn: Any) -> bool:
        """Both plain TCP with nothing in Twisted's buffers, and no rate to apply nor first
        bytes to judge (splice moves bytes without Python seeing them)."""
        return self.rate is None and conn.spliceable() and local.spliceable()

    def _blocked(self, peer: str, kind: str) -> None:
        self.refuse(f"connection from {peer}", f"its first bytes are {kind} "
                                                f"(block={self.block})")

    def _idle(self, relay: Any) -> None:
        self.log.debug("closing a connection idle for read={t:g}s", t=self.read_timeout)
        relay.close()

    # -- UDP -------------------------------------------------------------

    def udp_session(self, far: FarSide, deliver: Callable[[bytes], None],
                    on_end: Callable[[UdpSession], None], slot: Slot) -> UdpSession:
        """A UDP session between this end's peer (``deliver`` reaches it) and ``far``,
        for as long as ``slot`` is held; ``far`` is closed when the session ends."""
        rate = self.rate

        def ended(session: UdpSession) -> None:
            self.udp_sessions.discard(session)
            slot.release()
            far.close()
            on_end(session)

        session = UdpSession(self.clock, far.send_datagram, deliver, self.udp_timeout,
                             self.tunables.udp_data_buf_size, self.traffic.add_udp_in,
                             self.traffic.add_udp_out, self.udp_drops, ended,
                             rate.inbound if rate else None, rate.outbound if rate else None,
                             answer_timeout=self.tunables.udp_answer_timeout)
        self.udp_sessions.add(session)
        return session

    def close_all(self) -> Deferred[None]:
        """Shutdown: UDP sessions end now; relays get SHUTDOWN_TIMEOUT to finish."""
        for session in list(self.udp_sessions):
            session.close()
        return self.relays.drain(self.clock, self.tunables.shutdown_timeout)

    def udp_dropped(self) -> int:
        return self.udp_drops.oversize + self.udp_drops.overload


def _touching(count: Callable[[int], None], watch: IdleWatch) -> Callable[[int], None]:
    def counted(n: int) -> None:
        watch.touch()
        count(n)

    return counted
