"""UDP through the tunnel, as sessions.

The first datagram from a new source address opens a session: one pooled data
connection, launched with LAUNCH(UDP).  From then on it carries DATAGRAM frames
(one datagram each, boundaries and order kept) both ways, any number of them,
until UDP_READ_TIMEOUT passes with no datagram either way or the connection
closes.  A datagram over UDP_DATA_BUF_SIZE is dropped and counted; so is one that
arrives while the tunnel connection is backed up (UDP may lose, it may not
queue without bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nodepass import logs
from nodepass.tunnel import wire
from nodepass.tunnel.wire import DATAGRAM_TYPES, FrameDecoder, Proto
from nodepass.url import Address

PENDING_LIMIT = 64  # datagrams kept per session while it waits for a data connection
MAX_DATAGRAM = 65535


class UdpCounters:
    """Datagram drops, shared by the sessions of one end."""

    def __init__(self) -> None:
        self.oversize = 0
        self.overload = 0


@implementer(IPushProducer)
class UdpSession:
    """One UDP peer's session over one launched data connection.

    It is registered as the producer of the data connection's transport: while
    that transport's buffer is full, ``pauseProducing`` is called and datagrams
    bound for the tunnel are dropped (counted) instead of queued.
    """

    def __init__(self, clock: Any, conn: Any, deliver: Callable[[bytes], None],
                 idle_timeout: float, max_size: int, count_in: Callable[[int], None],
                 count_out: Callable[[int], None], drops: UdpCounters,
                 on_end: Callable[[UdpSession], None]) -> None:
        self.clock = clock
        self.conn = conn
        self.deliver = deliver
        self.idle_timeout = idle_timeout
        self.max_size = max_size
        self.count_in, self.count_out = count_in, count_out
        self.drops = drops
        self.on_end = on_end
        self.paused = False
        self.ended = False
        self.last = clock.seconds()
        self.timer = clock.callLater(idle_timeout, self.expire)
        conn.transport.registerProducer(self, True)

    # IPushProducer: the tunnel connection's write buffer is full / has room
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def to_tunnel(self, payload: bytes) -> bool:
        """A datagram from this end's target side; False when it was dropped."""
        if self.ended:
            return False
        if len(payload) > self.max_size:
            self.drops.oversize += 1
            return False
        if self.paused:
            self.drops.overload += 1
            return False
        self.count_in(len(payload))
        self.conn.transport.write(wire.datagram(payload))
        self.touch()
        return True

    def from_tunnel(self, payload: bytes) -> None:
        """A datagram from the other end, for this end's target side."""
        if len(payload) > self.max_size:
            self.drops.oversize += 1  # the other end's limit is larger than ours
            return
        self.count_out(len(payload))
        self.deliver(payload)
        self.touch()

    def touch(self) -> None:
        # Cheaper than resetting the timer on every datagram: the timer checks when it fires.
        self.last = self.clock.seconds()

    def expire(self) -> None:
        idle = self.clock.seconds() - self.last
        if idle < self.idle_timeout:
            self.timer = self.clock.callLater(self.idle_timeout - idle, self.expire)
            return
        self.close()

    def close(self) -> None:
        """End the session: its connection closes, its timer stops (idempotent)."""
        if self.ended:
            return
        self.ended = True
        if self.timer.active():
            self.timer.cancel()
        self.conn.close()
        self.on_end(self)


def carry_datagrams(conn: Any, session: UdpSession) -> None:
    """Turn a launched data connection's framing over to DATAGRAM frames."""
    rest = conn.decoder.rest()
    conn.decoder = FrameDecoder(allowed=DATAGRAM_TYPES)
    conn.decoder.feed(rest)
    conn.udp = session
    conn.state = "udp"


class _Pending:
    """A source waiting for its data connection; keeps its first datagrams."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.waiter: Any = None


class ServerUdp(DatagramProtocol):
    """The server's UDP socket on target_addr: one session per source address."""

    log = logs.logger("nodepass")

    def __init__(self, tunnel: Any) -> None:
        self.tunnel = tunnel
        self.sessions: dict[tuple[str, int], UdpSession | _Pending] = {}
        self.drops = UdpCounters()
        self._throttle = logs.Throttle(tunnel.clock)

    def startProtocol(self) -> None:
        self.transport.maxPacketSize = MAX_DATAGRAM + 1  # so oversize is seen, not cut

    @property
    def active(self) -> int:
        return sum(1 for s in self.sessions.values() if isinstance(s, UdpSession))

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        current = self.sessions.get(addr)
        if current.__class__ is UdpSession and len(data) <= current.max_size:
            current.to_tunnel(data)  # the common case, first and short
            return
        tunables = self.tunnel.tunables
        if len(data) > tunables.udp_data_buf_size:
            self.drops.oversize += 1
            self._warn(f"dropped a {len(data)}-byte datagram from {_peer(addr)}: over "
                       f"UDP_DATA_BUF_SIZE ({tunables.udp_data_buf_size})")
            return
        if isinstance(current, _Pending):
            if len(current.queue) < PENDING_LIMIT:
                current.queue.append(data)
            else:
                self.drops.overload += 1
        elif self.tunnel.session is None:
            self._warn(f"dropped a datagram from {_peer(addr)}: no client is connected")
        elif self.tunnel.connections_in_use() >= tunables.semaphore_limit:
            self.drops.overload += 1
            self._warn(f"dropped a datagram from {_peer(addr)}: SEMAPHORE_LIMIT reached")
        else:
            pending = _Pending()
            pending.queue.append(data)
            self.sessions[addr] = pending
            pending.waiter = self.tunnel.pool.take(
                lambda conn: self._launch(addr, conn), lambda: self._no_pool(addr))

    def _launch(self, addr: tuple[str, int], conn: Any) -> None:
        pending = self.sessions.get(addr)
        if not isinstance(pending, _Pending):
            if not self.tunnel.pool.add(conn):
                conn.close()
            return
        conn.send(wire.launch(Proto.UDP, _peer(addr)))
        tunables = self.tunnel.tunables
        traffic = self.tunnel.traffic
        session = UdpSession(
            self.tunnel.clock, conn, lambda payload: self.transport.write(payload, addr),
            tunables.udp_read_timeout, tunables.udp_data_buf_size,
            traffic.add_udp_in, traffic.add_udp_out, self.drops,
            lambda s: self._ended(addr, s))
        carry_datagrams(conn, session)
        self.sessions[addr] = session
        for data in pending.queue:
            session.to_tunnel(data)

    def _no_pool(self, addr: tuple[str, int]) -> None:
        pending = self.sessions.pop(addr, None)
        if isinstance(pending, _Pending):
            self.drops.overload += len(pending.queue)
            self._warn(f"dropped datagrams from {_peer(addr)}: no pooled connection")

    def _ended(self, addr: tuple[str, int], session: UdpSession) -> None:
        if self.sessions.get(addr) is session:
            del self.sessions[addr]

    def close_all(self) -> None:
        for key, entry in list(self.sessions.items()):
            if isinstance(entry, UdpSession):
                entry.close()
            elif entry.waiter is not None:
                self.tunnel.pool.cancel(entry.waiter)
            self.sessions.pop(key, None)

    def _warn(self, message: str) -> None:
        self._throttle.warn(self.log, "{text}", text=message)


class LocalUdp(DatagramProtocol):
    """The client's connected UDP socket to its local target, for one session."""

    def __init__(self) -> None:
        self.session: UdpSession | None = None

    def startProtocol(self) -> None:
        self.transport.maxPacketSize = MAX_DATAGRAM + 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.session is not None:
            self.session.to_tunnel(data)

    def connectionRefused(self) -> None:
        """ICMP port unreachable: the target is not there (yet); UDP goes on."""


def _peer(addr: tuple[str, int]) -> str:
    return str(Address(addr[0], addr[1]))
