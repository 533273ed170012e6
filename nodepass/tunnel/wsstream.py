"""The WebSocket pool transport (``type=2``): a tunnel connection carried in WebSocket
binary messages, with autobahn's Twisted protocols.

The tunnel's own byte stream (preamble, frames, relayed bytes) rides unchanged in
binary messages, one ``write`` each; an empty binary message is the end of one
direction (WebSocket has no half-close of its own); the WebSocket close is the
connection's close.  :class:`MessageStream` is the transport the tunnel connection
sees: it writes messages, delivers their payloads, and passes producer calls to the
TCP connection underneath, so backpressure works as on TCP.  Under TLS the WebSocket
runs inside the connection's TLS (``wss``), which the dialing end starts before the
HTTP upgrade and the accepting end recognises by its first byte.

autobahn is imported only by a process that uses this type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from nodepass.tunnel.tls_transport import CarriedTLS

MAX_MESSAGE = 1 << 20  # a write is at most 256 KiB: a larger message is not a tunnel's
_OPTIONS = {"maxFramePayloadSize": MAX_MESSAGE, "maxMessagePayloadSize": MAX_MESSAGE,
            "openHandshakeTimeout": 10, "closeHandshakeTimeout": 5, "autoPingInterval": 0,
            "perMessageCompressionAccept": lambda offers: None}


class MessageStream(CarriedTLS):
    """The transport a tunnel connection sees over one WebSocket."""

    bufferSize = 256 * 1024

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.carrier = websocket.transport  # the TCP (maybe TLS) connection underneath
        self.tcp_connection = self.carrier
        self.disconnecting = False
        self.write_closed = False
        self.connected = True

    # ITransport
    def write(self, data: bytes) -> None:
        if data and self.connected and not self.write_closed:
            self.websocket.sendMessage(bytes(data), isBinary=True)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def loseWriteConnection(self) -> None:
        if self.connected and not self.write_closed:
            self.write_closed = True
            self.websocket.sendMessage(b"", isBinary=True)

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting:
            self.disconnecting = True
            self.websocket.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.carrier.abortConnection()

    def getPeer(self) -> Any:
        return self.carrier.getPeer()

    def getHost(self) -> Any:
        return self.carrier.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.carrier.setTcpNoDelay(enabled)

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.carrier.setTcpKeepAlive(enabled)

    # IConsumer / IPushProducer: the TCP connection's own
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.carrier.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.carrier.unregisterProducer()

    def pauseProducing(self) -> None:
        self.carrier.pauseProducing()

    def resumeProducing(self) -> None:
        self.carrier.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()


class _Carrying:
    """What both ends' WebSocket protocols share: a tunnel connection inside."""

    inner: Any = None
    stream: MessageStream | None = None
    make_inner: Callable[[], Any]
    ended_reading = False
    # autobahn's own lines (a warning per failed upgrade, per attempt) stay out of the
    # log: a failure reaches it once, throttled, in nodepass's words (wasNotCleanReason)
    log = Logger(observer=lambda event: None)

    def _carry(self) -> None:
        self.stream = MessageStream(self)
        self.inner = self.make_inner()
        self.inner.makeConnection(self.stream)
        carried = getattr(self.factory, "carried", None)  # type: ignore[attr-defined]
        if carried is not None:
            carried(self.inner)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.inner is None or self.ended_reading:
            return
        if not isBinary:
            self.dropConnection(abort=True)  # type: ignore[attr-defined]
            return
        if payload:
            self.inner.dataReceived(payload)
            return
        self.ended_reading = True
        if IHalfCloseableProtocol(self.inner, None) is not None:
            self.inner.readConnectionLost()
        else:
            self.stream.loseConnection()  # type: ignore[union-attr]

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            if self.stream is not None:
                self.stream.connected = False
            why = ConnectionDone() if wasClean else ConnectionLost(f"WebSocket closed ({reason})")
            inner.connectionLost(Failure(why))


class TunnelServerWebSocket(_Carrying, WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        if request.path != self.factory.path:
            raise ConnectionDeny(404, "not found")

    def onOpen(self) -> None:
        self._carry()


class TunnelClientWebSocket(_Carrying, WebSocketClientProtocol):
    def onOpen(self) -> None:
        self._carry()


def _carrying(base: type, make_inner: Callable[[], Any]) -> type:
    """``base`` whose WebSockets, once open, carry ``make_inner()``."""
    return type(base.__name__, (base,), {"make_inner": staticmethod(make_inner)})


def server_factory(path: str, make_inner: Callable[[], Any]) -> WebSocketServerFactory:
    """Accepts WebSockets at ``path``; each carries ``make_inner()``."""
    factory = WebSocketServerFactory(server=None)  # no product banner
    factory.setProtocolOptions(webStatus=False, **_OPTIONS)  # no status page
    factory.path = path
    factory.noisy = False

    factory.protocol = _carrying(TunnelServerWebSocket, make_inner)
    return factory


def client_factory(host: str, port: int, path: str, secure: bool,
                   make_inner: Callable[[], Any],
                   carried: Callable[[Any], None] | None = None) -> WebSocketClientFactory:
    """Opens a WebSocket at ``path`` (``Host: host:port``) carrying ``make_inner()``;
    ``carried(inner)`` once it is open."""
    scheme = "wss" if secure else "ws"
    factory = WebSocketClientFactory(f"{scheme}://{host}:{port}{path}", useragent=None)
    factory.setProtocolOptions(**{k: v for k, v in _OPTIONS.items()
                                  if k != "perMessageCompressionAccept"})
    factory.noisy = False
    factory.carried = carried

    factory.protocol = _carrying(TunnelClientWebSocket, make_inner)
    return factory
