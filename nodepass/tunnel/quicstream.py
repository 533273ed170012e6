"""The QUIC pool transport (``type=1``): every pooled data connection is a stream of
one QUIC connection per session, with the sans-I/O core of ``aioquic`` driven here by
a Twisted ``DatagramProtocol`` and the reactor's clock.

The control connection stays TCP (under TLS); once the session is up the client opens
one QUIC connection to the same port number over UDP and a bidirectional stream per
data connection, in which the tunnel's own handshake (proving the key, bound to the
certificate QUIC's TLS 1.3 showed) runs as on every type.  A stream's FIN is the end
of one direction, RESET_STREAM / STOP_SENDING an abort.

Flow control is the relays' backpressure: a stream's receive window moves with what
its reader has taken (aioquic alone would double it as data arrives, whatever the
reader does), and a stream whose unacknowledged send buffer passes HELD_LIMIT pauses
its producer until acknowledgements bring it under half.

UDP sessions ride on streams like every other data connection: their datagrams are
framed and ordered as on TCP; QUIC DATAGRAM frames would fit one packet (~1.2 KB), not
the 64 KiB a UDP target may send, and would make the tunnel's UDP path differ by type.

aioquic is imported only by a process that uses this type.  The module reaches into
two of its internals (the stream-limit writer and the sender's buffer), so setup.py
pins aioquic's major version.
"""

from __future__ import annotations

import ssl
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

if sys.modules.get("OpenSSL", 0) is None:  # hidden from Twisted (tap._without_pyopenssl);
    del sys.modules["OpenSSL"]  # aioquic verifies certificates with it

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicFrameType,
)
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.timers import cancelled
from nodepass.tunnel.attempts import source_of
from nodepass.tunnel.streams import CarriedStream, MultiplexedPool

ALPN = "nodepass"
STREAM_WINDOW = 2 << 20  # what one stream may have in flight toward a reader
CONNECTION_WINDOW = 1 << 24
# Unacknowledged bytes on a stream before its producer pauses: a full window in flight
# and a little queued, so a long path (window / round trip) is not capped below it.
HELD_LIMIT = STREAM_WINDOW + 256 * 1024
MAX_STREAMS = 8192  # streams at once on one connection (as HTTP/2's, same reasons)
MAX_DATAGRAM = 1350  # fits the usual 1,500-byte paths with room for tunnels under us
IDLE_TIMEOUT = 60.0
DRAIN_LIMIT = 10.0  # an idle connection closing waits this long for acknowledgements
NEW_STREAMS = 1024  # streams a peer may open per HANDSHAKE_TIMEOUT
KEEPALIVE = IDLE_TIMEOUT / 3
HANDSHAKE_TIMEOUT = 10.0
CID_LENGTH = 8
MIN_INITIAL = 1200  # RFC 9000: a client's Initial packet fills at least this
SOCKET_BUFFER = 4 << 20
# Per source address: QUIC connections the server keeps, and of them still in their
# TLS handshake.  A client needs one per session; the rest is room for a reconnect.
PER_SOURCE = 8
HANDSHAKING_PER_SOURCE = 4
HANDSHAKING = 64  # QUIC handshakes under way at once, from all sources
NO_ERROR, ABORTED = 0, 1


class _Connection(QuicConnection):
    """aioquic's connection whose windows move with what our readers took — per stream
    and for the connection — where aioquic alone would double them as data arrives,
    read or not (a peer could then make us buffer without bound)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local_max_streams_bidi.value = MAX_STREAMS
        self._local_max_streams_uni.value = self._local_max_streams_uni.sent = 0  # unused
        self.taken: dict[int, int] = {}  # stream id -> bytes its reader has taken
        self.total_taken = 0

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        limit = self._local_max_data
        wanted = self.total_taken + CONNECTION_WINDOW
        if wanted - limit.value >= CONNECTION_WINDOW // 2:
            limit.value = wanted
        used, limit.used = limit.used, 0  # (so that aioquic does not double it)
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if not stream.max_stream_data_local:
            return
        taken = self.taken.get(stream.stream_id)
        wanted = (taken or 0) + STREAM_WINDOW
        if taken is not None and wanted - stream.max_stream_data_local >= STREAM_WINDOW // 2:
            stream.max_stream_data_local = wanted  # (a stream not carried never grows)
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(QuicFrameType.MAX_STREAM_DATA,
                                      capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                                      handler=self._on_max_stream_data_delivery,
                                      handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def unsent(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def peer_certificate(self) -> bytes | None:
        cert = getattr(self.tls, "_peer_certificate", None) if self.tls else None
        return cert.public_bytes(Encoding.DER) if cert is not None else None


def _configuration(client_side: bool, **tls: Any) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=client_side, alpn_protocols=[ALPN], connection_id_length=CID_LENGTH,
        idle_timeout=IDLE_TIMEOUT, max_datagram_size=MAX_DATAGRAM,
        max_data=CONNECTION_WINDOW, max_stream_data=STREAM_WINDOW,
        congestion_control_algorithm="cubic", **tls)


def server_configuration(credentials: Any) -> QuicConfiguration:
    """What the server answers with: the tunnel's current certificate and key."""
    return _configuration(False, certificate=credentials.leaf,
                          certificate_chain=list(credentials.chain[1:]),
                          private_key=credentials.key)


def client_configuration(tls_mode: int, server_name: str, ca_path: str | None
                         ) -> QuicConfiguration:
    """tls=1: any certificate (the tunnel handshake pins the one shown); tls=2: the
    chain against ``ca_path`` or the system's trust store, and the name."""
    if tls_mode < 2:
        return _configuration(True, server_name=server_name, verify_mode=ssl.CERT_NONE)
    if ca_path is None:
        paths = ssl.get_default_verify_paths()
        return _configuration(True, server_name=server_name, verify_mode=ssl.CERT_REQUIRED,
                              cafile=paths.cafile, capath=paths.capath)
    return _configuration(True, server_name=server_name, verify_mode=ssl.CERT_REQUIRED,
                          cafile=ca_path)


def _address(host: str, port: int) -> Any:
    return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)


class StreamTransport(CarriedStream):
    """The transport a tunnel connection sees over one QUIC stream."""

    carrier_tls = True  # QUIC is TLS 1.3 from its first packet

    def __init__(self, carrier: QuicCarrier, stream_id: int) -> None:
        super().__init__(carrier, stream_id)
        self.read_closed = False
        self.producer_paused = False  # by us, for acknowledgements to come

    # ITransport
    def write(self, data: bytes) -> None:
        if data and self.connected and not self.write_closed:
            self.carrier.send(self, bytes(data))

    def loseWriteConnection(self) -> None:
        if self.connected and not self.write_closed:
            self.write_closed = True
            self.carrier.send(self, b"", end=True)

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting:
            self.disconnecting = True
            self.loseWriteConnection()
            self.carrier.stop_reading(self)

    def getPeer(self) -> Any:
        return _address(*self.carrier.peer[:2])

    def getHost(self) -> Any:
        return self.carrier.host()

    def peer_certificate(self) -> bytes | None:
        return self.carrier.quic.peer_certificate()

    def tls_session(self) -> None:
        return None

    def tls_resumed(self) -> bool:
        return False


class QuicCarrier:
    """One QUIC connection and its streams, at either end.

    ``send(datagram, address)`` puts a packet on the wire; ``make_inner()`` makes the
    tunnel connection a new stream carries; ``on_cid(cid, issued)`` and ``on_gone()``
    tell a server's listener which connection IDs lead here and when it is over.
    """

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, quic: _Connection, peer: Any,
                 send: Callable[[bytes, Any], None], make_inner: Callable[[], Any],
                 host: Callable[[], Any],
                 on_cid: Callable[[bytes, bool], None] = lambda cid, issued: None,
                 on_gone: Callable[[], None] = lambda: None) -> None:
        self.reactor = reactor
        self.quic = quic
        self.peer = peer
        self._send = send
        self.make_inner = make_inner
        self.host = host
        self.on_cid = on_cid
        self.on_gone = on_gone
        self.streams: dict[int, StreamTransport] = {}
        self.ended: set[int] = set()  # streams over for us that aioquic may still hold
        self.blocked: set[StreamTransport] = set()  # producers paused for acknowledgements
        self.timer: Any = None
        self.flush_call: Any = None
        self.drain_timer: Any = None
        self.opened: deque[float] = deque()  # when the peer's recent streams opened
        self.handshake_timer: Any = None
        self.keepalive: Any = None
        self.ready: Deferred[QuicCarrier] = Deferred()  # the TLS handshake ended
        self.problem = ""  # why the connection ended, when it did with an error
        self.lost = False
        self.idle_close = False

    # -- the connection ------------------------------------------------------

    def connect(self) -> None:
        """Client: start the handshake; give up after HANDSHAKE_TIMEOUT."""
        self.quic.connect(self.peer, now=self.reactor.seconds())
        self.handshake_timer = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_late)
        self.keepalive = self.reactor.callLater(KEEPALIVE, self._ping)
        self.transmit()

    def _ping(self) -> None:
        """Client: an idle pool must not let QUIC's idle timeout end the connection."""
        self.quic.send_ping(0)
        self.transmit()
        self.keepalive = self.reactor.callLater(KEEPALIVE, self._ping)

    def _handshake_late(self) -> None:
        self.handshake_timer = None
        self.problem = (f"no QUIC handshake in {HANDSHAKE_TIMEOUT:g}s (is UDP port "
                        f"{self.peer[1]} open on the way to the server?)")
        self.close(ABORTED, "handshake timeout")
        self._terminated()

    def datagram(self, data: bytes, address: Any) -> None:
        self.quic.receive_datagram(data, address, now=self.reactor.seconds())
        try:
            self._process()
        finally:  # (whatever a tunnel connection raised, QUIC's own work goes on)
            self.transmit()

    def transmit(self) -> None:
        self.flush_call = cancelled(self.flush_call)
        now = self.reactor.seconds()
        for data, address in self.quic.datagrams_to_send(now=now):
            self._send(data, address)
        at = self.quic.get_timer()
        self.timer = cancelled(self.timer)
        if at is not None and not self.lost:
            self.timer = self.reactor.callLater(max(0.0, at - now), self._timer_fired)

    def _transmit_soon(self) -> None:
        """Writes within one reactor turn go out together."""
        if self.flush_call is None and not self.lost:
            self.flush_call = self.reactor.callLater(0, self.transmit)

    def _timer_fired(self) -> None:
        self.timer = None
        self.quic.handle_timer(now=self.reactor.seconds())
        try:
            self._process()
        finally:
            self.transmit()

    def close(self, code: int = NO_ERROR, reason: str = "") -> None:
        if not self.lost:
            self.quic.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def close_when_idle(self) -> None:
        """Close once no stream is left and what was written is acknowledged (a
        CONNECTION_CLOSE would drop what is still unacknowledged), or after DRAIN_LIMIT."""
        self.idle_close = True
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if not self.idle_close or self.streams or self.lost:
            return
        if all(s.sender.is_finished for s in self.quic._streams.values()):
            self.drain_timer = cancelled(self.drain_timer)
            self.close()
        elif self.drain_timer is None:
            self.drain_timer = self.reactor.callLater(DRAIN_LIMIT, self.close)

    def _may_open(self) -> bool:
        """A peer's new stream is a tunnel connection that must prove the key within
        HANDSHAKE_TIMEOUT: at most NEW_STREAMS of them per such period, so streams
        cannot be a way around the limits on unauthenticated work."""
        now = self.reactor.seconds()
        while self.opened and self.opened[0] <= now - HANDSHAKE_TIMEOUT:
            self.opened.popleft()
        if len(self.opened) >= NEW_STREAMS:
            return False
        self.opened.append(now)
        return True

    def _refuse_stream(self, sid: int) -> None:
        self.ended.add(sid)
        try:
            self.quic.reset_stream(sid, ABORTED)
            self.quic.stop_stream(sid, ABORTED)
        except ValueError:
            pass

    def _process(self) -> None:
        while (event := self.quic.next_event()) is not None:
            self._event(event)
        self._close_if_drained()
        for stream in [s for s in self.blocked
                       if self.quic.unsent(s.stream_id) <= HELD_LIMIT // 2]:
            self.blocked.discard(stream)
            stream.producer_paused = False
            if stream.producer is not None:
                stream.producer.resumeProducing()

    def _event(self, event: Any) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, events.StopSendingReceived):
            # the peer reads no more (it closed): our writing ends (aioquic resets it),
            # what it still sends us is read to its end
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.write_closed = True
                self.blocked.discard(stream)
                self._maybe_done(stream)
        elif isinstance(event, events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                try:
                    self.quic.reset_stream(event.stream_id, ABORTED)
                except ValueError:
                    pass
                self._end_stream(stream, Failure(ConnectionLost("stream reset")))
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_timer = cancelled(self.handshake_timer)
            if not self.ready.called:
                self.ready.callback(self)
        elif isinstance(event, events.ConnectionIdIssued):
            self.on_cid(event.connection_id, True)
        elif isinstance(event, events.ConnectionIdRetired):
            self.on_cid(event.connection_id, False)
        elif isinstance(event, events.ConnectionTerminated):
            if event.error_code != NO_ERROR and not self.problem:
                self.problem = event.reason_phrase or f"QUIC error {event.error_code:#x}"
            self._terminated()

    def _terminated(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.timer = cancelled(self.timer)
        self.flush_call = cancelled(self.flush_call)
        self.handshake_timer = cancelled(self.handshake_timer)
        self.keepalive = cancelled(self.keepalive)
        self.drain_timer = cancelled(self.drain_timer)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._end_stream(stream, Failure(ConnectionLost("QUIC connection lost")))
        if not self.ready.called:
            self.ready.errback(Failure(ConnectionError(
                self.problem or "QUIC connection closed before its handshake ended")))
        self.on_gone()

    # -- streams -------------------------------------------------------------

    def open_stream(self) -> Any:
        """Client: a new stream, its tunnel connection made (and returned)."""
        stream_id = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(stream_id, b"")  # (makes the stream)
        return self._carry(stream_id)

    def _carry(self, stream_id: int) -> Any:
        stream = self.streams[stream_id] = StreamTransport(self, stream_id)
        self.quic.taken[stream_id] = 0
        inner = stream.inner = self.make_inner()
        inner.makeConnection(stream)
        self._transmit_soon()
        return inner

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            if self.quic.configuration.is_client or sid in self.ended or sid % 4 != 0:
                return  # (over for us; what still comes is dropped)
            if not self._may_open():
                self._refuse_stream(sid)
                return
            self._carry(sid)
            stream = self.streams.get(sid)
            if stream is None:
                return  # (its tunnel connection closed at once)
        if event.data:
            if stream.read_closed:
                return
            stream.unacknowledged += len(event.data)
            stream.inner.dataReceived(event.data)
            self.acknowledge(stream)
        if event.end_stream and sid in self.streams and not stream.read_closed:
            stream.read_closed = True
            if IHalfCloseableProtocol(stream.inner, None) is not None:
                stream.inner.readConnectionLost()
            else:
                stream.loseConnection()
            self._maybe_done(stream)

    def send(self, stream: StreamTransport, data: bytes, end: bool = False) -> None:
        if self.lost or stream.stream_id not in self.streams:
            return
        try:
            self.quic.send_stream_data(stream.stream_id, data, end_stream=end)
        except (ValueError, AssertionError):  # the stream was reset or finished meanwhile
            return
        if (not stream.producer_paused and stream.producer is not None
                and self.quic.unsent(stream.stream_id) > HELD_LIMIT):
            stream.producer_paused = True
            self.blocked.add(stream)
            stream.producer.pauseProducing()
        self._transmit_soon()
        if end:
            self._maybe_done(stream)

    def acknowledge(self, stream: StreamTransport) -> None:
        """What the stream's reader took widens its window (unless it is paused)."""
        if stream.paused or not stream.unacknowledged:
            return
        amount, stream.unacknowledged = stream.unacknowledged, 0
        if stream.stream_id in self.quic.taken:
            self.quic.taken[stream.stream_id] += amount
            self.quic.total_taken += amount
            self._transmit_soon()

    def stop_reading(self, stream: StreamTransport) -> None:
        """The stream closes both ways: the peer is asked to stop sending."""
        if not stream.read_closed and not self.lost:
            stream.read_closed = True
            try:
                self.quic.stop_stream(stream.stream_id, NO_ERROR)
            except ValueError:
                pass
        self._maybe_done(stream)

    def reset(self, stream: StreamTransport) -> None:
        if stream.stream_id in self.streams and not self.lost:
            try:
                self.quic.reset_stream(stream.stream_id, ABORTED)
                if not stream.read_closed:
                    self.quic.stop_stream(stream.stream_id, ABORTED)
            except ValueError:
                pass
            self._transmit_soon()
            self._end_stream(stream, Failure(ConnectionLost("aborted")))

    def _maybe_done(self, stream: StreamTransport) -> None:
        if stream.write_closed and stream.read_closed:
            self._end_stream(stream, Failure(ConnectionDone()))

    def _end_stream(self, stream: StreamTransport, reason: Failure) -> None:
        sid = stream.stream_id
        if self.streams.pop(sid, None) is not None:
            self.ended.add(sid)
            if len(self.ended) > 1024:  # aioquic dropped these: nothing more comes
                self.ended = {s for s in self.ended if s in self.quic._streams}
        self.quic.taken.pop(sid, None)
        self.blocked.discard(stream)
        if stream.connected:
            stream.connected = False
            stream.inner.connectionLost(reason)
        self._close_if_drained()


class _ClientPort(DatagramProtocol):
    """The client's UDP socket for one QUIC connection."""

    def __init__(self, carrier_for: Callable[[], QuicCarrier | None]) -> None:
        self.carrier_for = carrier_for
        self.port: Any = None

    def startProtocol(self) -> None:
        self.port = self.transport

    def stopProtocol(self) -> None:
        self.port = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        carrier = self.carrier_for()
        if carrier is not None and not carrier.lost:
            carrier.datagram(data, addr)


def _sender(protocol: Any) -> Callable[[bytes, Any], None]:
    def send(data: bytes, address: Any) -> None:
        if protocol.port is None:
            return  # (the socket is closed)
        try:
            protocol.port.write(data, address)
        except OSError:
            pass  # a full socket buffer drops the packet, as a router would; QUIC resends
    return send


def _bigger_buffers(transport: Any) -> None:
    import socket

    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            transport.socket.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


class QuicPool(MultiplexedPool):
    """A client session's data connections as streams of one QUIC connection
    (``type=1``) from a UDP socket of its own to ``server``."""

    name = "QUIC"
    stream_errors = (ValueError,)

    def __init__(self, reactor: Any, server: tuple[str, int], configuration: Callable[[], Any],
                 make_inner: Callable[[], Any]) -> None:
        super().__init__(make_inner)
        self.reactor = reactor
        self.server = server
        self.configuration = configuration
        self.handshaking: QuicCarrier | None = None

    def _connect(self) -> None:
        host, port = self.server
        protocol = _ClientPort(lambda: carrier)
        try:
            udp = self.reactor.listenUDP(0, protocol, interface="::" if ":" in host else "")
        except OSError as e:
            self._failed(Failure(ConnectionError(f"no UDP socket for QUIC: {e}")))
            return
        _bigger_buffers(udp)
        carrier = QuicCarrier(self.reactor, _Connection(configuration=self.configuration()),
                              (host, port), _sender(protocol), self.make_inner,
                              udp.getHost, on_gone=udp.stopListening)
        self.handshaking = carrier
        carrier.ready.addCallbacks(self._up, self._failed)
        carrier.connect()

    def _up(self, carrier: Any) -> None:
        self.handshaking = None
        super()._up(carrier)

    def _failed(self, reason: Failure) -> None:
        self.handshaking = None
        super()._failed(reason)

    def close(self) -> None:
        super().close()
        if self.handshaking is not None:  # its dials fail now, not after QUIC's timers
            self.handshaking.close(ABORTED, "session closed")
            self.handshaking._terminated()


class QuicListener(DatagramProtocol):
    """The server's tunnel port over UDP: QUIC connections by connection ID, each a
    :class:`QuicCarrier` whose streams are tunnel connections.

    A new connection is taken only while a client session is up, only from an Initial
    packet of full size, and within PER_SOURCE / HANDSHAKING_PER_SOURCE per source
    address: a flood from one address costs a header parse per packet, and is logged
    once a minute.
    """

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, tunnel: Any, make_inner: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.tunnel = tunnel
        self.make_inner = make_inner
        self.by_cid: dict[bytes, QuicCarrier] = {}
        self.by_source: dict[str, list[QuicCarrier]] = {}
        self.port: Any = None
        self.refused = 0
        self._throttle = logs.Throttle(reactor, 60.0)

    def startProtocol(self) -> None:
        self.port = self.transport  # (kept: doStop forgets it before stopProtocol)
        _bigger_buffers(self.transport)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        carrier = self.by_cid.get(header.destination_cid)
        if carrier is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL:
                return
            carrier = self._accept(header, addr)
            if carrier is None:
                return
        carrier.datagram(data, addr)

    def _accept(self, header: Any, addr: Any) -> QuicCarrier | None:
        host = addr[0]
        configuration = server_configuration(self.tunnel.credentials.credentials)
        if header.version not in configuration.supported_versions:
            return None  # (no state, and no answer, for a version we do not speak)
        source = source_of(host)
        why = self._refusal(host, source)
        if why is not None:
            self.refused += 1
            if self._throttle.allow() is not None:
                self.log.warn("refused QUIC connections from {host}: {why}", host=host, why=why)
            return None
        quic = _Connection(configuration=configuration,
                           original_destination_connection_id=header.destination_cid)
        carrier: QuicCarrier

        def on_cid(cid: bytes, issued: bool) -> None:
            if issued:
                self.by_cid[cid] = carrier
            elif self.by_cid.get(cid) is carrier:
                del self.by_cid[cid]

        carrier = QuicCarrier(self.reactor, quic, addr, _sender(self), self.make_inner,
                              self.transport.getHost, on_cid,
                              lambda: self._gone(carrier, source))
        carrier.handshake_timer = self.reactor.callLater(HANDSHAKE_TIMEOUT,
                                                         carrier._handshake_late)
        carrier.ready.addErrback(lambda _: None)  # (a failed handshake is just gone)
        self.by_cid[header.destination_cid] = carrier
        self.by_cid[quic.host_cid] = carrier
        self.by_source.setdefault(source, []).append(carrier)
        return carrier

    def _refusal(self, host: str, source: str) -> str | None:
        if self.tunnel.session is None:
            return "no client session is up (the pool follows a session)"
        if self.tunnel.attempts.saturated(host) and not self.tunnel.session_host(host):
            return "over its key-attempt limits"
        handshaking_all = sum(1 for carriers in self.by_source.values() for c in carriers
                              if not c.ready.called)
        if handshaking_all >= HANDSHAKING:
            return f"{handshaking_all} QUIC handshakes under way in all"
        carriers = self.by_source.get(source, [])
        if len(carriers) >= PER_SOURCE:
            return f"{len(carriers)} connections from it already"
        handshaking = sum(1 for c in carriers if not c.ready.called)
        if handshaking >= HANDSHAKING_PER_SOURCE:
            return f"{handshaking} handshakes from it under way"
        return None

    def _gone(self, carrier: QuicCarrier, source: str) -> None:
        for cid in [c for c, held in self.by_cid.items() if held is carrier]:
            del self.by_cid[cid]
        carriers = self.by_source.get(source, [])
        if carrier in carriers:
            carriers.remove(carrier)
        if not carriers:
            self.by_source.pop(source, None)

    def stopProtocol(self) -> None:
        """The port closes (the socket still sends): every connection is closed."""
        for carriers in list(self.by_source.values()):
            for carrier in list(carriers):
                carrier.close(NO_ERROR, "server stopping")
                carrier._terminated()
        self.port = None
