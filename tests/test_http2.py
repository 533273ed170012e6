"""type=3: the pool as streams of one HTTP/2 connection, end to end on real processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.settings
from hyperframe.frame import Frame
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from nodepass.tunnel.h2stream import H2Carrier, Http2Pool
from tests.integration import (
    DigestAfterEOF,
    echo_backend,
    eventually,
    exchange,
    listen,
    tunnel_pair,
)
from tests.test_tunnel_e2e import slow_backend_holds_memory
from tests.test_websocket import _raw, check_tunnel
from tests.transports import (
    back_after_server_restart,
    no_tracebacks,
    udp_sessions_cross,
    wrong_key_refused,
)


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


class Http2(TestCase):
    timeout = 120

    async def test_tcp_with_half_close_and_64_mib_without_and_with_tls(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        for tls in (0, 1):
            server, client, exposed = await tunnel_pair(
                self, backend, server_query=f"?type=3&tls={tls}")
            await check_tunnel(self, exposed, 64 * 1024 * 1024 if tls else 8 * 1024 * 1024)
            no_tracebacks(self, server, client)
            await server.stop()
            await client.stop()

    async def test_the_whole_pool_is_one_connection(self):
        backend = await echo_backend(self)
        _, client, exposed = await tunnel_pair(self, backend, server_query="?type=3&tls=1",
                                               client_query="?min=64")
        result = await exchange(exposed, iter([b"through a stream"]))
        self.assertEqual(bytes(result.received), b"through a stream")
        # 64 pooled data connections; the client holds its control connection, the one
        # HTTP/2 connection, and what the tests' echo left: not 64 sockets
        await eventually(lambda: _sockets(client.pid) <= 4)

    async def test_udp_sessions_cross(self):
        await udp_sessions_cross(self, "?type=3&tls=1")

    async def test_backpressure_into_a_slow_target(self):
        await slow_backend_holds_memory(self, "?type=3&tls=1", 128 * 1024 * 1024)

    async def test_a_wrong_key_is_refused(self):
        await wrong_key_refused(self, "?type=3&tls=1")

    async def test_the_tunnel_comes_back_after_the_server_restarts(self):
        await back_after_server_restart(self, "?type=3")

    async def test_the_tunnel_comes_back_after_the_server_restarts_with_tls(self):
        await back_after_server_restart(self, "?type=3&tls=1")

    async def test_garbage_after_the_preface_is_refused(self):
        backend = await echo_backend(self)
        server, _, exposed = await tunnel_pair(self, backend, server_query="?type=3")
        tunnel_port = await server.listening_port("tunnel")
        answers = await _raw(tunnel_port, [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64,  # frames that are not
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP/1 to an HTTP/2 tunnel
        ])
        self.assertNotIn(b"200", b"".join(answers))
        result = await exchange(exposed, iter([b"still here"]))
        self.assertEqual(bytes(result.received), b"still here")
        no_tracebacks(self, server)


class _Inner(Protocol):
    def __init__(self):
        self.ready = Deferred()


class StreamLimits(SynchronousTestCase):
    """In memory: a client's HTTP/2 connection against a server's SETTINGS."""

    def test_a_full_connection_fails_the_dial_instead_of_raising(self):
        carrier = H2Carrier(True, _Inner, "/p", "h")
        carrier.makeConnection(StringTransport())
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        carrier.dataReceived(server.data_to_send())
        pool = Http2Pool(None, None, "h", "/p", _Inner)
        pool.carrier = carrier
        first = pool.dial()
        self.assertNoResult(first)  # its stream is open, its handshake to come
        self.assertEqual(len(carrier.streams), 1)
        failure = self.failureResultOf(pool.dial(), ConnectionError)
        self.assertIn("no HTTP/2 stream", str(failure.value))


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    """A stream's tunnel connection that keeps what it hears; ``reply``, when given,
    is written at the peer's end of stream, then this end's writing ends (as the
    test backend answers a digest at EOF)."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.received = b""
        self.events: list[str] = []
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.events.append("data")

    def readConnectionLost(self) -> None:
        self.events.append("eof")
        if self.reply:
            self.transport.write(self.reply)
            self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.events.append("lost")
        self.reason = reason


def _deliver(source: StringTransport, to: H2Carrier) -> bytes:
    """What ``source`` was given, to ``to`` in one read."""
    data = source.value()
    source.clear()
    if data:
        to.dataReceived(data)
    return data


def _frames(data: bytes) -> list[tuple[str, int, set[str]]]:
    """The frames in ``data``: their type, stream and flags."""
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frames.append((type(frame).__name__, frame.stream_id, set(frame.flags)))
        data = data[9 + length:]
    return frames


class Streams(SynchronousTestCase):
    """In memory: a client's and a server's H2Carrier, what one sends handed to the
    other in reads of the test's choosing."""

    def test_what_comes_with_the_end_of_a_stream_in_one_read_is_delivered(self):
        # The server's END_STREAM went first; the client acknowledges the data (a
        # WINDOW_UPDATE on the stream), answers and ends: all in one read at the
        # server, where h2 has closed the stream before the events are dispatched.
        # The WINDOW_UPDATE (dispatched first) must not end the stream then: the
        # answer and the peer's END_STREAM are still to come.
        answer = b"the digest, at EOF"
        servers: list[_Recorder] = []

        def carried_at_the_server() -> _Recorder:
            servers.append(_Recorder())
            return servers[-1]

        client = H2Carrier(True, lambda: _Recorder(answer), "/p", "h")
        server = H2Carrier(False, carried_at_the_server, "/p")
        to_server, to_client = StringTransport(), StringTransport()
        client.makeConnection(to_server)
        server.makeConnection(to_client)
        for _ in range(2):  # the prefaces, SETTINGS and their acknowledgements
            _deliver(to_server, server)
            _deliver(to_client, client)
        inner = client.open_stream()
        _deliver(to_server, server)
        [carried] = servers
        sent = bytes(range(256)) * 2400  # more than half the stream's window: acknowledged
        carried.transport.write(sent)
        carried.transport.loseWriteConnection()
        _deliver(to_client, client)
        self.assertEqual((len(inner.received), inner.events[-2:]), (len(sent), ["eof", "lost"]))

        read = _deliver(to_server, server)

        self.assertEqual(_frames(read), [("WindowUpdateFrame", 1, set()),
                                         ("DataFrame", 1, set()),
                                         ("DataFrame", 1, {"END_STREAM"})])
        self.assertEqual(carried.received, answer)
        self.assertEqual(carried.events, ["data", "eof", "lost"])
        carried.reason.trap(ConnectionDone)
        self.assertEqual(server.streams, {})
