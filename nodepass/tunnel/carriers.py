"""What carries a tunnel connection: the pool transport of ``type=`` (docs/protocol.md).

A carrier is two factories: what the server's tunnel port runs for each accepted TCP
connection, and what the client runs for each connection it dials.  Above them the
tunnel is the same on every type — handshake, LAUNCH, relays, UDP sessions — because
the carrier hands a :class:`~nodepass.tunnel.connection.TunnelConnection` a transport
that behaves like a TCP one.

- ``type=0`` (TCP): the tunnel connection is the TCP connection's protocol.
- ``type=2`` (WebSocket): the tunnel port tells by its first bytes what arrives: the
  native preamble (``NPT``), an HTTP upgrade (``GET``), or a TLS ClientHello (0x16:
  ``wss``, TLS first, then the upgrade inside it); a dialing client opens the
  WebSocket (inside TLS when the session is TLS) at the server's ``path``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.timers import cancelled
from nodepass.tunnel import tls_transport
from nodepass.tunnel.channel import QuietFactory, peer_of, tune

SNIFF_TIMEOUT = 10.0
TLS_RECORD = 0x16


@implementer(IHalfCloseableProtocol)
class _Delegating(Protocol):
    """Hands every event of its transport to ``inner`` once there is one."""

    inner: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        if IHalfCloseableProtocol(self.inner, None) is not None:
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if IHalfCloseableProtocol(self.inner, None) is not None:
            self.inner.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def _hand_to(self, inner: Any, first: bytes = b"") -> None:
        self.inner = inner
        inner.makeConnection(self.transport)
        if first:
            inner.dataReceived(first)


class _Sniffer(_Delegating):
    """A connection on a ``type=2`` tunnel port, until its first bytes say what it is."""

    def __init__(self, tunnel: Any, native: Callable[[], Any], websocket: Any,
                 http2: Callable[[], Any] | None) -> None:
        self.tunnel = tunnel
        self.native = native
        self.websocket = websocket
        self.http2 = http2
        self.held = b""
        self.timer: Any = None

    def connectionMade(self) -> None:
        tune(self.transport)
        self.timer = self.tunnel.clock.callLater(SNIFF_TIMEOUT, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.held += data
        first = self.held[:1]
        if first and first[0] == TLS_RECORD and not getattr(self.transport, "tls_started",
                                                            False):
            if self.tunnel.credentials is None:
                self.tunnel.log.warn("tunnel connection from {peer} closed: TLS from a client "
                                     "to a tls=0 server", peer=peer_of(self.transport))
                self.transport.abortConnection()
                return
            held, self.held = self.held, b""
            tls_transport.start_tls(self.transport, self.tunnel.credentials.current()[0], True)
            self.transport.take_read(held)  # its plaintext comes back to us
            return
        if len(self.held) < 3:
            return
        self.timer = cancelled(self.timer)
        held, self.held = self.held, b""
        if held.startswith(b"NPT"):
            self._hand_to(self.native(), held)
        elif held.startswith(b"GET") and self.websocket is not None:
            self._hand_to(self.websocket.buildProtocol(self.transport.getPeer()), held)
        elif held.startswith(b"PRI") and self.http2 is not None:
            self._hand_to(self.http2(), held)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.timer = cancelled(self.timer)
        super().connectionLost(reason)


class _SniffingFactory(QuietFactory):
    def __init__(self, tunnel_factory: Factory, tunnel: Any, pool_type: int,
                 path: str) -> None:
        self.tunnel_factory = tunnel_factory
        self.tunnel = tunnel
        make_inner = lambda: tunnel_factory.protocol_class(*tunnel_factory.args)  # noqa: E731
        self.websocket: Any = None
        self.http2: Callable[[], Any] | None = None
        if pool_type == 2:
            from nodepass.tunnel import wsstream

            self.websocket = wsstream.server_factory(path, make_inner)
        else:
            from nodepass.tunnel.h2stream import H2Carrier

            self.http2 = lambda: H2Carrier(False, make_inner, path)

    def buildProtocol(self, addr: Any) -> Any:
        native = self.tunnel_factory.buildProtocol(addr)  # (refused while a flood lasts)
        if native is None:
            return None
        return _Sniffer(self.tunnel, lambda: native, self.websocket, self.http2)


def accepting(tunnel_factory: Factory, tunnel: Any, pool_type: int, path: str) -> Factory:
    """What the server's tunnel port runs for ``type=``."""
    if pool_type in (2, 3):
        return _SniffingFactory(tunnel_factory, tunnel, pool_type, path)
    return tunnel_factory


class _WebSocketDial(_Delegating):
    """A dialed connection that opens a WebSocket (inside TLS first when ``tls`` is a
    ClientTLS) and carries the tunnel connection ``make_inner()`` makes."""

    def __init__(self, tls: Any, host: str, port: int, path: str,
                 make_inner: Callable[[], Any]) -> None:
        self.tls = tls
        self.host, self.port, self.path = host, port, path
        self.make_inner = make_inner
        self.ready: Deferred[Any] = Deferred()  # the tunnel connection's own ``ready``
        self.tunnel_connection: Any = None

    def connectionMade(self) -> None:
        from nodepass.tunnel import wsstream

        tune(self.transport)
        if self.tls is not None:
            tls_transport.start_tls(self.transport, self.tls.context, False, self.tls.hostname,
                                    self.tls.describe, self.tls.session)
        factory = wsstream.client_factory(self.host, self.port, self.path,
                                          self.tls is not None, self.make_inner, self._carried)
        self._hand_to(factory.buildProtocol(self.transport.getPeer()))

    def _carried(self, inner: Any) -> None:
        """The WebSocket is open and carries ``inner``: its readiness is this dial's."""
        self.tunnel_connection = inner
        ready = getattr(inner, "ready", None)
        if ready is not None:
            ready.chainDeferred(self.ready)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.tunnel_connection is None and not self.ready.called:
            problem = (getattr(self.transport, "tls_problem", None)
                       or getattr(self.inner, "wasNotCleanReason", None))
            self.ready.errback(Failure(ConnectionError(
                problem or f"WebSocket closed before it opened ({reason.getErrorMessage()})")))


class WebSocketDialing(Factory):
    """Dials WebSockets; a WebSocket that closes before it opened is told to
    ``on_failure(why)`` when given (the control connection's, whose readiness nobody
    else waits for), else to whoever waits for the dial's ``ready``."""

    noisy = False

    def __init__(self, tls: Any, host: str, port: int, path: str,
                 make_inner: Callable[[], Any],
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.args = (tls, host, port, path, make_inner)
        self.on_failure = on_failure

    def buildProtocol(self, addr: Any) -> Any:
        dial = _WebSocketDial(*self.args)
        if self.on_failure is not None:
            report = self.on_failure
            dial.ready.addErrback(lambda reason: report(reason.getErrorMessage()))
        return dial
