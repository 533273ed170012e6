"""Bulk transfers through a slow, lossy path: the QUIC pool against the TCP pool.

    python bench/lossy.py [--mib 16] [--loss 0.02] [--delay 0.025]

Between the client and the server a relay process (Twisted, below) forwards TCP with
every chunk delayed by ``--delay`` each way, and UDP on the same port number with every
datagram delayed as much and ``--loss`` of them dropped each way (``tc netem`` is not
available on these kernels).  A relay in user space cannot drop TCP segments — the
kernel retransmits under it — so the TCP rows see the delay only: they are what TCP
gets on a clean path of the same length, the best case a TCP pool could have there.

Rows: direct to the sink on loopback and through the delaying path (the ratios'
bases), a tls=1 TCP pool through it, and the QUIC pool (type=1) through it without
and with loss.  Each sends ``--mib`` MiB and checks the sink's sha256.  Loopback only;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import HERE, Procs, bulk_up, free_port, wait_port

RELAY = r"""
import random, sys
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from zope.interface import implementer

port, upstream = int(sys.argv[1]), int(sys.argv[2])
loss, delay = float(sys.argv[3]), float(sys.argv[4])
rand = random.Random(7)

@implementer(IHalfCloseableProtocol)
class Half(Protocol):
    # one side of a TCP forward: what it reads (and its end) reaches the other side
    # ``delay`` later
    other = None
    early = b""
    def dataReceived(self, data):
        reactor.callLater(delay, self.deliver, data)
    def deliver(self, data):
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early += data
    def readConnectionLost(self):
        reactor.callLater(delay, lambda: self.other.transport.loseWriteConnection())
    def writeConnectionLost(self):
        pass
    def connectionLost(self, reason):
        reactor.callLater(delay, lambda: self.other and self.other.transport
                          and self.other.transport.loseConnection())

class Forward(Factory):
    def buildProtocol(self, addr):
        inbound, outbound = Half(), Half()
        inbound.other, outbound.other = outbound, inbound
        def up(_):
            if inbound.early:
                outbound.transport.write(inbound.early)
        TCP4ClientEndpoint(reactor, "127.0.0.1", upstream).connect(
            Factory.forProtocol(lambda: outbound)).addCallbacks(
            up, lambda _: inbound.transport.loseConnection())
        return inbound

class Lossy(DatagramProtocol):
    client = None
    def datagramReceived(self, data, addr):
        if addr == ("127.0.0.1", upstream):
            to = self.client
        else:
            self.client, to = addr, ("127.0.0.1", upstream)
        if to is not None and rand.random() >= loss:
            reactor.callLater(delay, self.transport.write, data, to)

reactor.listenTCP(port, Forward(), interface="127.0.0.1")
reactor.listenUDP(port, Lossy(), interface="127.0.0.1")
print("ready", flush=True)
reactor.run()
"""


def through(procs: Procs, upstream: int, loss: float, delay: float) -> int:
    """A relay process in front of ``upstream``: its port."""
    for _ in range(20):
        port = free_port()
        proc = procs.start("-c", RELAY, str(port), str(upstream), str(loss), str(delay))
        try:
            wait_port(port, 5)
            return port
        except RuntimeError:
            proc.kill()  # (the number was taken for UDP: another one)
    raise RuntimeError("no port free for both TCP and UDP")


def tunnel(procs: Procs, sink: int, server_query: str, path: tuple[float, float] | None
           ) -> int:
    """A server and a client whose traffic crosses a relay with ``path`` = (loss,
    delay); the server's exposed port."""
    tunnel_port, exposed = free_port(), free_port()
    procs.start("-m", "nodepass",
                f"server://bench@127.0.0.1:{tunnel_port}/127.0.0.1:{exposed}{server_query}")
    wait_port(tunnel_port)
    reach = tunnel_port if path is None else through(procs, tunnel_port, *path)
    procs.start("-m", "nodepass", f"client://bench@127.0.0.1:{reach}/127.0.0.1:{sink}?log=warn")
    wait_port(exposed)
    time.sleep(1.0)  # the session and its pool
    return exposed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--loss", type=float, default=0.02)
    parser.add_argument("--delay", type=float, default=0.025)
    args = parser.parse_args()
    procs = Procs()
    rows: list[tuple[str, float]] = []
    try:
        echo, sink, source = free_port(), free_port(), free_port()
        procs.start(str(HERE / "backends.py"), str(echo), str(sink), str(source))
        wait_port(sink)
        rows.append(("direct, loopback", bulk_up(sink, args.mib)))
        delayed = through(procs, sink, 0.0, args.delay)
        rows.append((f"direct, {args.delay * 1000:g} ms each way", bulk_up(delayed, args.mib)))
        for label, query, path in (
                ("type=0 tls=1, delay only", "?tls=1&log=warn", (0.0, args.delay)),
                ("type=1, delay only", "?type=1&log=warn", (0.0, args.delay)),
                (f"type=1, delay and {args.loss:.0%} loss", "?type=1&log=warn",
                 (args.loss, args.delay))):
            started = time.monotonic()
            rows.append((label, bulk_up(tunnel(procs, sink, query, path), args.mib)))
            print(f"measured {label} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        procs.stop()
    base, path_base = rows[0][1], rows[1][1]
    print(f"{args.mib} MiB up, sha256 checked; ratios against direct on loopback and "
          f"through the same delay")
    print(f"{'':36} {'MB/s':>8} {'vs loopback':>12} {'vs path':>8}")
    for label, rate in rows:
        print(f"{label:36} {rate:8.2f} {rate / base:11.3f}x {rate / path_base:7.3f}x")


if __name__ == "__main__":
    main()
