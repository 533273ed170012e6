"""What an idle pooled data connection costs each end, on fresh processes.

    python bench/idle_memory.py [--tls 0,1] [--count 1000]

For each TLS mode, two fresh server + client pairs run on 127.0.0.1: one keeping 16
connections in its pool, one keeping 16 + COUNT.  Once both pools are full (counted
from each process's open descriptors), the difference in RSS between the pairs,
divided by COUNT, is the cost of one idle connection at each end.  Not part of the
test suite; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import Procs, free_port, rss_kib, wait_port

BASE = 16


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def pair(procs: Procs, tls: int, pool: int) -> tuple[int, int]:
    tunnel, exposed, target = free_port(), free_port(), free_port()
    server = procs.start("-m", "nodepass", f"server://bench@127.0.0.1:{tunnel}/127.0.0.1:"
                         f"{exposed}?tls={tls}&max={pool}&log=warn")
    wait_port(tunnel)
    client = procs.start("-m", "nodepass", f"client://bench@127.0.0.1:{tunnel}/127.0.0.1:"
                         f"{target}?min={pool}&log=warn")
    wait_port(exposed)
    return server.pid, client.pid


def filled(pids: tuple[int, int], pool: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(sockets(pid) >= pool + 1 for pid in pids):
            time.sleep(1.0)  # let the last handshakes end
            return
        time.sleep(0.2)
    raise RuntimeError(f"the pool did not reach {pool} connections in {timeout:g}s")


def measure(tls: int, count: int) -> tuple[float, float]:
    procs = Procs()
    try:
        small = pair(procs, tls, BASE)
        large = pair(procs, tls, BASE + count)
        filled(small, BASE)
        filled(large, BASE + count)
        server = (rss_kib(large[0]) - rss_kib(small[0])) / count
        client = (rss_kib(large[1]) - rss_kib(small[1])) / count
        return server, client
    finally:
        procs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", default="0,1")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    print("| tls | server KiB per idle connection | client KiB per idle connection |")
    print("|---|---|---|")
    for tls in (int(t) for t in args.tls.split(",")):
        server, client = measure(tls, args.count)
        print(f"| {tls} | {server:.1f} | {client:.1f} |", flush=True)


if __name__ == "__main__":
    main()
