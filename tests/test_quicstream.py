"""quicstream in memory: a client's QuicPool and a server's QuicListener joined by a
pump of datagrams, on a Clock (aioquic is sans-I/O: its time is the one we pass)."""

from __future__ import annotations

import datetime

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nodepass.tls import make_self_signed
from nodepass.tunnel import quicstream
from nodepass.tunnel.quicstream import (
    HELD_LIMIT,
    STREAM_WINDOW,
    QuicCarrier,
    QuicListener,
    _Connection,
    client_configuration,
)

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 50000)
CREDENTIALS = make_self_signed(datetime.datetime.now(datetime.UTC))


@implementer(IHalfCloseableProtocol)
class Inner(Protocol):
    """What a stream carries: records what arrives, and its end."""

    def __init__(self) -> None:
        self.ready: Deferred[Inner] = Deferred()
        self.received = bytearray()
        self.read_closed = False
        self.lost: list = []

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class Port:
    """A UDP port that keeps what is written to it."""

    def __init__(self, host) -> None:
        self.host = host
        self.sent: list = []

    def write(self, data: bytes, address) -> None:
        self.sent.append((data, address))

    def getHost(self):
        return self.host


class Tunnel:
    """What QuicListener asks of a server tunnel."""

    def __init__(self) -> None:
        self.session = object()
        self.credentials = type("C", (), {"credentials": CREDENTIALS})()
        self.attempts = type("A", (), {"saturated": staticmethod(lambda host: False)})()

    def session_host(self, host: str) -> bool:
        return host == CLIENT[0]


class Pair:
    """A client carrier and a server listener, datagrams moved by :meth:`pump`."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.clock = Clock()
        self.server_inners: list[Inner] = []
        self.tunnel = Tunnel()
        self.listener = QuicListener(self.clock, self.tunnel, self._server_inner)
        self.server_port = Port(SERVER)
        self.listener.transport = self.server_port
        self.listener.startProtocol = lambda: None
        self.listener.port = self.server_port
        self.client_out: list = []
        self.client = QuicCarrier(
            self.clock, _Connection(configuration=client_configuration(1, "x", None)), SERVER,
            lambda data, address: self.client_out.append(data), Inner, lambda: CLIENT)

    def _server_inner(self) -> Inner:
        inner = Inner()
        self.server_inners.append(inner)
        return inner

    def pump(self, limit: int = 5000) -> None:
        """Move datagrams until neither end has any to send; time advances by 1 ms
        when none moved (aioquic paces its packets, and its timers run on this clock)."""
        for _ in range(limit):
            moved = bool(self.client_out or self.server_port.sent)
            while self.client_out:
                self.listener.datagramReceived(self.client_out.pop(0), CLIENT)
            while self.server_port.sent:
                data, _ = self.server_port.sent.pop(0)
                self.client.datagram(data, SERVER)
            if not moved:
                self.clock.advance(0.001)
                if not (self.client_out or self.server_port.sent):
                    return

    def connected(self) -> None:
        self.client.connect()
        self.pump()

    def stream(self) -> tuple[Inner, Inner]:
        """A connected pair's new stream: the client's end and the server's, once a
        first byte crossed (the server carries a stream when data comes on it)."""
        self.connected()
        inner = self.client.open_stream()
        inner.transport.write(b"x")
        self.pump()
        (far,) = self.server_inners
        return inner, far


class Streams(SynchronousTestCase):
    def test_bytes_both_ways_with_half_close(self):
        pair = Pair(self)
        pair.connected()
        self.assertTrue(pair.client.ready.called)
        inner = pair.client.open_stream()
        inner.transport.write(b"hello server")
        pair.pump()
        (far,) = pair.server_inners
        self.assertEqual(bytes(far.received), b"hello server")
        # the client's half-close crosses; the server still writes, then closes its side
        inner.transport.loseWriteConnection()
        pair.pump()
        self.assertTrue(far.read_closed)
        far.transport.write(b"and back")
        far.transport.loseWriteConnection()
        pair.pump()
        self.assertEqual(bytes(inner.received), b"and back")
        self.assertTrue(inner.read_closed)
        for end in (inner, far):
            self.assertEqual(len(end.lost), 1)
            end.lost[0].trap(ConnectionDone)

    def test_a_paused_reader_holds_the_window_and_the_sender_pauses(self):
        pair = Pair(self)
        inner, far = pair.stream()
        far.transport.pauseProducing()  # the server's reader takes nothing more

        class Producer:
            paused = 0

            def pauseProducing(self):
                Producer.paused += 1

            def resumeProducing(self):
                Producer.paused -= 1

        inner.transport.registerProducer(Producer(), True)
        block = b"y" * 65536
        for _ in range(3 * STREAM_WINDOW // len(block)):
            inner.transport.write(block)
            pair.pump()
        # what arrived stops at the window; the rest waits at the sender, which paused
        self.assertLessEqual(len(far.received), STREAM_WINDOW + 1)
        self.assertEqual(Producer.paused, 1)
        self.assertGreater(pair.client.quic.unsent(inner.transport.stream_id), HELD_LIMIT)
        far.transport.resumeProducing()  # it takes what it has: the window moves
        pair.pump()
        self.assertEqual(len(far.received), 1 + 3 * STREAM_WINDOW)
        self.assertEqual(Producer.paused, 0)

    def test_the_last_bytes_before_a_close_arrive(self):
        pair = Pair(self)
        inner, far = pair.stream()
        inner.transport.write(b"y" * 3000)
        inner.transport.loseConnection()  # FIN after the bytes, and STOP_SENDING
        pair.pump()
        self.assertEqual(bytes(far.received), b"x" + b"y" * 3000)
        self.assertTrue(far.read_closed)
        (reason,) = far.lost  # both ways over: a clean end, not a reset
        reason.trap(ConnectionDone)

    def test_a_session_closing_waits_for_its_last_bytes(self):
        pair = Pair(self)
        inner, far = pair.stream()
        inner.transport.write(b"z" * 200_000)
        inner.transport.loseConnection()
        pair.client.close_when_idle()  # the connection closes once they are acknowledged
        pair.clock.advance(0)
        self.assertEqual(pair.client.quic._state.name, "CONNECTED")
        pair.pump()
        self.assertEqual(len(far.received), 200_001)
        self.assertIn(pair.client.quic._state.name, ("CLOSING", "DRAINING", "TERMINATED"))

    def test_a_reset_ends_the_stream_at_both_ends(self):
        pair = Pair(self)
        inner, far = pair.stream()
        inner.transport.abortConnection()
        pair.pump()
        self.assertEqual(len(inner.lost), 1)
        self.assertEqual(len(far.lost), 1)
        self.assertNotIsInstance(far.lost[0].value, ConnectionDone)


class Listener(SynchronousTestCase):
    def test_no_connection_without_a_session(self):
        pair = Pair(self)
        pair.tunnel.session = None
        pair.connected()
        self.assertEqual(pair.listener.by_cid, {})
        self.assertEqual(pair.listener.refused, 1)
        self.assertFalse(pair.client.ready.called)

    def test_handshakes_per_source_are_bounded(self):
        pair = Pair(self)
        carriers = []
        for _ in range(quicstream.HANDSHAKING_PER_SOURCE + 3):
            out: list = []
            carrier = QuicCarrier(pair.clock, _Connection(
                configuration=client_configuration(1, "x", None)), SERVER,
                lambda data, address, out=out: out.append(data), Inner, lambda: CLIENT)
            carrier.connect()
            carriers.append(carrier)
            for data in out:  # Initial packets only: their handshakes do not end
                pair.listener.datagramReceived(data, CLIENT)
        self.assertEqual(len(pair.listener.by_source[CLIENT[0]]),
                         quicstream.HANDSHAKING_PER_SOURCE)
        self.assertEqual(pair.listener.refused, 3)
        # after HANDSHAKE_TIMEOUT they are gone, and the source may try again
        pair.clock.advance(quicstream.HANDSHAKE_TIMEOUT + 1)
        self.assertNotIn(CLIENT[0], pair.listener.by_source)
        self.assertEqual(pair.listener.by_cid, {})
        for carrier in carriers:
            self.assertIn("no QUIC handshake in 10s", str(self.failureResultOf(
                carrier.ready, ConnectionError).value))

    def test_garbage_and_short_packets_cost_nothing(self):
        pair = Pair(self)
        for data in (b"", b"\x00", b"not quic at all", b"\x40" + b"a" * 40,
                     b"\xc3\x00\x00\x00\x01\x08" + b"a" * 100):  # an Initial under 1,200 B
            pair.listener.datagramReceived(data, CLIENT)
        self.assertEqual((pair.listener.by_cid, pair.listener.refused), ({}, 0))
        self.assertEqual(pair.server_port.sent, [])
