"""type=1: the pool as streams of one QUIC connection, end to end on real processes."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from nodepass.url import parse
from tests.integration import (
    DigestAfterEOF,
    echo_backend,
    eventually,
    exchange,
    listen,
    sleep,
    tunnel_pair,
)
from tests.test_tunnel_e2e import slow_backend_holds_memory
from tests.test_websocket import check_tunnel
from tests.transports import (
    back_after_server_restart,
    no_tracebacks,
    udp_sessions_cross,
    wrong_key_refused,
)


def _udp_sockets(pid: int) -> int:
    """UDP sockets of a process (its /proc/PID/net/udp* lines whose inode it holds)."""
    inodes = {os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(fd).startswith("socket:")}
    held = 0
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            held += line.split()[9] in inodes
    return held


class Quic(TestCase):
    timeout = 120

    def test_tls_0_is_raised_to_tls_1(self):
        config = parse("server://k@127.0.0.1:1/127.0.0.1:2?type=1")
        self.assertEqual((config.tls, config.tls_raised), (1, True))
        config = parse("server://k@127.0.0.1:1/127.0.0.1:2?type=1&tls=0")
        self.assertEqual((config.tls, config.tls_raised), (1, True))
        config = parse("server://k@127.0.0.1:1/127.0.0.1:2?type=1&tls=1")
        self.assertEqual((config.tls, config.tls_raised), (1, False))

    async def test_tcp_with_half_close_and_64_mib(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        server, client, exposed = await tunnel_pair(self, backend, server_query="?type=1")
        await server.wait_for("type=1 \\(QUIC\\) is TLS 1.3 by design: tls=0 raised to tls=1")
        self.assertIn("tls=1", await client.wait_for("tunnel session open"))
        await check_tunnel(self, exposed, 64 * 1024 * 1024)
        no_tracebacks(self, server, client)

    async def test_both_ends_report_the_transport(self):
        backend = await echo_backend(self)
        server, client, _ = await tunnel_pair(self, backend, server_query="?type=1&log=debug",
                                              client_query="?log=debug")
        for daemon in (server, client):
            line = await daemon.wait_for("report: connected .* transport=")
            self.assertTrue(line.endswith("transport=quic"), line)

    async def test_the_whole_pool_is_one_udp_socket(self):
        backend = await echo_backend(self)
        _, client, exposed = await tunnel_pair(self, backend, server_query="?type=1",
                                               client_query="?min=64")
        result = await exchange(exposed, iter([b"through a stream"]))
        self.assertEqual(bytes(result.received), b"through a stream")
        # 64 pooled data connections, and the client holds its control connection (TCP),
        # what the echo left, and one UDP socket for all of them
        self.assertEqual(_udp_sockets(client.pid), 1)
        await eventually(lambda: len(os.listdir(f"/proc/{client.pid}/fd")) < 30)

    async def test_udp_sessions_cross(self):
        await udp_sessions_cross(self, "?type=1")

    async def test_backpressure_into_a_slow_target(self):
        # 80 MiB: more than the 64 MiB the ends may grow by while the target reads nothing
        await slow_backend_holds_memory(self, "?type=1", 80 * 1024 * 1024)

    async def test_a_wrong_key_is_refused(self):
        await wrong_key_refused(self, "?type=1")

    async def test_the_tunnel_comes_back_after_the_server_restarts(self):
        await back_after_server_restart(self, "?type=1")

    async def test_a_packet_flood_from_one_source_is_refused_and_logged_once(self):
        backend = await echo_backend(self)
        server, client, exposed = await tunnel_pair(self, backend, server_query="?type=1")
        tunnel_port = await server.listening_port("tunnel")
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(flood.close)
        rand = random.Random(1)
        for _ in range(3000):  # Initial packets of full size, each a new connection ID
            flood.sendto(_initial(rand), ("127.0.0.1", tunnel_port))
        flood.sendto(b"\x40" + rand.randbytes(40), ("127.0.0.1", tunnel_port))  # short
        flood.sendto(b"not quic at all", ("127.0.0.1", tunnel_port))
        await server.wait_for("refused QUIC connections from 127.0.0.1: 4 handshakes")
        started = time.monotonic()
        result = await exchange(exposed, iter([b"still here"]))
        self.assertEqual(bytes(result.received), b"still here")
        self.assertLess(time.monotonic() - started, 5)
        await sleep(0.5)
        self.assertEqual(server.count("refused QUIC connections"), 1)
        no_tracebacks(self, server, client)


def _initial(rand: random.Random) -> bytes:
    """A long-header Initial packet (RFC 9000 17.2.2) with random IDs and payload."""
    head = (b"\xc3" + (1).to_bytes(4, "big") + b"\x08" + rand.randbytes(8)
            + b"\x08" + rand.randbytes(8) + b"\x00")
    body = 1200 - len(head) - 2
    return head + (0x4000 | body).to_bytes(2, "big") + rand.randbytes(body)
