"""Whole nodepass instances — the very service trees ``tap.makeService`` assembles —
on a :class:`~tests.memnet.MemoryNetwork`, and the users and services around them."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from nodepass import logs, tap
from nodepass.endpoints import ListenerService, UdpListenerService
from nodepass.tunnel.client import ClientTunnel
from nodepass.tunnel.direct import DirectForwarder
from nodepass.tunnel.server import ServerTunnel
from tests.integration import Echo
from tests.memnet import MemoryNetwork

FAST = {"REPORT_INTERVAL": "1s", "SERVICE_COOLDOWN": "200ms", "MIN_POOL_INTERVAL": "100ms",
        "MAX_POOL_INTERVAL": "1s", "MIN_POOL_CAPACITY": "4", "SHUTDOWN_TIMEOUT": "1s"}


class LogLines:
    """The text of every log event while it is attached (a bounded list)."""

    def __init__(self, case: Any, clock: Any = None) -> None:
        self.clock = clock
        self.lines: list[tuple[LogLevel, str]] = []
        self.times: list[float] = []  # on ``clock``, when one was given
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if len(self.lines) < 100_000:
            self.lines.append((event.get("log_level", LogLevel.info), logs.format_line(event)))
            self.times.append(self.clock.seconds() if self.clock is not None else 0.0)

    def when(self, fragment: str) -> list[float]:
        """The clock's time at each line holding ``fragment``."""
        return [t for t, (_, line) in zip(self.times, self.lines, strict=True)
                if fragment in line]

    def count(self, fragment: str) -> int:
        return sum(1 for _, line in self.lines if fragment in line)

    def matching(self, fragment: str) -> list[str]:
        return [line for _, line in self.lines if fragment in line]


class Running:
    """One instance on the memory network: its root service, its listeners, its tunnel."""

    def __init__(self, case: Any, net: MemoryNetwork, url: str, **env: str) -> None:
        self.net = net
        options = tap.Options({**FAST, **env})
        options.parseOptions([url])
        level = logs.gate.minimum
        self.root = tap.makeService(options, reactor=net)
        logs.gate.minimum = level  # the URL's log level is the process's; keep the test's
        self.root.startService()
        self.stopped = False
        case.addCleanup(self.stop)
        net.flush()

    def _services(self, root: Any = None) -> list[Any]:
        found = []
        for service in root.services if root is not None else self.root.services:
            found.append(service)
            if hasattr(service, "services"):
                found.extend(self._services(service))
        return found

    def listening_port(self, role: str) -> int:
        """The TCP port the listener for ``role`` (tunnel, target, single-end) took."""
        for service in self._services():
            if isinstance(service, ListenerService) and service.role == role and service.port:
                return service.port.getHost().port
        raise AssertionError(f"no {role} listener")

    def udp_port(self, role: str) -> int:
        for service in self._services():
            if isinstance(service, UdpListenerService) and service.role == role and \
                    service.port is not None:
                return service.port.getHost().port
        raise AssertionError(f"no {role} UDP listener")

    @property
    def tunnel(self) -> Any:
        kinds = (ServerTunnel, ClientTunnel, DirectForwarder)
        return next(s for s in self._services() if isinstance(s, kinds))

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        done = self.root.stopService()
        self.net.run(3.0)
        assert done.called, "the service tree did not stop within its shutdown timeout"


def pair(case: Any, net: MemoryNetwork, backend: int, key: str = "k", server_query: str = "",
         client_query: str = "", client_target: str | None = None,
         **env: str) -> tuple[Running, Running, int]:
    """A server and a client on the memory network, the session open; returns them and
    the server's target port (TCP and UDP take the same number there)."""
    server = Running(case, net, f"server://{key}@127.0.0.1:0/127.0.0.1:0{server_query}", **env)
    target = client_target or f"127.0.0.1:{backend}"
    client = Running(case, net, f"client://{key}@127.0.0.1:{server.listening_port('tunnel')}/"
                                f"{target}{client_query or '?mode=2'}", **env)
    net.flush()
    try:
        return server, client, server.listening_port("target")
    except AssertionError:  # notcp=1: only UDP listens there
        return server, client, server.udp_port("target")


def echo_backend(net: MemoryNetwork) -> int:
    return net.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1").getHost().port


@implementer(IHalfCloseableProtocol)
class User(Protocol):
    """A user's connection: keeps what it receives and how the connection ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = False
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.lost = reason

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.received).hexdigest()


def connect(net: MemoryNetwork, port: int, user: Protocol | None = None) -> Any:
    """A user connected to ``port`` (after a flush), or the failure."""
    from twisted.internet.endpoints import TCP4ClientEndpoint

    user = user or User()
    results: list[Any] = []
    TCP4ClientEndpoint(net, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: user)).addBoth(results.append)
    net.flush()
    assert results, "the connection attempt did not finish"
    return results[0]


class UdpPeer(DatagramProtocol):
    """A UDP socket that keeps what it receives (and, as a service, echoes it)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        if self.echo:
            self.transport.write(data, addr)


def udp_peer(net: MemoryNetwork, echo: bool = False,
             protocol: DatagramProtocol | None = None) -> tuple[Any, int]:
    peer = protocol or UdpPeer(echo)
    port = net.listenUDP(0, peer, interface="127.0.0.1").getHost().port
    return peer, port


def ask(net: MemoryNetwork, peer: UdpPeer, port: int, payload: bytes) -> list[bytes]:
    """Send one datagram to ``port`` and return what came back, once all is delivered."""
    before = len(peer.received)
    peer.transport.write(payload, ("127.0.0.1", port))
    net.flush()
    return [data for data, _ in peer.received[before:]]
