"""TLS on a live TCP transport with the standard library (tls_transport.py), and the
relay's write-through (channel.py), on real sockets on 127.0.0.1 in this process."""

from __future__ import annotations

import gc
import hashlib
import shutil
import socket
import ssl
import tempfile
import weakref
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from nodepass import tls
from nodepass.tunnel import tls_transport
from nodepass.tunnel.channel import READ_SIZE, write_through
from tests import certs
from tests.integration import WAIT, Collector, pattern_bytes


def expected(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_bytes(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


@implementer(IHalfCloseableProtocol)
class Peer(Collector):
    """A Collector that starts TLS first: what it writes before the handshake ends waits."""

    def __init__(self, chunks, context, server_side, hostname=None, describe=str,
                 half_close=True, session=None):
        super().__init__(chunks, half_close)
        self.context, self.server_side, self.session = context, server_side, session
        self.hostname, self.describe = hostname, describe
        self.ended_by_peer = False
        self.reason = None

    def connectionMade(self):
        self.transport.bufferSize = READ_SIZE
        tls_transport.start_tls(self.transport, self.context, self.server_side, self.hostname,
                                self.describe, self.session)
        super().connectionMade()

    def dataReceived(self, data):
        if not hasattr(self, "seen"):
            self.seen = tls.peer_fingerprint(self.transport)
            self.resumed = self.transport.tls_resumed()
        super().dataReceived(data)

    def readConnectionLost(self):
        self.ended_by_peer = True
        super().readConnectionLost()

    def connectionLost(self, reason):
        self.reason = reason
        super().connectionLost(reason)


class _Accepting(Factory):
    def __init__(self, make):
        self.make = make
        self.built: Deferred[Peer] = Deferred()

    def buildProtocol(self, addr):
        protocol = self.make()
        self.built.callback(protocol)
        return protocol


class StdlibTLS(TestCase):
    timeout = 60

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = certs.make_ca()
        crt, key = certs.issue(self.ca).write(self.dir, "server")
        self.server_context = tls.ServerCredentials(tls.load_credentials(crt, key)).context
        self.ca_file = certs.write_ca(self.ca, self.dir)

    async def connect(self, server_make, client_make):
        factory = _Accepting(server_make)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = client_make()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: client))
        server = await factory.built
        return server, client

    async def test_a_half_close_while_the_other_way_streams(self):
        """The client sends a little and ends its direction at once; the server streams
        16 MiB through it (socket buffers fill: partial writes, buffered records) and
        then ends its own.  Every byte arrives, in order, and each end sees the other's
        end as a half-close, not a loss."""
        down, up = 16 * 1024 * 1024, 64 * 1024
        pinning = tls.pinning_tls()
        server, client = await self.connect(
            lambda: Peer(pattern_bytes(down, 1), self.server_context, True),
            lambda: Peer(pattern_bytes(up, 2), pinning.context, False))
        await client.done.addTimeout(WAIT, reactor)
        await server.done.addTimeout(WAIT, reactor)
        self.assertEqual((client.size, client.digest.hexdigest()), (down, expected(down, 1)))
        self.assertEqual((server.size, server.digest.hexdigest()), (up, expected(up, 2)))
        self.assertTrue(client.ended_by_peer and server.ended_by_peer)
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)

    async def test_a_tcp_end_without_close_notify_is_a_truncation(self):
        pinning = tls.pinning_tls()
        server, client = await self.connect(
            lambda: Peer(iter([b"x" * 1000]), self.server_context, True, half_close=False),
            lambda: Peer(iter([]), pinning.context, False, half_close=False))
        await server.sent.addTimeout(WAIT, reactor)
        while client.size < 1000:  # the bytes came; now the server's TCP ends, bare
            await _tick()
        server.transport.socket.shutdown(socket.SHUT_WR)  # (not through TLS)
        await client.done.addTimeout(WAIT, reactor)
        self.assertFalse(client.ended_by_peer)
        self.assertFalse(client.reason.check(ConnectionDone), "a truncation is a loss")

    async def test_a_verification_failure_is_described(self):
        verifying = tls.verifying_tls("tunnel.example", self.ca_file)
        _, client = await self.connect(
            lambda: Peer(iter([]), self.server_context, True),
            lambda: Peer(iter([b"never sent"]), verifying.context, False, verifying.hostname,
                         verifying.describe))
        await client.done.addTimeout(WAIT, reactor)
        self.assertEqual(client.transport.tls_problem,
                         "the certificate does not match the name 'tunnel.example' (hostname "
                         "mismatch; set sni=NAME to verify another name)")

    async def test_the_peer_certificate_is_seen(self):
        pinning = tls.pinning_tls()
        _server, client = await self.connect(
            lambda: Peer(iter([b"hello"]), self.server_context, True),
            lambda: Peer(iter([]), pinning.context, False))
        await client.done.addTimeout(WAIT, reactor)
        leaf = tls.load_credentials(str(self.dir / "server.crt"),
                                    str(self.dir / "server.key")).fingerprint
        self.assertEqual(client.seen, leaf)

    async def test_a_client_resumes_the_session_it_kept(self):
        """The server gives a ticket with every handshake; a client that kept the last
        session resumes it (no certificate, no signature) and still sees the server's
        certificate."""
        pinning = tls.pinning_tls()
        seen = []
        for _ in range(3):
            _server, client = await self.connect(
                lambda: Peer(iter([b"hello"]), self.server_context, True),
                lambda: Peer(iter([]), pinning.context, False,
                             session=pinning.session))
            await client.done.addTimeout(WAIT, reactor)
            seen.append((client.resumed, client.seen))
            pinning.remember(client.transport)
        self.assertEqual([resumed for resumed, _ in seen], [False, True, True])
        self.assertEqual(len({fingerprint for _, fingerprint in seen}), 1)
        # another context (the verifying one, HTTP/2's with ALPN) keeps no session it did
        # not make: ssl would refuse it at the next dial, and that pool would never fill
        other = tls.pinning_tls(("h2",))
        other.remember(client.transport)
        self.assertIsNone(other.session)

    async def test_openssl_state_goes_with_the_connection(self):
        """A lost connection drops its SSLObject at once, though its transport may live on
        in the protocol's cycles until a full garbage collection (which counts Python
        objects, not OpenSSL's kilobytes: 2,000 connections grew a client by 100 MiB)."""
        pinning = tls.pinning_tls()
        _server, client = await self.connect(
            lambda: Peer(iter([b"hello"]), self.server_context, True),
            lambda: Peer(iter([]), pinning.context, False))
        state = weakref.ref(client.transport._tls)
        gc.disable()  # (what is freed here is freed without it)
        self.addCleanup(gc.enable)
        await client.done.addTimeout(WAIT, reactor)
        await _tick()  # (done fires within connectionLost)
        self.assertIsNotNone(client.transport)  # still referenced, as in a cycle
        self.assertIsNone(state())
        self.assertIsNone(client.transport.peer_certificate())

    def test_only_a_live_tcp_transport_takes_it(self):
        with self.assertRaises(TypeError):
            tls_transport.start_tls(object(), ssl.create_default_context(), False)


async def _tick():
    d = Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


class WriteThrough(TestCase):
    """A relay's writes go to the socket at once when nothing waits; what does not fit is
    buffered behind them, in order."""

    timeout = 60

    async def test_what_does_not_fit_is_buffered_in_order(self):
        size = 8 * 1024 * 1024

        class Sender(Protocol):
            def connectionMade(self):
                for chunk in pattern_bytes(size, 3):  # all at once: the socket fills
                    write_through(self.transport, chunk)
                self.transport.loseConnection()

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Sender))
        self.addCleanup(port.stopListening)
        receiver = Collector(iter([]), half_close=False)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: receiver))
        await receiver.done.addTimeout(WAIT, reactor)
        self.assertEqual((receiver.size, receiver.digest.hexdigest()), (size, expected(size, 3)))
