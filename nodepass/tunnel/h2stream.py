"""The HTTP/2 pool transport (``type=3``): every pooled data connection is a stream of
one HTTP/2 connection per session, with the sans-I/O ``h2`` library driven here.

A stream carries the tunnel's byte stream in DATA frames; END_STREAM is the end of one
direction, RST_STREAM an abort.  Flow control is the relays' backpressure: what a
stream's reader has not taken is not acknowledged (its window closes, the sender
stops), and a stream whose send window is closed holds what it is given and pauses
its producer until WINDOW_UPDATE.  One TCP (under TLS, one TLS) connection carries the
whole pool, so a new data connection costs a HEADERS frame and the tunnel's own
handshake, not a TCP and TLS handshake.

h2 is imported only by a process that uses this type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nodepass.tunnel import tls_transport
from nodepass.tunnel.channel import tune
from nodepass.tunnel.streams import CarriedStream, MultiplexedPool
from nodepass.tunnel.tls_transport import CarriedTLS

PREFACE = b"PRI * HTTP/2.0"
STREAM_WINDOW = 1 << 20  # what one stream may have in flight toward a reader
CONNECTION_WINDOW = 1 << 24
HELD_LIMIT = 256 * 1024  # held for a closed window before the producer is paused
# Streams at once on one connection, each a tunnel connection (a pool of up to 1,024
# idle ones plus the relays in use): enough for a busy tunnel, and a bound on what one
# connection can make a server hold before any key is shown (each stream's handshake
# must also end within 10 s).
MAX_STREAMS = 8192
_SETTINGS = {
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 16,
    h2.settings.SettingCodes.ENABLE_PUSH: 0,
}


class StreamTransport(CarriedStream, CarriedTLS):
    """The transport a tunnel connection sees over one HTTP/2 stream."""

    def __init__(self, carrier: H2Carrier, stream_id: int) -> None:
        super().__init__(carrier, stream_id)
        self.tcp_connection = carrier.transport
        self.held: list[bytes] = []  # waiting for the send window
        self.held_size = 0
        self.end_after_held = False
        self.end_sent = False
        self.read_closed = False  # the peer's END_STREAM was dispatched to ``inner``

    # ITransport
    def write(self, data: bytes) -> None:
        if not data or not self.connected or self.write_closed:
            return
        self.held.append(bytes(data))
        self.held_size += len(data)
        self.carrier.flush(self)
        if self.held_size > HELD_LIMIT and self.producer is not None:
            self.producer.pauseProducing()

    def loseWriteConnection(self) -> None:
        if self.connected and not self.write_closed:
            self.write_closed = True
            self.end_after_held = True
            self.carrier.flush(self)

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting:
            self.disconnecting = True
            self.loseWriteConnection()
            self.carrier.close_later(self)

    def getPeer(self) -> Any:
        return self.carrier.transport.getPeer()

    def getHost(self) -> Any:
        return self.carrier.transport.getHost()

    def _sent_all(self) -> None:
        if self.producer is not None and self.held_size <= HELD_LIMIT // 2:
            self.producer.resumeProducing()


class H2Carrier(Protocol):
    """One HTTP/2 connection and its streams, at either end."""

    def __init__(self, client_side: bool, make_inner: Callable[[], Any], path: str,
                 authority: str = "") -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True))
        self.client_side = client_side
        self.make_inner = make_inner
        self.path = path.encode()
        self.authority = authority.encode()
        self.streams: dict[int, StreamTransport] = {}
        self.closing: set[int] = set()
        self.lost = False
        self.idle_close = False

    # -- the connection ----------------------------------------------------

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(_SETTINGS)  # (in force once the peer acknowledges them)
        self.h2.increment_flow_control_window(CONNECTION_WINDOW)
        self._send()

    def dataReceived(self, data: bytes) -> None:
        try:
            for event in self.h2.receive_data(data):
                self._event(event)
        except h2.exceptions.ProtocolError:
            self._send()  # (h2's GOAWAY, when it has one)
            self.transport.loseConnection()
            return
        self._send()

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._end_stream(stream, Failure(ConnectionLost("HTTP/2 connection lost")))

    def close_when_idle(self) -> None:
        """Close once no stream is left (now, if none is)."""
        self.idle_close = True
        if not self.streams:
            self.transport.loseConnection()

    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    # -- streams -----------------------------------------------------------

    def open_stream(self) -> Any:
        """Client: a new stream, its tunnel connection made (and returned)."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(b":method", b"POST"), (b":path", self.path),
                                         (b":scheme", b"https"),
                                         (b":authority", self.authority)])
        return self._carry(stream_id)

    def _carry(self, stream_id: int) -> Any:
        stream = self.streams[stream_id] = StreamTransport(self, stream_id)
        inner = stream.inner = self.make_inner()
        inner.makeConnection(stream)
        self._send()
        return inner

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.client_side:
                return  # (push is off; a server's request means nothing to a client)
            headers = dict(event.headers)
            if headers.get(b":path") != self.path or headers.get(b":method") != b"POST":
                self.h2.send_headers(event.stream_id, [(b":status", b"404")], end_stream=True)
                return
            self.h2.send_headers(event.stream_id, [(b":status", b"200")])
            self._carry(event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers).get(b":status")
            if status != b"200" and (stream := self.streams.get(event.stream_id)):
                self._end_stream(stream, Failure(ConnectionLost(f"HTTP/2 status {status!r}")))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.unacknowledged += event.flow_controlled_length
            if event.data:
                stream.inner.dataReceived(event.data)
            self.acknowledge(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.read_closed = True
                if IHalfCloseableProtocol(stream.inner, None) is not None:
                    stream.inner.readConnectionLost()
                else:
                    stream.loseConnection()
                self._maybe_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._end_stream(stream, Failure(ConnectionLost("stream reset")))
        elif isinstance(event, h2.events.WindowUpdated):
            targets = (self.streams.values() if event.stream_id == 0
                       else [s for s in [self.streams.get(event.stream_id)] if s])
            for stream in list(targets):
                self.flush(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.transport.loseConnection()

    def flush(self, stream: StreamTransport) -> None:
        """Send what the stream holds, as far as the windows allow; then its END_STREAM."""
        if stream.stream_id not in self.streams or self.lost:
            return
        sid = stream.stream_id
        try:
            while stream.held:
                window = min(self.h2.local_flow_control_window(sid),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = stream.held[0]
                piece, rest = chunk[:window], chunk[window:]
                self.h2.send_data(sid, piece)
                stream.held_size -= len(piece)
                if rest:
                    stream.held[0] = rest
                else:
                    stream.held.pop(0)
            if not stream.held and stream.end_after_held:
                stream.end_after_held = False
                self.h2.end_stream(sid)
                stream.end_sent = True
        except h2.exceptions.ProtocolError:  # the stream closed or was reset meanwhile
            stream.held.clear()
            stream.held_size = 0
            stream.end_after_held = False
        self._send()
        if not stream.held:
            stream._sent_all()
        self._maybe_done(stream)

    def acknowledge(self, stream: StreamTransport) -> None:
        if stream.paused or not stream.unacknowledged or self.lost:
            return
        amount, stream.unacknowledged = stream.unacknowledged, 0
        try:
            self.h2.acknowledge_received_data(amount, stream.stream_id)
        except h2.exceptions.ProtocolError:
            pass  # the stream is gone: nothing to acknowledge for
        self._send()

    def close_later(self, stream: StreamTransport) -> None:
        self.closing.add(stream.stream_id)
        self._maybe_done(stream)

    def reset(self, stream: StreamTransport) -> None:
        if stream.stream_id in self.streams:
            try:
                self.h2.reset_stream(stream.stream_id)
            except h2.exceptions.ProtocolError:
                pass
            self._send()
            self._end_stream(stream, Failure(ConnectionLost("aborted")))

    def _maybe_done(self, stream: StreamTransport) -> None:
        """A stream closed both ways (or asked to close, with nothing held) is over.

        Judged by what was sent and what was dispatched, not by h2's stream state:
        ``receive_data`` applies every frame of a read before its events are
        dispatched, so a WINDOW_UPDATE dispatched first would find the stream closed
        while its DATA and END_STREAM, in the same read, are still to come (and
        dropped, the stream gone).  A reset to come ends it with its own event."""
        sid = stream.stream_id
        if sid not in self.streams or not stream.read_closed:
            return
        if stream.end_sent or (sid in self.closing and not stream.held
                               and not stream.end_after_held):
            self._end_stream(stream, Failure(ConnectionDone()))

    def _end_stream(self, stream: StreamTransport, reason: Failure) -> None:
        self.streams.pop(stream.stream_id, None)
        self.closing.discard(stream.stream_id)
        if stream.connected:
            stream.connected = False
            stream.inner.connectionLost(reason)
        if self.idle_close and not self.streams and not self.lost:
            self.transport.loseConnection()


class _H2Dial(Protocol):
    """The client's HTTP/2 connection: TLS first when ``tls`` is given, then HTTP/2."""

    def __init__(self, tls: Any, carrier: H2Carrier) -> None:
        self.tls = tls
        self.carrier = carrier

    def connectionMade(self) -> None:
        tune(self.transport)
        if self.tls is not None:
            tls_transport.start_tls(self.transport, self.tls.context, False, self.tls.hostname,
                                    self.tls.describe, self.tls.session)
        self.carrier.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.carrier.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.carrier.connectionLost(reason)


class Http2Pool(MultiplexedPool):
    """A client session's data connections as streams of one HTTP/2 connection
    (``type=3``), dialed through ``endpoint`` (inside TLS when ``tls`` is given)."""

    name = "HTTP/2"
    stream_errors = (h2.exceptions.H2Error,)

    def __init__(self, endpoint: Any, tls: Any, authority: str, path: str,
                 make_inner: Callable[[], Any]) -> None:
        super().__init__(make_inner)
        self.endpoint = endpoint
        self.tls = tls
        self.authority, self.path = authority, path

    def _connect(self) -> None:
        carrier = H2Carrier(True, self.make_inner, self.path, self.authority)
        factory = Factory.forProtocol(lambda: _H2Dial(self.tls, carrier))
        factory.noisy = False
        self.endpoint.connect(factory).addCallbacks(lambda _: self._up(carrier), self._failed)
