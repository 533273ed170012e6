"""The end users arrive at.

Each TCP connection, and each new UDP source address, reserves a slot and takes a
far side from a :class:`ConnectionSource`: an idle tunnel connection, which is
launched (LAUNCH names the protocol, the user's address, the address the user
reached and the PROXY version asked for) and whose other end dials the target —
or, in single-end mode, a connection (or UDP socket) to the target itself.  The
server does this in reverse mode, the client in forward mode, the single-end
client always.  A user who finds no far side waits (bounded); one who finds no
session, or no free slot, is turned away at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nodepass.tunnel.channel import QuietFactory, host_of, peer_of, tune
from nodepass.tunnel.flows import Flows, Slot
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.udp import MAX_DATAGRAM, PENDING_LIMIT, UdpSession
from nodepass.url import Address


class ConnectionSource(Protocol):
    """Where users' far sides come from (the server's IdlePool, the client's pool,
    single-end's TargetPool).  A TCP far side has ``launch_tcp(source, dest, proxy)``
    (the bytes to send first); a UDP one ``launch_udp(source, dest)``,
    ``carry_udp(session)``, ``send_datagram`` and ``close``."""

    def take(self, on_ready: Callable[[Any], None],
             on_unavailable: Callable[[str], None]) -> Any: ...

    def take_udp(self, on_ready: Callable[[Any], None],
                 on_unavailable: Callable[[str], None]) -> Any: ...

    def cancel(self, waiter: Any) -> None: ...

    def give_back(self, far: Any) -> None: ...


class UserConnection(RelayProtocol):
    """A user's TCP connection, waiting for then using its far side."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.slot: Slot | None = None
        self.waiter: Any = None
        self.gone = False

    def connectionMade(self) -> None:
        tune(self.transport, keepalive=False)
        self.ingress.user_arrived(self)

    def before_relay_lost(self, reason: Failure) -> None:
        self.gone = True
        self.ingress.user_left(self)


class Ingress:
    def __init__(self, flows: Flows, source: ConnectionSource,
                 unavailable: Callable[[], str | None], proxy: int = 0) -> None:
        self.flows = flows
        self.source = source
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
            return
        user.slot = self.flows.reserve(f"connection from {peer}")
        if user.slot is None:
            user.transport.loseConnection()
            return
        user.transport.pauseProducing()
        user.waiter = self.source.take(lambda far: self._launch(user, far),
                                       lambda why: self._unserved(user, why))

    def user_left(self, user: UserConnection) -> None:
        if user.waiter is not None:
            self.source.cancel(user.waiter)
            user.waiter = None
            assert user.slot is not None
            user.slot.release()

    def _unserved(self, user: UserConnection, why: str) -> None:
        user.waiter = None
        assert user.slot is not None
        user.slot.release()
        why = "shutting down" if self.stopping else self.unavailable() or why
        self.flows.warn(f"closed connection from {peer_of(user.transport)}: {why}")
        user.transport.loseConnection()

    def _launch(self, user: UserConnection, far: Any) -> None:
        user.waiter = None
        assert user.slot is not None
        if user.gone:
            user.slot.release()
            self.source.give_back(far)  # never launched, so still fresh
            return
        first = far.launch_tcp(peer_of(user.transport), host_of(user.transport), self.proxy)
        self.flows.join(user, far, user.slot, to_conn=first, user=True)

    def close_all(self) -> None:
        self.stopping = True
        self.udp.close_all()


class _Pending:
    """A source waiting for its far side; keeps its first datagrams."""

    __slots__ = ("queue", "slot", "waiter")

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.queue: list[bytes] = []
        self.waiter: Any = None


class IngressUdp(DatagramProtocol):
    """The UDP socket users send to: one session per source address."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.flows = ingress.flows
        self.sessions: dict[tuple[str, int], UdpSession | _Pending] = {}
        self.per_source: Counter[str] = Counter()  # sessions (pending too) per source IP

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
        elif self.per_source[addr[0]] >= (most := flows.tunables.udp_max_per_source):
            flows.udp_drops.overload += 1
            flows.refuse(f"UDP from {_peer(addr)}", f"{most} sessions from {addr[0]} already "
                                                   "(UDP_MAX_PER_SOURCE)")
        elif (slot := flows.reserve_udp(f"UDP from {_peer(addr)}")) is None:
            flows.udp_drops.overload += 1
        else:
            pending = _Pending(slot)
            pending.queue.append(data)
            self.sessions[addr] = pending
            self.per_source[addr[0]] += 1
            pending.waiter = self.ingress.source.take_udp(
                lambda far: self._launch(addr, far), lambda why: self._unserved(addr, why))

    def _launch(self, addr: tuple[str, int], far: Any) -> None:
        pending = self.sessions.get(addr)
        if not isinstance(pending, _Pending):
            self.ingress.source.give_back(far)
            return
        far.launch_udp(_peer(addr), host_of(self.transport))
        session = self.flows.udp_session(
            far, lambda payload: self.transport.write(payload, addr),
            lambda s: self._ended(addr, s), pending.slot)
        self.sessions[addr] = session
        far.carry_udp(session)
        for data in pending.queue:
            session.to_tunnel(data)

    def _unserved(self, addr: tuple[str, int], why: str) -> None:
        pending = self.sessions.pop(addr, None)
        if isinstance(pending, _Pending):
            self._left(addr)
            pending.slot.release()
            self.flows.udp_drops.overload += len(pending.queue)
            self.flows.warn(f"dropped datagrams from {_peer(addr)}: {why}")

    def _ended(self, addr: tuple[str, int], session: UdpSession) -> None:
        if self.sessions.get(addr) is session:
            del self.sessions[addr]
            self._left(addr)

    def _left(self, addr: tuple[str, int]) -> None:
        ip = addr[0]
        self.per_source[ip] -= 1
        if self.per_source[ip] <= 0:
            del self.per_source[ip]

    def close_all(self) -> None:
        for key, entry in list(self.sessions.items()):
            if isinstance(entry, UdpSession):
                entry.close()
            else:
                if entry.waiter is not None:
                    self.ingress.source.cancel(entry.waiter)
                entry.slot.release()
                self._left(key)
            self.sessions.pop(key, None)


def _peer(addr: tuple[str, int]) -> str:
    return str(Address(addr[0], addr[1]))
