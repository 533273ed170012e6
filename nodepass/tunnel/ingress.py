"""The end users arrive at.

Each TCP connection, and each new UDP source address, takes an idle tunnel
connection from a pool and launches it (a LAUNCH frame naming the protocol, the
user's address, the address the user reached and the PROXY version asked for);
the other end dials the target.  The server does this in reverse mode, the
client in forward mode.  A user who finds no pooled connection waits (bounded);
one who finds no session, or no free slot, is turned away at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nodepass.tunnel import wire
from nodepass.tunnel.channel import QuietFactory, host_of, peer_of, tune
from nodepass.tunnel.flows import Flows
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.udp import MAX_DATAGRAM, PENDING_LIMIT, UdpSession, carry_datagrams
from nodepass.tunnel.wire import Proto
from nodepass.url import Address


class ConnectionSource(Protocol):
    """Where idle tunnel connections come from (the server's IdlePool, the client's pool)."""

    wait_timeout: float

    def take(self, on_ready: Callable[[Any], None],
             on_timeout: Callable[[], None]) -> Any: ...

    def cancel(self, waiter: Any) -> None: ...

    def give_back(self, conn: Any) -> None: ...


class UserConnection(RelayProtocol):
    """A user's TCP connection, waiting for then using a tunnel connection."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.waiter: Any = None
        self.waiting = False
        self.gone = False

    def connectionMade(self) -> None:
        tune(self.transport, keepalive=False)
        self.ingress.user_arrived(self)

    def before_relay_lost(self, reason: Failure) -> None:
        self.gone = True
        self.ingress.user_left(self)


class Ingress:
    def __init__(self, flows: Flows, pool: ConnectionSource,
                 unavailable: Callable[[], str | None], proxy: int = 0) -> None:
        self.flows = flows
        self.pool = pool
        self.unavailable = unavailable  # why users cannot be served now, or None
        self.proxy = proxy
        self.stopping = False
        self.udp = IngressUdp(self)

    def user_factory(self) -> QuietFactory:
        return QuietFactory(UserConnection, self)

    def user_arrived(self, user: UserConnection) -> None:
        if self.stopping:
            user.transport.abortConnection()
            return
        peer = peer_of(user.transport)
        why = self.unavailable()
        if why is not None:
            self.flows.warn(f"closed connection from {peer}: {why}")
            user.transport.loseConnection()
        elif not self.flows.admit(f"connection from {peer}"):
            user.transport.loseConnection()
        else:
            user.transport.pauseProducing()
            user.waiting = True
            self.flows.pending += 1
            user.waiter = self.pool.take(lambda conn: self._launch(user, conn),
                                         lambda: self._no_pool(user))

    def _done_waiting(self, user: UserConnection) -> None:
        user.waiter = None
        if user.waiting:
            user.waiting = False
            self.flows.pending -= 1

    def user_left(self, user: UserConnection) -> None:
        if user.waiter is not None:
            self.pool.cancel(user.waiter)
        self._done_waiting(user)

    def _no_pool(self, user: UserConnection) -> None:
        self._done_waiting(user)
        if self.stopping:
            why = "shutting down"
        else:
            why = self.unavailable() or (
                f"no pooled connection within {self.pool.wait_timeout:g}s")
        self.flows.warn(f"closed connection from {peer_of(user.transport)}: {why}")
        user.transport.loseConnection()

    def _launch(self, user: UserConnection, conn: Any) -> None:
        self._done_waiting(user)
        if user.gone:
            self.pool.give_back(conn)  # never launched, so still fresh
            return
        conn.state = "relay"
        conn.framing = False
        launch = wire.launch(Proto.TCP, peer_of(user.transport), host_of(user.transport),
                             self.proxy)
        if conn.tunnel_tls():
            conn.frame_stream()
        self.flows.join(user, conn, to_conn=launch, user=True)

    def close_all(self) -> None:
        self.stopping = True
        self.udp.close_all()


class _Pending:
    """A source waiting for its tunnel connection; keeps its first datagrams."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.waiter: Any = None


class IngressUdp(DatagramProtocol):
    """The UDP socket users send to: one session per source address."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.flows = ingress.flows
        self.sessions: dict[tuple[str, int], UdpSession | _Pending] = {}

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
        flows = self.flows
        limit = flows.tunables.udp_data_buf_size
        if len(data) > limit:
            flows.udp_drops.oversize += 1
            flows.warn(f"dropped a {len(data)}-byte datagram from {_peer(addr)}: over "
                       f"UDP_DATA_BUF_SIZE ({limit})")
        elif isinstance(current, _Pending):
            if len(current.queue) < PENDING_LIMIT:
                current.queue.append(data)
            else:
                flows.udp_drops.overload += 1
        elif self.ingress.stopping:
            pass
        elif (why := self.ingress.unavailable()) is not None:
            flows.warn(f"dropped a datagram from {_peer(addr)}: {why}")
        elif not flows.admit(f"UDP from {_peer(addr)}"):
            flows.udp_drops.overload += 1
        else:
            pending = _Pending()
            pending.queue.append(data)
            self.sessions[addr] = pending
            flows.pending += 1
            pending.waiter = self.ingress.pool.take(
                lambda conn: self._launch(addr, conn), lambda: self._no_pool(addr))

    def _launch(self, addr: tuple[str, int], conn: Any) -> None:
        pending = self.sessions.get(addr)
        if not isinstance(pending, _Pending):
            self.ingress.pool.give_back(conn)
            return
        self.flows.pending -= 1
        conn.send(wire.launch(Proto.UDP, _peer(addr), host_of(self.transport)))
        session = self.flows.udp_session(
            conn, lambda payload: self.transport.write(payload, addr),
            lambda s: self._ended(addr, s))
        carry_datagrams(conn, session)
        self.sessions[addr] = session
        for data in pending.queue:
            session.to_tunnel(data)

    def _no_pool(self, addr: tuple[str, int]) -> None:
        pending = self.sessions.pop(addr, None)
        if isinstance(pending, _Pending):
            self.flows.pending -= 1
            self.flows.udp_drops.overload += len(pending.queue)
            self.flows.warn(f"dropped datagrams from {_peer(addr)}: no pooled connection")

    def _ended(self, addr: tuple[str, int], session: UdpSession) -> None:
        if self.sessions.get(addr) is session:
            del self.sessions[addr]

    def close_all(self) -> None:
        for key, entry in list(self.sessions.items()):
            if isinstance(entry, UdpSession):
                entry.close()
            else:
                if entry.waiter is not None:
                    self.ingress.pool.cancel(entry.waiter)
                self.flows.pending -= 1
            self.sessions.pop(key, None)


def _peer(addr: tuple[str, int]) -> str:
    return str(Address(addr[0], addr[1]))
