"""type=1 through a lossy path: a relay written here drops 2 % of the datagrams each way
and delays each by 25 ms (tc netem is not available on these kernels).

A module of its own, named to come early: it is the suite's longest test (about a
minute), and trial -j2 hands tests out in the order of their modules' names, so the
other worker runs the rest meanwhile instead of waiting for it at the end.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.trial.unittest import TestCase

from tests.integration import (
    DigestAfterEOF,
    exchange,
    listen,
    pattern_bytes,
    recording_proxy,
    reverse_server,
    spawn,
)
from tests.transports import no_tracebacks


class LossyRelay(DatagramProtocol):
    """Between a client and a server's UDP port: drops ``loss`` of the datagrams each
    way and delays every one by ``delay`` seconds (tc netem is not available here)."""

    def __init__(self, upstream: tuple[str, int], loss: float, delay: float,
                 seed: int = 7) -> None:
        self.upstream = upstream
        self.loss, self.delay = loss, delay
        self.rand = random.Random(seed)
        self.client: tuple[str, int] | None = None
        self.dropped = self.passed = 0
        self.delayed: deque = deque()  # (one delay for all: they fire in order)

    def datagramReceived(self, data: bytes, addr) -> None:
        if addr == self.upstream:
            to = self.client
        else:
            self.client, to = addr, self.upstream
        if to is None:
            return
        if self.rand.random() < self.loss:
            self.dropped += 1
            return
        self.passed += 1
        self.delayed.append(reactor.callLater(self.delay, self._send, data, to))

    def _send(self, data: bytes, to) -> None:
        self.delayed.popleft()
        self.transport.write(data, to)

    def stopProtocol(self) -> None:
        for call in self.delayed:
            if call.active():
                call.cancel()


async def lossy_path(case: TestCase, tunnel_port: int, loss: float,
                     delay: float) -> tuple[int, LossyRelay]:
    """A port that forwards TCP as it is (the control connection) and relays UDP with
    ``loss`` and ``delay`` (the QUIC pool) to the server's tunnel port."""
    for _ in range(20):
        tcp_port, _ = await recording_proxy(case, tunnel_port)
        relay = LossyRelay(("127.0.0.1", tunnel_port), loss, delay)
        try:
            udp = reactor.listenUDP(tcp_port, relay, interface="127.0.0.1")
        except OSError:
            continue  # (the number is taken for UDP: another one)
        case.addCleanup(udp.stopListening)
        return tcp_port, relay
    raise AssertionError("no port free for both TCP and UDP")


class QuicUnderLoss(TestCase):
    timeout = 150

    async def test_16_mib_arrive_whole_through_2_percent_loss_and_25_ms(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        server, tunnel_port, exposed = await reverse_server(self, "secret", "?type=1")
        path, relay = await lossy_path(self, tunnel_port, 0.02, 0.025)
        client = spawn(self, f"client://secret@127.0.0.1:{path}/127.0.0.1:{backend}")
        await client.wait_for("tunnel session open")
        size = 16 * 1024 * 1024
        digest = hashlib.sha256(b"".join(pattern_bytes(size, seed=4))).hexdigest()
        result = await exchange(exposed, pattern_bytes(size, seed=4), timeout=120)
        self.assertEqual(result.received.decode(), digest)
        self.assertGreater(relay.dropped, 0.01 * (relay.dropped + relay.passed))
        no_tracebacks(self, server, client)
