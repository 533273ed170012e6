"""Single-end forwarding (client ``mode=1``): no server, no tunnel.

The client listens on its tunnel address, TCP and UDP, and forwards straight to
its target.  TCP users take a connection to the target opened ahead of time (a
small pool, each used once) so they do not wait for a connect; UDP sources get a
session each, a connected UDP socket to the target, until ``read=`` (or
UDP_READ_TIMEOUT) of silence.  With ``proxy=`` the target is dialed per user,
because the PROXY header names the user and must come first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.endpoints import (
    ListenerService,
    UdpListenerService,
    bind_problem,
    describe_failure,
    is_ip,
)
from nodepass.stats import Report, snapshot
from nodepass.tunables import Tunables
from nodepass.tunnel.channel import QuietFactory, host_of, peer_of, tune
from nodepass.tunnel.egress import LocalConnection, open_udp_target, proxy_header
from nodepass.tunnel.flows import Flows
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.targets import TargetDialer
from nodepass.tunnel.udp import MAX_DATAGRAM, LocalUdp, UdpSession
from nodepass.url import Address, ClientConfig, format_targets

EARLY_LIMIT = 64 * 1024  # bytes a pre-opened target connection may send before its user


def bindable(address: Address) -> bool:
    """Can this machine listen on ``address`` now?  (client mode=0; a name is a remote
    server)"""
    return is_ip(address.host) and bind_problem(address.host, address.port) is None


class PreOpened(LocalConnection):
    """A target connection waiting in the pool; keeps what the target says first."""

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.early = b""

    def before_relay_data(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= EARLY_LIMIT:
            self.transport.pauseProducing()

    def before_relay_eof(self) -> None:
        # The target gave up on it while it waited (an idle timeout): no user may get it.
        self.pool.discard(self)
        self.transport.loseConnection()

    def before_relay_lost(self, reason: Failure) -> None:
        self.pool.discard(self)


class TargetPool:
    """Connections to the target opened ahead of users, each used once."""

    log = logs.logger("nodepass")

    def __init__(self, clock: Any, dialer: TargetDialer, capacity: int,
                 retry_interval: float) -> None:
        self.clock = clock
        self.dialer = dialer
        self.capacity = capacity
        self.retry_interval = retry_interval
        self.idle: deque[PreOpened] = deque()
        self.opening = 0
        self.running = False
        self._retry: Any = None

    def start(self) -> None:
        self.running = True
        self.refill()

    def stop(self) -> None:
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        while self.idle:
            self.idle.popleft().transport.loseConnection()

    def take(self) -> Deferred[Any]:
        """A connected target connection: a pre-opened one, or a new one."""
        conn = self.idle.popleft() if self.idle else None
        self.refill()
        if conn is not None:
            return succeed(conn)
        return self.dialer.connect(QuietFactory(PreOpened, self))

    def discard(self, conn: PreOpened) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        self._refill_later()  # the target closed it: do not redial in a tight loop

    def refill(self) -> None:
        if not self.running or (self._retry is not None and self._retry.active()):
            return
        for _ in range(self.capacity - len(self.idle) - self.opening):
            self.opening += 1
            self.dialer.connect(QuietFactory(PreOpened, self)).addCallbacks(
                self._opened, self._failed)

    def _opened(self, conn: PreOpened) -> None:
        self.opening -= 1
        if self.running and len(self.idle) < self.capacity:
            self.idle.append(conn)
        else:
            conn.transport.loseConnection()

    def _failed(self, reason: Failure) -> None:
        self.opening -= 1
        self._refill_later()

    def _refill_later(self) -> None:
        if self.running and (self._retry is None or not self._retry.active()):
            self._retry = self.clock.callLater(self.retry_interval, self.refill)


class DirectUser(RelayProtocol):
    def __init__(self, forwarder: DirectForwarder) -> None:
        self.forwarder = forwarder
        self.attempt: Deferred[Any] | None = None

    def connectionMade(self) -> None:
        tune(self.transport, keepalive=False)
        self.forwarder.user_arrived(self)

    def before_relay_lost(self, reason: Failure) -> None:
        if self.attempt is not None:
            self.attempt.cancel()


class DirectUdp(DatagramProtocol):
    """The UDP socket on the tunnel address: one session per source."""

    def __init__(self, forwarder: DirectForwarder) -> None:
        self.forwarder = forwarder
        self.flows = forwarder.flows
        self.sessions: dict[tuple[str, int], UdpSession] = {}

    def startProtocol(self) -> None:
        self.transport.maxPacketSize = MAX_DATAGRAM + 1

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        session = self.sessions.get(addr)
        limit = self.flows.tunables.udp_data_buf_size
        if len(data) > limit:
            self.flows.udp_drops.oversize += 1
            self.flows.warn(f"dropped a {len(data)}-byte datagram from "
                            f"{Address(addr[0], addr[1])}: over UDP_DATA_BUF_SIZE ({limit})")
            return
        if session is None:
            if self.forwarder.stopping or not self.flows.admit(
                    f"UDP from {Address(addr[0], addr[1])}"):
                self.flows.udp_drops.overload += 1
                return
            session = self._open(addr)
            if session.ended:  # its target could not be opened
                return
            self.sessions[addr] = session
        session.to_tunnel(data)

    def _open(self, addr: tuple[str, int]) -> UdpSession:
        """A session for a new source: the far side is a socket connected to the target."""
        local = LocalUdp()

        def ended(session: UdpSession) -> None:
            local.close()
            self._ended(addr, session)

        session = self.flows.direct_udp_session(
            local.send, lambda reply: self.transport.write(reply, addr), ended)
        local.received = session.from_tunnel
        dialer = self.forwarder.dialer
        open_udp_target(self.flows, dialer, local, dialer.udp_target(), session)
        return session

    def _ended(self, addr: tuple[str, int], session: UdpSession) -> None:
        if self.sessions.get(addr) is session:
            del self.sessions[addr]


class DirectForwarder(Service):
    """Single-end mode's state: the target pool and the live relays."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, config: ClientConfig, tunables: Tunables) -> None:
        self.clock = reactor
        self.config = config
        self.flows = Flows.for_config(reactor, tunables, config)
        self.dialer = TargetDialer.for_config(reactor, config, tunables)
        capacity = 0 if config.proxy or config.notcp else tunables.min_pool_capacity
        self.pool = TargetPool(reactor, self.dialer, capacity, tunables.min_pool_interval)
        self.udp = DirectUdp(self)
        self.stopping = False

    def user_factory(self) -> QuietFactory:
        return QuietFactory(DirectUser, self)

    def user_arrived(self, user: DirectUser) -> None:
        if self.stopping:
            user.transport.abortConnection()
            return
        if not self.flows.admit(f"connection from {peer_of(user.transport)}"):
            user.transport.loseConnection()
            return
        user.transport.pauseProducing()
        self.flows.pending += 1
        user.attempt = self.pool.take()
        user.attempt.addCallbacks(lambda target: self._join(user, target),
                                  lambda reason: self._failed(user, reason))

    def _join(self, user: DirectUser, target: PreOpened) -> None:
        self.flows.pending -= 1
        user.attempt = None
        header = proxy_header(self.config.proxy, peer_of(user.transport),
                              host_of(user.transport), target.transport.getPeer())
        self.flows.join(user, target, to_conn=header, conn_pending=target.early, user=True)

    def _failed(self, user: DirectUser, reason: Failure) -> None:
        self.flows.pending -= 1
        user.attempt = None
        if not reason.check(CancelledError):
            self.flows.warn(f"closed connection from {peer_of(user.transport)}: cannot reach "
                            f"target: {describe_failure(reason)}")
        user.transport.loseConnection()

    def report(self) -> Report:
        return snapshot("forwarding", len(self.pool.idle), None, self.flows, "single-end")

    def startService(self) -> None:
        super().startService()
        targets = format_targets(self.config.targets)
        self.log.info("single-end mode: forwarding {listen} straight to {targets} (no tunnel "
                      "server)", listen=self.config.tunnel, targets=targets)
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        self.pool.stop()
        return self.flows.close_all()


def single_end(root: Any, config: ClientConfig,
               tunables: Tunables) -> tuple[Callable[[], Report], Deferred[Any]]:
    """Assemble single-end mode under ``root``; (report, ready) as tap expects."""
    from twisted.internet.defer import gatherResults

    from nodepass.report import reporter

    forwarder = DirectForwarder(root.reactor, config, tunables)
    forwarder.setServiceParent(root)
    ready = []
    if not config.notcp:
        listener = ListenerService(root.reactor, config.tunnel, forwarder.user_factory(),
                                   "single-end", root.fail)
        listener.setServiceParent(root)
        ready.append(listener.listening)
    if not config.noudp:
        UdpListenerService(root.reactor, config.tunnel, forwarder.udp, "single-end",
                           root.fail, only_if=lambda: not root.exit_status).setServiceParent(root)
    reporter(root.reactor, forwarder.report, tunables.report_interval).setServiceParent(root)
    listening = gatherResults(ready, consumeErrors=True) if ready else succeed([])
    return forwarder.report, listening.addCallbacks(lambda _: True, lambda _: False)
