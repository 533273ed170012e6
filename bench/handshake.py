"""What a key attempt costs, what a flood of them gets, and what it does to a live tunnel.

    python bench/handshake.py [--quick]

1. CPU per handshake, per side: protocol 2's control handshake (SPAKE2 and the key
   confirmation) and a data connection's, in this process (process_time, median of
   batches).
2. A flood: wrong-key attempts from 200 loopback addresses (127.0.0.2-201) at a real
   server for a few seconds, as many at once as a flooder can: attempts answered with
   a PAKE (admitted) and refused per second, and the server's CPU meanwhile.
3. The live tunnel meanwhile: 64-byte round trips through a server + client pair, with
   and without the flood, as ratios to the same round trips straight to the backend.

Traffic goes to 127.0.0.0/8 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path

from run import HERE, REPO, Procs, cpu_seconds, free_port, rr, wait_port

sys.path.insert(0, str(REPO))

from nodepass.tunnel import wire
from nodepass.tunnel.handshake import ClientHandshake, ServerHandshake
from nodepass.tunnel.wire import FrameDecoder, Kind, Type

SOURCES = [f"127.0.0.{n}" for n in range(2, 202)]


def frame_of(data: bytes, preamble: bool = False) -> wire.Frame:
    decoder = FrameDecoder(expect_preamble=preamble)
    decoder.feed(data)
    return decoder.next_frame()


def control_handshake(key: bytes) -> tuple[float, float, ServerHandshake]:
    """One control handshake in memory: (client CPU s, server CPU s, the server side)."""
    server = ServerHandshake(key, 0, os.urandom(32), lambda sid: None)
    t0 = time.process_time()
    client = ClientHandshake(key, Kind.CONTROL, os.urandom(32))
    hello = client.hello()
    t1 = time.process_time()
    challenge = server.on_hello(frame_of(hello, True).payload)
    t2 = time.process_time()
    client.on_challenge(frame_of(challenge).payload)
    pake = client.pake()
    t3 = time.process_time()
    reply = server.on_pake(frame_of(pake).payload)
    t4 = time.process_time()
    auth = client.on_pake(frame_of(reply).payload, b"")
    t5 = time.process_time()
    server.on_auth(frame_of(auth).payload)
    welcome = server.welcome(b"S" * 16, {})
    t6 = time.process_time()
    client.on_welcome(frame_of(welcome).payload)
    t7 = time.process_time()
    return (t1 - t0) + (t3 - t2) + (t5 - t4) + (t7 - t6), (t2 - t1) + (t4 - t3) + (t6 - t5), \
        server


def data_handshake(session: ServerHandshake) -> tuple[float, float]:
    keys = session.keys
    server = ServerHandshake(b"k", 0, os.urandom(32), lambda sid: keys)
    t0 = time.process_time()
    client = ClientHandshake(b"k", Kind.DATA, os.urandom(32), (b"S" * 16, keys))
    hello = client.hello()
    t1 = time.process_time()
    challenge = server.on_hello(frame_of(hello, True).payload)
    t2 = time.process_time()
    client.on_challenge(frame_of(challenge).payload)
    auth = client.auth()
    t3 = time.process_time()
    server.on_auth(frame_of(auth).payload)
    welcome = server.welcome()
    t4 = time.process_time()
    client.on_welcome(frame_of(welcome).payload)
    t5 = time.process_time()
    return (t1 - t0) + (t3 - t2) + (t5 - t4), (t2 - t1) + (t4 - t3)


def cpu_per_side(count: int) -> dict[str, float]:
    control = [control_handshake(b"k") for _ in range(count)]
    data = [data_handshake(control[0][2]) for _ in range(count)]
    return {
        "control_client_ms": statistics.median(c for c, _, _ in control) * 1000,
        "control_server_ms": statistics.median(s for _, s, _ in control) * 1000,
        "data_client_ms": statistics.median(c for c, _ in data) * 1000,
        "data_server_ms": statistics.median(s for _, s in data) * 1000,
    }


class _Attempt:
    """One wrong-key attempt on a non-blocking socket: HELLO, PAKE, then the verdict."""

    PAKE = ClientHandshake(b"not-the-key", Kind.CONTROL, os.urandom(32)).pake()

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.bind((source, 0))
        self.sock.connect_ex(("127.0.0.1", port))
        self.out = ClientHandshake(b"not-the-key", Kind.CONTROL, os.urandom(32)).hello()
        self.decoder = FrameDecoder()
        self.verdict: str | None = None

    def writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.verdict = "refused"
            return
        self.out = self.out[sent:]

    def readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.verdict = "refused"
            return
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if frame.type is Type.CHALLENGE:
                self.out += self.PAKE
            elif frame.type is Type.PAKE:
                self.verdict = "admitted"


def flood(port: int, seconds: float, at_once: int = 64) -> dict[str, float]:
    """Wrong-key attempts from SOURCES, ``at_once`` in flight, for ``seconds``."""
    selector = selectors.DefaultSelector()
    counts = {"admitted": 0, "refused": 0}
    live: set[_Attempt] = set()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        while len(live) < at_once:
            attempt = _Attempt(port, SOURCES[n % len(SOURCES)])
            n += 1
            live.add(attempt)
            selector.register(attempt.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                              attempt)
        for key, events in selector.select(timeout=0.05):
            attempt = key.data
            if events & selectors.EVENT_WRITE and attempt.out:
                attempt.writable()
            if events & selectors.EVENT_READ:
                attempt.readable()
            if attempt.verdict is not None:
                counts[attempt.verdict] += 1
                live.discard(attempt)
                selector.unregister(attempt.sock)
                attempt.sock.close()
            else:
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if attempt.out else 0)
                if key.events != wanted:
                    selector.modify(attempt.sock, wanted, attempt)
    for attempt in live:
        attempt.sock.close()
    return {k: v / seconds for k, v in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batch, seconds, trips = (20, 3.0, 1000) if args.quick else (100, 8.0, 5000)

    cpu = cpu_per_side(batch)
    print("CPU per handshake (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                         cpu.items()))

    procs = Procs()
    try:
        echo, sink, source = free_port(), free_port(), free_port()
        procs.start(str(HERE / "backends.py"), str(echo), str(sink), str(source))
        wait_port(echo)
        tunnel, exposed = free_port(), free_port()
        server = procs.start("-m", "nodepass", f"server://bench@127.0.0.1:{tunnel}/"
                                               f"127.0.0.1:{exposed}?log=warn")
        wait_port(tunnel)
        procs.start("-m", "nodepass", f"client://bench@127.0.0.1:{tunnel}/127.0.0.1:{echo}"
                                      "?log=warn&mode=2")
        wait_port(exposed)
        time.sleep(1.0)  # the pool fills
        direct = rr(echo, trips)
        quiet = rr(exposed, trips)

        flooder = procs.start(str(Path(__file__)), "--flood", str(tunnel), str(seconds))
        time.sleep(0.5)
        before = cpu_seconds(server.pid)
        started = time.monotonic()
        loaded = rr(exposed, trips)
        flooder.wait(seconds + 30)
        spent = cpu_seconds(server.pid) - before
        elapsed = time.monotonic() - started
        direct_after = rr(echo, trips)
        rates = Path(os.environ.get("BENCH_FLOOD_OUT", "/tmp/nodepass-flood.txt")).read_text()
    finally:
        procs.stop()
    base = statistics.mean([direct[0], direct_after[0]])
    print(f"flood of wrong-key attempts from {len(SOURCES)} addresses: {rates.strip()}; "
          f"server CPU {spent / elapsed * 100:.0f}% of a core meanwhile")
    print(f"round trip p50 (ratio to direct {base:.0f} µs): quiet {quiet[0]:.0f} µs "
          f"({quiet[0] / base:.2f}x), during the flood {loaded[0]:.0f} µs "
          f"({loaded[0] / base:.2f}x); p99 quiet {quiet[1]:.0f} µs, flood {loaded[1]:.0f} µs")


def flood_main(port: int, seconds: float) -> None:
    rates = flood(port, seconds)
    Path(os.environ.get("BENCH_FLOOD_OUT", "/tmp/nodepass-flood.txt")).write_text(
        f"{rates['admitted']:.1f} admitted/s, {rates['refused']:.0f} refused/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--flood"]:
        flood_main(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
