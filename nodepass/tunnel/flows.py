"""What one instance carries right now, and the controls on it.

Both ends of a tunnel (and the single-end forwarder) keep their live relays, UDP
sessions and counters here, and every new connection or session passes
:meth:`Flows.admit` (``slot=`` and SEMAPHORE_LIMIT).  :meth:`Flows.join` starts
the relay for a connection pair with ``rate=`` and ``read=`` applied, on the
splice(2) fast path when it can.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred

from nodepass import logs
from nodepass.stats import Traffic
from nodepass.tunables import Tunables
from nodepass.tunnel import splice
from nodepass.tunnel.channel import peer_of
from nodepass.tunnel.firstbytes import FirstBytes
from nodepass.tunnel.limits import IdleWatch, RateLimit, slot_limit
from nodepass.tunnel.relay import Relay, RelayProtocol, RelaySet
from nodepass.tunnel.udp import UdpCounters, UdpSession, tunnel_session
from nodepass.url import DEFAULT_SLOT, ClientConfig, ServerConfig


class Flows:
    log = logs.logger("nodepass")

    def __init__(self, clock: Any, tunables: Tunables, slot: int = DEFAULT_SLOT,
                 rate: int = 0, read: float = 0.0, block: str = "") -> None:
        self.clock = clock
        self.tunables = tunables
        self.traffic = Traffic()
        self.relays = RelaySet()
        self.udp_sessions: set[UdpSession] = set()
        self.udp_drops = UdpCounters()
        self.pending = 0  # users waiting for a tunnel connection, targets being dialed
        self.refused = 0
        self.limit, self.limit_name = slot_limit(slot, tunables.semaphore_limit)
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
        return cls(clock, tunables, config.slot, config.rate, config.read, config.block)

    def in_use(self) -> int:
        """What the slot limit counts: relays, connections on their way, UDP sessions."""
        return len(self.relays) + self.pending + len(self.udp_sessions)

    def admit(self, what: str) -> bool:
        """Room for one more connection or session?  If not, it is counted and logged."""
        if self.in_use() < self.limit:
            return True
        self.refuse(what, f"{self.limit_name} reached")
        return False

    def refuse(self, what: str, why: str) -> None:
        self.refused += 1
        self.warn(f"refused {what}: {why}")

    def warn(self, text: str) -> None:
        self._throttle.warn(self.log, "{text}", text=text)

    # -- TCP -------------------------------------------------------------

    def join(self, local: RelayProtocol, conn: Any, to_conn: bytes = b"",
             to_local: bytes = b"", conn_pending: bytes = b"",
             conn_eof: bool = False, user: bool = False) -> None:
        """Relay ``local`` (a user or target connection) with ``conn`` (a tunnel
        connection, or the target in single-end mode).  ``to_conn``/``to_local`` are
        protocol bytes written first (LAUNCH, a PROXY header); ``conn_pending`` and
        ``conn_eof`` are what ``conn`` read before the join.  ``user``: ``local`` is a
        user, whose first bytes ``block=`` judges."""
        screened = user and bool(self.block)
        count_in, count_out = self.traffic.add_tcp_in, self.traffic.add_tcp_out
        watch: IdleWatch | None = None
        if self.read_timeout:
            watch = IdleWatch(self.clock, self.read_timeout, lambda: self._idle(relay))
            count_in, count_out = _touching(count_in, watch), _touching(count_out, watch)

        def ended(finished: Any) -> None:
            if watch is not None:
                watch.cancel()
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
        return (self.rate is None and getattr(conn, "stream", None) is None
                and not getattr(conn, "unflushed", False)
                and splice.plain_tcp(conn.transport) and splice.plain_tcp(local.transport))

    def _blocked(self, peer: str, kind: str) -> None:
        self.refuse(f"connection from {peer}", f"its first bytes are {kind} "
                                                f"(block={self.block})")

    def _idle(self, relay: Any) -> None:
        self.log.debug("closing a connection idle for read={t:g}s", t=self.read_timeout)
        relay.close()

    # -- UDP -------------------------------------------------------------

    def udp_session(self, conn: Any, deliver: Callable[[bytes], None],
                    on_end: Callable[[UdpSession], None]) -> UdpSession:
        """A UDP session over tunnel connection ``conn``; ``deliver`` sends a datagram
        to this end's UDP peer."""
        return self._udp_session(partial(tunnel_session, self.clock, conn), deliver, on_end)

    def direct_udp_session(self, send: Callable[[bytes], None],
                           deliver: Callable[[bytes], None],
                           on_end: Callable[[UdpSession], None]) -> UdpSession:
        """A single-end UDP session: ``send`` reaches the target, ``deliver`` the user."""
        return self._udp_session(partial(UdpSession, self.clock, send), deliver, on_end)

    def _udp_session(self, make: Callable[..., UdpSession], deliver: Callable[[bytes], None],
                     on_end: Callable[[UdpSession], None]) -> UdpSession:
        rate = self.rate

        def ended(session: UdpSession) -> None:
            self.udp_sessions.discard(session)
            on_end(session)

        session = make(deliver, self.udp_timeout, self.tunables.udp_data_buf_size,
                       self.traffic.add_udp_in, self.traffic.add_udp_out, self.udp_drops, ended,
                       rate.inbound if rate else None, rate.outbound if rate else None)
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
