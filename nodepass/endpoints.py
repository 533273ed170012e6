"""Endpoints for listening and dialing an :class:`~nodepass.url.Address`, and a
listening service that reports a failure to start instead of logging a traceback."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.url import Address

BACKLOG = 4096
DIAL_TIMEOUT = 10.0


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bind_problem(host: str, port: int = 0) -> str | None:
    """Why this machine cannot bind a TCP socket to ``host`` (an IP) and ``port`` now,
    or None when it can.  SO_REUSEADDR as Twisted's listeners set it, so only a live
    listener or a foreign address is a problem."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def listen_endpoint(reactor: Any, address: Address, tls: Any = None) -> Any:
    """TCP, or TLS with ``tls`` (an object whose getContext() gives the current context)."""
    if tls is not None:
        return SSL4ServerEndpoint(reactor, address.port, tls, BACKLOG, address.host)
    if address.is_ipv6:
        return TCP6ServerEndpoint(reactor, address.port, BACKLOG, address.host)
    return TCP4ServerEndpoint(reactor, address.port, BACKLOG, address.host)


def dial_endpoint(reactor: Any, address: Address, timeout: float = DIAL_TIMEOUT,
                  bind_address: tuple[str, int] | None = None) -> IStreamClientEndpoint:
    """IP literals are dialed directly; names go through the resolver.  With
    ``bind_address`` the socket is bound to that source address first."""
    if address.is_ipv6:
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout, bind_address)
    if is_ip(address.host):
        return TCP4ClientEndpoint(reactor, address.host, address.port, timeout, bind_address)
    return HostnameEndpoint(reactor, address.host.encode("idna"), address.port, timeout,
                            bind_address)


def describe_failure(reason: Failure) -> str:
    """A one-line reason for a socket error, without the exception class noise."""
    error = reason.value
    cause = getattr(error, "socketError", None) or getattr(error, "osError", None) or error
    if isinstance(cause, int):
        return os.strerror(cause)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    message = str(cause).strip()
    return message.rstrip(".") or type(error).__name__


class ListenerService(Service):
    """Listen on an address while running; on failure, call ``on_failure(message)``."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, address: Address, factory: Factory, role: str,
                 on_failure: Callable[[str], None], tls: Any = None) -> None:
        self.reactor = reactor
        self.tls = tls
        self.address = address
        self.factory = factory
        self.role = role
        self.on_failure = on_failure
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()
        self._pending: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        endpoint = listen_endpoint(self.reactor, self.address, self.tls)
        self._pending = endpoint.listen(self.factory)
        self._pending.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("{role} listening on {address}", role=self.role,
                      address=_describe_host(port.getHost()))
        self.listening.callback(port)

    def _failed(self, reason: Failure) -> None:
        message = f"cannot listen for {self.role} on {self.address}: {describe_failure(reason)}"
        self.listening.errback(Failure(OSError(message)))
        self.listening.addErrback(lambda _: None)
        self.on_failure(message)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        if self._pending is not None:
            self._pending.cancel()
        return None


def _describe_host(host: Any) -> str:
    return str(Address(host.host, host.port))


def port_free_for_both(host: str) -> int:
    """A port number free on ``host`` for TCP and for UDP alike, or 0 (let TCP choose, as
    before) when none is found: the kernel's choice for a TCP socket says nothing of UDP,
    and a UDP socket of another program may hold that number."""
    try:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return 0
    for _ in range(PORT_PROBES):
        with socket.socket(family, socket.SOCK_STREAM) as stream, \
                socket.socket(family, socket.SOCK_DGRAM) as datagram:
            try:
                stream.bind((host, 0))
                port = stream.getsockname()[1]
                datagram.bind((host, port))
            except OSError:
                continue
            return int(port)
    return 0


class UdpListenerService(Service):
    """Receive UDP on an address while running; on failure, call ``on_failure(message)``."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, address: Address, protocol: Any, role: str,
                 on_failure: Callable[[str], None],
                 only_if: Callable[[], bool] = lambda: True,
                 same_port_as: ListenerService | None = None) -> None:
        self.only_if = only_if  # checked at start: listen only if it says so
        self.same_port_as = same_port_as  # port 0: UDP takes the port TCP took there
        self.reactor = reactor
        self.address = address
        self.protocol = protocol
        self.role = role
        self.on_failure = on_failure
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        if not self.only_if():
            return
        address = self.address
        tcp = self.same_port_as
        if address.port == 0 and tcp is not None and tcp.port is not None:
            address = Address(address.host, tcp.port.getHost().port)
        try:
            self.port = self.reactor.listenUDP(address.port, self.protocol,
                                               interface=address.host)
        except CannotListenError as e:
            self.on_failure(f"cannot receive UDP for {self.role} on {address}: "
                            f"{describe_failure(Failure(e))}")
            return
        self.log.info("{role} receiving UDP on {address}", role=self.role,
                      address=_describe_host(self.port.getHost()))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


PORT_PROBES = 20  # port 0 with TCP and UDP: numbers tried for one free for both


def listeners(reactor: Any, address: Address, role: str, on_failure: Callable[[str], None],
              tcp: Factory | None = None, udp: Any = None,
              udp_only_if: Callable[[], bool] = lambda: True) -> list[Service]:
    """The services listening for ``role`` on ``address``: TCP with ``tcp`` (a factory),
    UDP with ``udp`` (a protocol) on the same port (for port 0: one free for both)."""
    if tcp is not None and udp is not None and address.port == 0:
        address = Address(address.host, port_free_for_both(address.host))
    services: list[Service] = []
    tcp_listener = None
    if tcp is not None:
        tcp_listener = ListenerService(reactor, address, tcp, role, on_failure)
        services.append(tcp_listener)
    if udp is not None:
        services.append(UdpListenerService(reactor, address, udp, role, on_failure,
                                           only_if=udp_only_if, same_port_as=tcp_listener))
    return services
