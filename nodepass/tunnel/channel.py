"""The base of every tunnel connection: frames in, protocol errors out.

A tunnel connection reads frames until it is launched; then its bytes belong to
a :class:`~nodepass.tunnel.relay.Relay`.  Anything malformed closes this one
connection and is logged; nothing else is disturbed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.tunnel import wire
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.wire import STREAM_TYPES, Frame, FrameDecoder, ProtocolError, Type
from nodepass.url import Address

HANDSHAKE_TIMEOUT = 10.0


def _text(address: Any, otherwise: str) -> str:
    host = getattr(address, "host", None)
    return str(Address(host, address.port)) if host is not None else otherwise


def peer_of(transport: Any) -> str:
    """The address at the other end of a connection, as ``host:port``."""
    peer = transport.getPeer()
    return _text(peer, str(peer))


def host_of(transport: Any) -> str:
    """The local address a user reached (for LAUNCH and the PROXY header)."""
    return _text(transport.getHost(), "")


READ_SIZE = 256 * 1024


def tune(transport: Any, keepalive: bool = True) -> None:
    """Low latency, large reads, and (for tunnel connections, which may sit idle in a
    pool) keepalive so a vanished peer is noticed."""
    # Twisted reads (and pauses producers) by bufferSize, 64 KiB by default: larger
    # reads mean fewer trips through the reactor per megabyte.
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE
    for setter in ("setTcpNoDelay", "setTcpKeepAlive") if keepalive else ("setTcpNoDelay",):
        method = getattr(transport, setter, None)
        if method is not None:
            try:
                method(True)
            except OSError:
                pass


class FramedConnection(RelayProtocol):
    """Reads frames and passes each to :meth:`frame_received` until launched."""

    expect_preamble = False
    log = logs.logger("nodepass")

    def __init__(self) -> None:
        self.decoder = FrameDecoder(self.expect_preamble)
        self.state = "new"
        self.stream: FrameDecoder | None = None  # set when a TLS stream is framed
        self.framing = True
        self.closed = False
        self.peer = "?"
        # Set when this connection was launched by the other end (see accept_launch).
        self.pending = b""
        self.eof_pending = False
        self.attempt: Any = None  # dialing the target for it
        self.udp: Any = None  # its UDP session, once it carries one

    def connectionMade(self) -> None:
        self.peer = peer_of(self.transport)
        tune(self.transport)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def before_relay_data(self, data: bytes) -> None:
        if not self.framing:
            self.raw_before_relay(data)
            return
        try:
            self.decoder.feed(data)
            while self.framing and not self.closed:
                frame = self.decoder.next_frame()
                if frame is None:
                    break
                self.frame_received(frame)
        except ProtocolError as e:
            self.protocol_error(str(e))

    def frame_received(self, frame: Frame) -> None:
        raise NotImplementedError

    def frame_stream(self) -> None:
        """After LAUNCH on a TLS tunnel: the byte stream travels in DATA/EOF frames,
        because Twisted's TLS transport cannot half-close."""
        self.stream = FrameDecoder(allowed=STREAM_TYPES)

    def readConnectionLost(self) -> None:
        if self.stream is not None:
            # Under TLS the stream's end is an EOF frame; a TCP-level end means the peer
            # is gone (its TLS layer closed).  Close ours too, or the socket lingers in
            # CLOSE-WAIT and the relay never ends.
            self.abort()
            return
        super().readConnectionLost()

    def relay_received(self, data: bytes) -> None:
        if self.stream is None:
            super().relay_received(data)
            return
        assert self.relay is not None
        try:
            self.stream.feed(data)
            while self.relay is not None and (frame := self.stream.next_frame()) is not None:
                if frame.type is Type.DATA:
                    self.relay.carry(self, frame.payload)
                else:
                    self.relay.read_closed(self)
        except ProtocolError as e:
            self.protocol_error(str(e))

    def send_stream(self, data: bytes) -> None:
        if self.stream is None:
            self.transport.write(data)
        else:
            self.transport.writeSequence(wire.stream_data(data))

    def end_stream(self) -> None:
        if self.stream is None:
            self.transport.loseWriteConnection()
        else:
            self.transport.write(wire.frame(Type.EOF))

    def tunnel_tls(self) -> bool:
        """Whether this connection runs under TLS (its stream is then framed)."""
        return False

    def accept_launch(self, payload: bytes) -> wire.Launch:
        """The other end launched this connection.  For TCP its bytes from here on are
        the user's stream: keep what arrives until the target is connected."""
        launch = wire.parse_launch(payload)
        if launch.proto is wire.Proto.TCP:
            self.state = "launched"
            self.framing = False
            if self.tunnel_tls():
                self.frame_stream()
            self.pending = self.decoder.rest()
            self.transport.pauseProducing()
        return launch

    def raw_before_relay(self, data: bytes) -> None:
        """Bytes after LAUNCH that arrive before the relay is joined."""
        if self.state == "launched":
            self.pending += data
        else:
            self.protocol_error("unexpected data")

    def protocol_error(self, message: str) -> None:
        self.log.warn("tunnel connection from {peer} closed: {why}", peer=self.peer,
                      why=message)
        self.abort()

    def close(self) -> None:
        self.closed = True
        self.transport.loseConnection()

    def abort(self) -> None:
        self.closed = True
        self.transport.abortConnection()

    def before_relay_eof(self) -> None:
        if self.state == "launched":
            self.eof_pending = True
        else:
            self.close()

    def before_relay_lost(self, reason: Failure) -> None:
        self.closed = True
        self.ended(reason)

    def ended(self, reason: Failure) -> None:
        """The connection is gone before (or without) being joined to a relay."""
        if self.attempt is not None:
            self.attempt.cancel()
        if self.udp is not None:
            self.udp.close()


class QuietFactory(Factory):
    """Builds ``protocol_class(*args)`` for each connection, without log noise."""

    noisy = False

    def __init__(self, protocol_class: Callable[..., Protocol], *args: Any) -> None:
        self.protocol_class = protocol_class
        self.args = args

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.protocol_class(*self.args)
        protocol.factory = self
        return protocol
