"""A master holding many tunnels: what each costs to create and to keep.

    python bench/master_scale.py [--counts 10,100,500] [--tls 0] [--fork 1] [--host-size N]

For each count a fresh master (on 127.0.0.1, state in a temporary directory) creates
that many server instances one after another through its API, then:

- create latency: from sending POST /v1/instances to the instance's target port
  accepting a TCP connection, p50 / p99 over the sequential creates;
- memory: PSS (``/proc/PID/smaps_rollup``) of the master and every process under it,
  in all and per instance (the whole sum divided by the count, and the growth over
  the master alone divided by the count);
- ``GET /v1/instances`` p50 over 50 calls;
- idle CPU of the master and everything under it over 10 s, in % of one core, then
  over 10 s with one subscriber reading the event stream;
- updates on that stream per instance per REPORT_INTERVAL;
- 100 creates at once (on top): how many were answered 201 and running, and in what time.

``--fork 0`` runs the master with NODEPASS_FORK=0 (a fresh interpreter per instance,
as before the fork server) for comparison; ``--host-size N`` sets NODEPASS_HOST_SIZE
(instances per host process; 1 is a process per instance, as before hosts).  The
number of processes under the master is printed too.  Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import REPO, free_port

KEY = "bench-master-scale-key-0123456789"
REPORT_INTERVAL = 5.0


class Master:
    def __init__(self, fork: bool, host_size: int | None = None) -> None:
        self.state = tempfile.mkdtemp(prefix="np-scale-")
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "NODEPASS_API_KEY": KEY,
               "NODEPASS_FORK": "1" if fork else "0",
               "REPORT_INTERVAL": f"{REPORT_INTERVAL:g}s"}
        if host_size is not None:
            env["NODEPASS_HOST_SIZE"] = str(host_size)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodepass",
             f"master://127.0.0.1:{self.port}/api?state={self.state}&log=warn"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                self.call("GET", "/info")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the master did not answer in 15 s")

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 30) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"X-API-Key": KEY,
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.state, ignore_errors=True)


def tree(root: int) -> list[int]:
    """``root`` and every process under it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def wait_listening(port: int, deadline: float) -> bool:
    while time.perf_counter() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.0005)
    return False


def create(master: Master, query: str) -> float:
    """One create; seconds until its target port accepts."""
    target = free_port()
    started = time.perf_counter()
    status, answer = master.call("POST", "/instances", {
        "url": f"server://k@127.0.0.1:0/127.0.0.1:{target}{query}"})
    if status != 201 or answer["data"]["status"] != "running":
        raise RuntimeError(f"create: {status} {answer}")
    if not wait_listening(target, started + 10):
        raise RuntimeError(f"target port {target} never listened")
    return time.perf_counter() - started


def count_updates(master: Master, seconds: float) -> int:
    """``update`` events on the stream during ``seconds``."""
    request = urllib.request.Request(master.base + "/events", headers={"X-API-Key": KEY})
    seen = [0]
    end = time.monotonic() + seconds

    def read() -> None:
        try:
            with urllib.request.urlopen(request, timeout=seconds + 5) as stream:
                while time.monotonic() < end:
                    line = stream.readline()
                    if not line:
                        return
                    if line.startswith(b"event: update"):
                        seen[0] += 1
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds + 10)
    return seen[0]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(count: int, query: str, fork: bool, host_size: int | None) -> dict:
    master = Master(fork, host_size)
    try:
        time.sleep(1.0)  # the fork server's imports (~0.3 s), paid once at master start
        alone = pss_kib(tree(master.proc.pid))
        latencies = [create(master, query) for _ in range(count)]
        time.sleep(2)
        pids = tree(master.proc.pid)
        total = pss_kib(pids)
        lists = []
        for _ in range(50):
            started = time.perf_counter()
            master.call("GET", "/instances")
            lists.append(time.perf_counter() - started)
        before = cpu_ticks(pids)
        time.sleep(10.0)
        cpu = (cpu_ticks(pids) - before) / os.sysconf("SC_CLK_TCK") / 10.0 * 100
        before = cpu_ticks(pids)
        updates = count_updates(master, 10.0)
        watched = (cpu_ticks(pids) - before) / os.sysconf("SC_CLK_TCK") / 10.0 * 100
        started = time.perf_counter()
        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda _: master.call("POST", "/instances", {
                "url": f"server://k@127.0.0.1:0/127.0.0.1:0{query}"}), range(100)))
        burst = time.perf_counter() - started
        good = sum(1 for status, a in answers
                   if status == 201 and a["data"]["status"] == "running")
        return {"count": count, "create_p50_ms": statistics.median(latencies) * 1000,
                "create_p99_ms": percentile(latencies, 0.99) * 1000,
                "pss_total_mib": total / 1024, "pss_alone_mib": alone / 1024,
                "pss_per_instance_mib": total / 1024 / count,
                "pss_growth_per_instance_mib": (total - alone) / 1024 / count,
                "list_p50_ms": statistics.median(lists) * 1000, "idle_cpu_percent": cpu,
                "watched_cpu_percent": watched,
                "updates_per_instance_per_interval": updates / count / (10.0 / REPORT_INTERVAL),
                "burst_ok": good, "burst_s": burst, "processes": len(pids)}
    finally:
        master.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10,100,500")
    parser.add_argument("--tls", type=int, default=0)
    parser.add_argument("--fork", type=int, default=1)
    parser.add_argument("--host-size", type=int, default=None)
    args = parser.parse_args()
    query = f"?tls={args.tls}" if args.tls else ""
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        rows.append(measure(count, query, bool(args.fork), args.host_size))
        print(f"measured {count}", file=sys.stderr)
    how = ("a fresh interpreter per instance" if not args.fork else
           f"hosts of up to {args.host_size or 'the default'} instances")
    print(f"server instances{' tls=' + str(args.tls) if args.tls else ''}, {how}")
    print("| instances | create p50 / p99 ms | PSS in all MiB | PSS per instance MiB "
          "(all / growth) | GET /instances p50 ms | idle CPU % (with a subscriber) | "
          "updates per instance per interval | 100 creates at once | processes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['count']} | {r['create_p50_ms']:.1f} / {r['create_p99_ms']:.1f} | "
              f"{r['pss_total_mib']:.0f} | {r['pss_per_instance_mib']:.2f} / "
              f"{r['pss_growth_per_instance_mib']:.2f} | {r['list_p50_ms']:.1f} | "
              f"{r['idle_cpu_percent']:.1f} ({r['watched_cpu_percent']:.1f}) | "
              f"{r['updates_per_instance_per_interval']:.2f} | "
              f"{r['burst_ok']}/100 in {r['burst_s']:.2f} s | {r['processes']} |")


if __name__ == "__main__":
    main()
