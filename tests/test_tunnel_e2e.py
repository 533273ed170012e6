"""Server and client end to end as real processes on 127.0.0.1: what only real sockets
and signals show (splice, a real HTTP client, SIGTERM and SIGKILL, memory under load).
The rest is paired in memory (test_pairing.py)."""

import hashlib
import signal

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.integration import (
    DigestAfterEOF,
    _OneShot,
    echo_backend,
    eventually,
    exchange,
    http_backend,
    listen,
    need,
    pattern_bytes,
    sleep,
    spawn,
    tunnel_pair,
)

MIB = 1024 * 1024


class Traffic(TestCase):
    timeout = 120

    async def test_http_server_fetched_with_curl(self):
        curl = need("curl", "curl")
        body = b"behind the tunnel\n" * 1000
        backend = await http_backend(self, b"page", body)
        _, _, exposed = await tunnel_pair(self, backend)
        out, err, code = await getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{exposed}/page"])
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, body)

    async def test_64_mib_each_way_intact(self):
        backend = await echo_backend(self)
        _, _, exposed = await tunnel_pair(self, backend)
        expected = hashlib.sha256(b"".join(pattern_bytes(64 * MIB, seed=1))).hexdigest()
        result = await exchange(exposed, pattern_bytes(64 * MIB, seed=1), keep=False,
                                timeout=90)
        self.assertEqual(result.size, 64 * MIB)
        self.assertEqual(result.digest.hexdigest(), expected)

    async def test_half_close_is_carried_through(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        _, _, exposed = await tunnel_pair(self, backend)
        data = b"".join(pattern_bytes(3 * MIB, seed=2))
        result = await exchange(exposed, iter([data]))
        self.assertEqual(bytes(result.received), hashlib.sha256(data).hexdigest().encode())

class Faults(TestCase):
    timeout = 120

    async def test_client_killed_and_restarted_takes_the_session_again(self):
        backend = await echo_backend(self)
        server, client, exposed = await tunnel_pair(self, backend)
        await client.stop(signal.SIGKILL)
        await server.wait_for("disconnected: tunnel session closed")
        client_url = f"client://secret@127.0.0.1:{_tunnel_port(server)}/127.0.0.1:{backend}"
        again = spawn(self, client_url, name="client-2")
        await again.wait_for("tunnel session open")
        await server.wait_for("tunnel session open", nth=2)
        result = await exchange(exposed, iter([b"after restart"]))
        self.assertEqual(bytes(result.received), b"after restart")

    async def test_sigterm_lets_a_live_transfer_finish(self):
        backends = []
        backend = await listen(self, Factory.forProtocol(lambda: _Recorded(backends)))
        server, _, exposed = await tunnel_pair(self, backend)
        chunks = [bytes([i]) * 256 * 1024 for i in range(12)]
        sender = PacedSender(chunks, interval=0.1)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(_OneShot(sender))
        await eventually(lambda: backends and backends[0].size > 0)
        server.send_signal(signal.SIGTERM)  # mid-transfer
        await server.wait_for("waiting up to 5s for 1 live connections to finish")
        reply = await sender.done.addTimeout(30, reactor)
        self.assertEqual(reply, hashlib.sha256(b"".join(chunks)).hexdigest().encode())
        self.assertEqual(await server.ended.addTimeout(10, reactor), 0)
        self.assertEqual(server.count("shutdown timeout"), 0)
        with self.assertRaises(ConnectionRefusedError):
            await exchange(exposed, iter([b"late"]), timeout=5)


class Backpressure(TestCase):
    timeout = 180

    async def test_slow_backend_keeps_memory_bounded_and_bytes_intact(self):
        await slow_backend_holds_memory(self, "", 256 * MIB)


async def slow_backend_holds_memory(case, server_query: str, size: int,
                                    client_query: str = "") -> None:
    """``size`` bytes toward a backend that reads nothing for 3 s: neither end grows by
    64 MiB or more meanwhile, and every byte arrives once it reads."""
    from tests.integration import rss_kib

    readers = []
    backend = await listen(case, Factory.forProtocol(lambda: _PausedDigest(readers)))
    server, client, exposed = await tunnel_pair(case, backend, server_query=server_query,
                                                client_query=client_query)
    await sleep(0.5)
    idle = {d.name: rss_kib(d.pid) for d in (server, client)}
    transfer = ensureDeferred(exchange(exposed, pattern_bytes(size, seed=3), timeout=150))
    await eventually(lambda: readers, timeout=10)
    peak = dict(idle)
    for _ in range(30):  # 3 s with the backend reading nothing
        await sleep(0.1)
        for d in (server, client):
            peak[d.name] = max(peak[d.name], rss_kib(d.pid))
    case.assertEqual(readers[0].size, 0)
    readers[0].transport.resumeProducing()
    result = await transfer
    for name in idle:
        grown = (peak[name] - idle[name]) / 1024
        case.assertLess(grown, 64, f"{name} grew by {grown:.1f} MiB while the backend "
                                   "was not reading")
    expected = hashlib.sha256(b"".join(pattern_bytes(size, seed=3))).hexdigest()
    case.assertEqual(result.received.decode(), expected)


class _Recorded(DigestAfterEOF):
    """A DigestAfterEOF backend that the test can see."""

    def __init__(self, registry):
        self.registry = registry
        self.size = 0

    def connectionMade(self):
        super().connectionMade()
        self.registry.append(self)

    def dataReceived(self, data):
        self.size += len(data)
        super().dataReceived(data)


class _PausedDigest(_Recorded):
    """A backend that reads nothing until the test resumes it."""

    def connectionMade(self):
        super().connectionMade()
        self.transport.pauseProducing()


class PacedSender(Protocol):
    """Writes one chunk per ``interval`` seconds, half-closes, and collects the reply."""

    def __init__(self, chunks, interval):
        self.chunks = list(chunks)
        self.interval = interval
        self.reply = b""
        self.done = Deferred()

    def connectionMade(self):
        self.loop = LoopingCall(self._next)
        self.loop.start(self.interval)

    def _next(self):
        if not self.chunks:
            self.loop.stop()
            self.transport.loseWriteConnection()
            return
        self.transport.write(self.chunks.pop(0))

    def dataReceived(self, data):
        self.reply += data

    def connectionLost(self, reason):
        if self.loop.running:
            self.loop.stop()
        self.done.callback(self.reply)


def _tunnel_port(server):
    for line in server.lines:
        if "tunnel listening on" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("server never said where it listens")


def server_url(server):
    for line in server.lines:
        if "target listening on" in line:
            target = line.rsplit(" ", 1)[1]
            return f"server://secret@127.0.0.1:{_tunnel_port(server)}/{target}"
    raise AssertionError("server never said where it listens")
