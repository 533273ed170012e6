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
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.endpoints import (
    bind_problem,
    describe_failure,
    is_ip,
)
from nodepass.stats import Report, snapshot
from nodepass.timers import cancelled
from nodepass.tunables import Tunables
from nodepass.tunnel.channel import QuietFactory
from nodepass.tunnel.egress import LocalConnection, open_udp_target, proxy_header
from nodepass.tunnel.flows import Flows
from nodepass.tunnel.ingress import Ingress
from nodepass.tunnel.targets import TargetDialer
from nodepass.tunnel.udp import LocalUdp, UdpSession
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

    def launch_tcp(self, source: str, dest: str, proxy: int) -> bytes:
        """A user takes it: the PROXY header (if asked for) goes first."""
        return proxy_header(proxy, source, dest, self.transport.getPeer())

    def take_held(self) -> tuple[bytes, bool]:
        early, self.early = self.early, b""
        return early, False

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

    def __init__(self, clock: Any, flows: Flows, dialer: TargetDialer, capacity: int,
                 retry_interval: float) -> None:
        self.clock = clock
        self.flows = flows
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
        self._retry = cancelled(self._retry)
        while self.idle:
            self.idle.popleft().transport.loseConnection()

    def take(self, on_ready: Callable[[Any], None],
             on_unavailable: Callable[[str], None]) -> Deferred[Any]:
        """A connected target connection: a pre-opened one, or a new one."""
        conn = self.idle.popleft() if self.idle else None
        self.refill()
        attempt = succeed(conn) if conn is not None else self.dialer.connect(
            QuietFactory(PreOpened, self))

        def failed(reason: Failure) -> None:
            if not reason.check(CancelledError):
                on_unavailable(f"cannot reach target: {describe_failure(reason)}")

        return attempt.addCallbacks(on_ready, failed)

    def take_udp(self, on_ready: Callable[[Any], None],
                 on_unavailable: Callable[[str], None]) -> None:
        """A UDP source's far side: its own socket to the target, at once."""
        on_ready(UdpTarget(self.flows, self.dialer))

    def cancel(self, attempt: Deferred[Any]) -> None:
        attempt.cancel()

    def give_back(self, conn: Any) -> None:
        """Taken but never used (its user left first): still fresh."""
        if isinstance(conn, PreOpened) and self.running and len(self.idle) < self.capacity:
            self.idle.append(conn)
        elif isinstance(conn, PreOpened):
            conn.transport.loseConnection()

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


class UdpTarget:
    """A UDP session's far side in single-end mode: a socket connected to the target
    (a name is resolved first; datagrams wait for it, bounded)."""

    def __init__(self, flows: Flows, dialer: TargetDialer) -> None:
        self.flows = flows
        self.dialer = dialer
        self.local = LocalUdp()

    def launch_udp(self, source: str, dest: str) -> None:
        pass  # nothing to say first: the target sees the datagrams alone

    def carry_udp(self, session: UdpSession) -> None:
        self.local.received = session.from_tunnel
        open_udp_target(self.flows, self.dialer, self.local, self.dialer.udp_target(), session)

    def send_datagram(self, payload: bytes) -> None:
        self.local.send(payload)

    def close(self) -> None:
        self.local.close()


class DirectForwarder(Service):
    """Single-end mode: the ingress, with connections to the target as its far sides."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, config: ClientConfig, tunables: Tunables,
                 dialer: TargetDialer | None = None) -> None:
        self.clock = reactor
        self.config = config
        self.flows = Flows.for_config(reactor, tunables, config)
        self.dialer = dialer or TargetDialer.for_config(reactor, config, tunables)
        capacity = 0 if config.proxy or config.notcp else tunables.min_pool_capacity
        self.pool = TargetPool(reactor, self.flows, self.dialer, capacity,
                               tunables.min_pool_interval)
        self.ingress = Ingress(self.flows, self.pool, lambda: None, config.proxy)

    @property
    def udp(self) -> Any:
        return self.ingress.udp

    def user_factory(self) -> QuietFactory:
        return self.ingress.user_factory()

    def report(self) -> Report:
        return snapshot("forwarding", len(self.pool.idle), None, self.flows, "single-end")

    def startService(self) -> None:
        super().startService()
        targets = format_targets(self.config.targets)
        self.log.info("single-end mode: forwarding {listen} straight to {targets} (no tunnel "
                      "server)", listen=self.config.tunnel, targets=targets)
        if self.config.tunnel_key is not None:
            self.log.warn("mode=1: single-end mode uses no tunnel key: whoever reaches {listen} "
                          "is forwarded", listen=self.config.tunnel)
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.pool.stop()
        self.ingress.close_all()
        return self.flows.close_all()
