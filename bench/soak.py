"""Soak: a tunnel under steady mixed load for a while, its memory sampled over time.

    python bench/soak.py [--minutes 10] [--tls 0] [--workers 8]

Workers on 127.0.0.1 loop over short connections (1 KiB echo), 1 MiB transfers and UDP
datagrams until the time is up; every 10 s the RSS and descriptor count of the server and
the client are printed.  At the end it reports the growth from the first sample after
warm-up to the last: a leak shows as steady growth.  Bounded in time; loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import HERE as BENCH  # noqa: E402
from run import Procs, UdpEcho, free_port, rss_kib, short_echo, wait_port  # noqa: E402


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker(port: int, udp_port: int, stop: float, counts: dict, lock: threading.Lock) -> None:
    n = 0
    block = b"s" * (1 << 20)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one source, one session
    udp.settimeout(2)
    udp.connect(("127.0.0.1", udp_port))
    while time.monotonic() < stop:
        n += 1
        kind = "bulk" if n % 20 == 0 else "udp" if n % 5 == 0 else "short"
        try:
            if kind == "bulk":
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(block)
                    s.shutdown(socket.SHUT_WR)
                    got = 0
                    while chunk := s.recv(1 << 16):
                        got += len(chunk)
                ok = got == len(block)
            elif kind == "udp":
                udp.send(b"d" * 512)
                ok = len(udp.recv(2048)) == 512
            else:
                ok = short_echo(port)
        except OSError:
            ok = False
        with lock:
            counts["ok" if ok else "failed"] += 1
            if not ok:
                counts[f"failed_{kind}"] = counts.get(f"failed_{kind}", 0) + 1
    udp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tls", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", default=str(HERE / "results" / "soak.json"))
    args = parser.parse_args()
    procs = Procs()
    samples = []
    counts = {"ok": 0, "failed": 0}
    try:
        echo, sink, source, udp_echo = free_port(), free_port(), free_port(), free_port()
        procs.start(str(BENCH / "backends.py"), str(echo), str(sink), str(source))
        procs.start("-c", UdpEcho.SCRIPT, str(udp_echo))
        wait_port(echo)
        tunnel, exposed = free_port(), free_port()
        server = procs.start("-m", "nodepass", f"server://soak@127.0.0.1:{tunnel}/"
                             f"127.0.0.1:{exposed}?tls={args.tls}&log=warn")
        wait_port(tunnel)
        client = procs.start("-m", "nodepass",
                             f"client://soak@127.0.0.1:{tunnel}/127.0.0.1:{echo}?log=warn")
        # UDP goes to the echo port too: the client's target is the TCP echo; a second pair
        # carries UDP to the UDP echo
        utunnel, uexposed = free_port(), free_port()
        procs.start("-m", "nodepass", f"server://soak@127.0.0.1:{utunnel}/"
                    f"127.0.0.1:{uexposed}?tls={args.tls}&log=warn")
        wait_port(utunnel)
        procs.start("-m", "nodepass",
                    f"client://soak@127.0.0.1:{utunnel}/127.0.0.1:{udp_echo}?log=warn")
        wait_port(exposed)
        time.sleep(2)
        start = time.monotonic()
        stop = start + args.minutes * 60
        lock = threading.Lock()
        threads = [threading.Thread(target=worker, args=(exposed, uexposed, stop, counts, lock),
                                    daemon=True) for _ in range(args.workers)]
        for t in threads:
            t.start()
        print("  t(s)  server RSS MiB  client RSS MiB  server fds  client fds  ok  failed")
        while time.monotonic() < stop:
            time.sleep(min(10.0, max(0.0, stop - time.monotonic())))
            sample = {"t": round(time.monotonic() - start),
                      "server_mib": rss_kib(server.pid) / 1024,
                      "client_mib": rss_kib(client.pid) / 1024,
                      "server_fds": fd_count(server.pid), "client_fds": fd_count(client.pid),
                      **counts}
            samples.append(sample)
            print(f"{sample['t']:6} {sample['server_mib']:15.1f} {sample['client_mib']:15.1f}"
                  f" {sample['server_fds']:11} {sample['client_fds']:11} {counts['ok']:6}"
                  f" {counts['failed']:7}", flush=True)
        for t in threads:
            t.join(30)
    finally:
        procs.stop()
    warm = samples[min(2, len(samples) - 1)]
    last = samples[-1]
    growth = {"server_mib": last["server_mib"] - warm["server_mib"],
              "client_mib": last["client_mib"] - warm["client_mib"]}
    print(f"\ngrowth after warm-up (t={warm['t']}s → t={last['t']}s): server "
          f"{growth['server_mib']:+.1f} MiB, client {growth['client_mib']:+.1f} MiB; "
          f"{counts['ok']} operations ok, {counts['failed']} failed "
          f"({ {k: v for k, v in counts.items() if k.startswith('failed_')} })")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"samples": samples, "growth": growth,
                                           "counts": counts}, indent=2))


if __name__ == "__main__":
    main()
