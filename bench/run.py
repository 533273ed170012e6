"""nodepass benchmarks: each workload directly against the backends and through a
real nodepass server + client pair, in the same run, on 127.0.0.1.

    python bench/run.py [--quick] [--tls 0,1] [--types 0,2] [--repeat 3] [--peer CMD]

Workloads (sizes shrink with --quick):
- bulk_up / bulk_down: MiB over one connection, sha256-verified; MB/s
- rr: round trips of 64 bytes on one connection; p50/p99 in microseconds
- connect: sequential short connections (connect, 1 KiB echo, close); connections/s
- udp: echo round trips of 512 bytes; round trips/s, lost

Every figure is the median of --repeat runs; the table quotes tunnel/direct ratios, the
honest measure on a noisy 2-core machine.  Traffic goes to 127.0.0.1 only; every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BLOCK = bytes(range(256)) * 1024
DEADLINE = 120.0  # no single workload may run longer than this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict | None = None,
              program: list[str] | None = None) -> subprocess.Popen:
        """``python ARGS`` (this interpreter), or ``PROGRAM ARGS``."""
        environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        log = os.environ.get("BENCH_LOG_DIR")
        out = (open(os.path.join(log, f"{len(self.procs)}.log"), "w")  # noqa: SIM115
               if log else subprocess.DEVNULL)  # BENCH_LOG_DIR=DIR keeps each process's log
        proc = subprocess.Popen([*(program or [sys.executable]), *args], env=environment,
                                stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- workloads -----------------------------------------------------------------


def bulk_up(port: int, mib: int) -> float:
    total = mib * 1024 * 1024
    digest = hashlib.sha256()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        sent = 0
        while sent < total:
            chunk = BLOCK[: min(len(BLOCK), total - sent)]
            s.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(128):
            answer += chunk
    elapsed = time.perf_counter() - start
    if answer.decode() != digest.hexdigest():
        raise RuntimeError("bulk_up: digest mismatch")
    return total / elapsed / 1e6


def bulk_down(port: int, mib: int) -> float:
    total = mib * 1024 * 1024
    digest = hashlib.sha256()
    start = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(b"%d\n" % total)
        while chunk := s.recv(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    elapsed = time.perf_counter() - start
    expected = hashlib.sha256()
    left = total
    while left:
        piece = BLOCK[: min(len(BLOCK), left)]
        expected.update(piece)
        left -= len(piece)
    if got != total or digest.digest() != expected.digest():
        raise RuntimeError(f"bulk_down: got {got} of {total} bytes or a wrong digest")
    return total / elapsed / 1e6


def rr(port: int, count: int) -> tuple[float, float]:
    payload = b"r" * 64
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t = time.perf_counter()
            s.sendall(payload)
            got = b""
            while len(got) < 64:
                got += s.recv(64 - len(got))
            samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def short_echo(port: int) -> bool:
    """Connect, send 1 KiB, half-close, read the echo to the end: was it intact?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"c" * 1024)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            return got == b"c" * 1024
    except OSError:
        return False


def connect(port: int, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        if not short_echo(port):
            raise RuntimeError("connect: echo mismatch")
        if time.perf_counter() - start > DEADLINE:
            raise RuntimeError("connect: deadline")
    return count / (time.perf_counter() - start)


def udp(port: int, count: int) -> tuple[float, int]:
    payload = b"u" * 512
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect(("127.0.0.1", port))
        start = time.perf_counter()
        for _ in range(count):
            s.send(payload)
            try:
                s.recv(2048)
            except TimeoutError:
                lost += 1
        elapsed = time.perf_counter() - start
    return count / elapsed, lost


def connect_concurrent(port: int, count: int, parallel: int = 50) -> tuple[float, int]:
    """``count`` short connections, ``parallel`` at a time: connections/s and failures."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(short_echo, [port] * count))
    return count / (time.perf_counter() - start), results.count(False)


def concurrent(port: int, connections: int, rounds: int = 100) -> tuple[float, int]:
    """``connections`` open at once, each echoing ``rounds`` x 1 KiB: seconds, failures."""
    import asyncio

    async def one(index: int) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 30)
            payload = index.to_bytes(4, "big") * 256
            for _ in range(rounds):
                writer.write(payload)
                got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
                if got != payload:
                    return False
            writer.close()
            return True
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False

    async def all_of_them() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(connections)))

    start = time.perf_counter()
    results = asyncio.run(all_of_them())
    return time.perf_counter() - start, results.count(False)


def iperf3(port: int | None, seconds: int, reverse: bool) -> float | None:
    """Gbit/s from the iperf3 C client, or None when iperf3 is not installed (or the column
    has no iperf3 port)."""
    import shutil

    if shutil.which("iperf3") is None or port is None:
        return None
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    if reverse:
        args.append("-R")
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30)
    report = json.loads(out.stdout)
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_connections_rss(port: int, count: int, pids: list[int]) -> float:
    """KiB of RSS, summed over ``pids``, per idle relayed connection (``count`` held open)."""
    before = sum(rss_kib(p) for p in pids)
    held = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"x")
            s.recv(1)
            held.append(s)
        time.sleep(1.0)
        after = sum(rss_kib(p) for p in pids)
    finally:
        for s in held:
            s.close()
    return (after - before) / count


class UdpEcho:
    """A UDP echo backend in its own process."""

    SCRIPT = ("import socket,sys\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "s.bind(('127.0.0.1',int(sys.argv[1])))\n"
              "while True:\n d,a=s.recvfrom(65535)\n s.sendto(d,a)\n")


def median(values: list) -> float:
    return statistics.median(values)


Column = tuple[str, str | None, str, list[str] | None]


def setups(args: argparse.Namespace) -> list[Column]:
    """(label, server query or None for no server, client query, the program: None for
    this nodepass, else the --peer command) for each column."""
    columns: list[Column] = [
        (f"tls={tls}", f"?tls={tls}&log=warn", "?log=warn&mode=2", None) for tls in args.tls]
    if "forward" in args.modes:
        columns.append(("forward", "?tls=0&mode=2&log=warn", "?log=warn&mode=2", None))
    if "single-end" in args.modes:
        columns.append(("single-end", None, "?mode=1&log=warn", None))
    if "block" in args.modes:  # every user's first bytes judged: no splice fast path
        columns.append(("block=123", "?tls=0&block=123&log=warn", "?log=warn&mode=2", None))
    for pool_type in args.types:
        if pool_type == 0:
            continue  # the tls= columns are type=0
        columns += [(f"type={pool_type} tls={tls}", f"?type={pool_type}&tls={tls}&log=warn",
                     "?log=warn&mode=2", None) for tls in args.tls]
    if args.peer:
        program = shlex.split(args.peer)
        name = args.peer_name or os.path.basename(program[0])
        columns += [(f"{name} tls={tls}", f"?tls={tls}&log=warn", "?log=warn&mode=2", program)
                    for tls in args.tls]
    return columns


def start_tunnel_end(procs: Procs, program: list[str] | None, url: str,
                     env: dict) -> subprocess.Popen:
    """This nodepass (``python -m nodepass URL``) or the --peer program (``PROGRAM URL``)."""
    if program is None:
        return procs.start("-m", "nodepass", url, env=env)
    return procs.start(url, env=env, program=program)


def run(args: argparse.Namespace) -> dict:
    sizes = {"bulk_mib": 64 if args.quick else 1024, "rr": 2000 if args.quick else 20000,
             "connect": 200 if args.quick else 2000, "udp": 2000 if args.quick else 20000,
             "concurrent": 200 if args.quick else 1000, "iperf_s": 3 if args.quick else 8,
             "idle": 200 if args.quick else 1000}
    procs = Procs()
    results: dict = {"sizes": sizes, "runs": {}}
    try:
        echo, sink, source, udp_port = free_port(), free_port(), free_port(), free_port()
        iperf = free_port()
        procs.start(str(HERE / "backends.py"), str(echo), str(sink), str(source))
        procs.start("-c", UdpEcho.SCRIPT, str(udp_port))
        if shutil.which("iperf3"):
            procs.procs.append(subprocess.Popen(
                ["iperf3", "-s", "-p", str(iperf), "-B", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(echo)
        targets = {"direct": {"echo": echo, "sink": sink, "source": source, "udp": udp_port,
                              "iperf": iperf}}
        servers = {}
        for label, server_query, client_query, program in setups(args):
            ports = {}
            for name, backend in (("echo", echo), ("sink", sink), ("source", source),
                                  ("udp", udp_port), ("iperf", iperf)):
                tunnel, exposed = free_port(), free_port()
                env = {"MIN_POOL_CAPACITY": "64"}
                if server_query is None and name == "iperf":
                    # Single-end opens target connections ahead of users, and iperf3's
                    # server takes a silent connection for a client that holds it busy.
                    ports[name] = None
                    continue
                if server_query is None:  # single-end: the client alone forwards
                    client = start_tunnel_end(
                        procs, program, f"client://127.0.0.1:{exposed}/127.0.0.1:{backend}"
                        f"{client_query}", env)
                    servers[(label, name)] = (client,)
                else:
                    forward = "mode=2" in server_query
                    server = start_tunnel_end(
                        procs, program, f"server://bench@127.0.0.1:{tunnel}/127.0.0.1:"
                        f"{backend if forward else exposed}{server_query}", env)
                    wait_port(tunnel)
                    client = start_tunnel_end(
                        procs, program, f"client://bench@127.0.0.1:{tunnel}/127.0.0.1:"
                        f"{exposed if forward else backend}{client_query}", env)
                    servers[(label, name)] = (server, client)
                ports[name] = exposed
                wait_port(exposed)
            time.sleep(1.5)  # let the pools fill
            targets[label] = ports
        idle_rss = {key: [rss_kib(p.pid) for p in pair] for key, pair in servers.items()}
        cpu_before = {key: [cpu_seconds(p.pid) for p in pair] for key, pair in servers.items()}
        for label, ports in targets.items():
            row = {}
            echo_pair = [p.pid for p in servers.get((label, "echo"), ())]
            for direction, reverse in (("up", False), ("down", True)):
                row[f"iperf3_{direction}_Gbps"] = iperf3(ports["iperf"], sizes["iperf_s"],
                                                        reverse)
            row["bulk_up_MBps"] = median([bulk_up(ports["sink"], sizes["bulk_mib"])
                                          for _ in range(args.repeat)])
            row["bulk_down_MBps"] = median([bulk_down(ports["source"], sizes["bulk_mib"])
                                            for _ in range(args.repeat)])
            rrs = [rr(ports["echo"], sizes["rr"]) for _ in range(args.repeat)]
            row["rr_p50_us"] = median([p50 for p50, _ in rrs])
            row["rr_p99_us"] = median([p99 for _, p99 in rrs])
            row["connect_per_s"] = median([connect(ports["echo"], sizes["connect"])
                                           for _ in range(args.repeat)])
            udps = [udp(ports["udp"], sizes["udp"]) for _ in range(args.repeat)]
            row["udp_rt_per_s"] = median([r for r, _ in udps])
            row["udp_lost"] = max(lost for _, lost in udps)
            rate, failed = connect_concurrent(ports["echo"], sizes["connect"])
            row["connect50_per_s"], row["connect50_failures"] = rate, failed
            seconds, failed = concurrent(ports["echo"], sizes["concurrent"])
            row["concurrent_s"], row["concurrent_failures"] = seconds, failed
            if echo_pair:
                row["peak_rss_mib"] = sum(peak_rss_kib(p) for p in echo_pair) / 1024
                row["rss_per_idle_conn_kib"] = idle_connections_rss(
                    ports["echo"], sizes["idle"], echo_pair)
            results["runs"][label] = row
            print(f"measured {label}", file=sys.stderr, flush=True)
        results["processes"] = {
            f"{label} {name}": {
                "idle_rss_kib": idle_rss[(label, name)],
                "rss_after_kib": [rss_kib(p.pid) for p in pair],
                "cpu_seconds": [round(cpu_seconds(p.pid) - b, 2)
                                for p, b in zip(pair, cpu_before[(label, name)], strict=True)],
            }
            for (label, name), pair in servers.items()}
    finally:
        procs.stop()
    return results


def table(results: dict) -> str:
    runs = results["runs"]
    direct = runs["direct"]
    metrics = [("iperf3_up_Gbps", "iperf3 upload Gbit/s", True),
               ("iperf3_down_Gbps", "iperf3 download Gbit/s", True),
               ("bulk_up_MBps", "bulk upload MB/s", True),
               ("bulk_down_MBps", "bulk download MB/s", True),
               ("rr_p50_us", "rr 64 B p50 µs", False), ("rr_p99_us", "rr 64 B p99 µs", False),
               ("connect_per_s", "sequential connects/s", True),
               ("udp_rt_per_s", "udp 512 B round trips/s", True), ("udp_lost", "udp lost", False),
               ("connect50_per_s", "connects/s, 50 at a time", True),
               ("connect50_failures", "  failures", False),
               ("concurrent_s", "concurrent conns x 100 x 1 KiB, s", False),
               ("concurrent_failures", "  failures", False),
               ("peak_rss_mib", "server+client peak RSS, MiB", False),
               ("rss_per_idle_conn_kib", "RSS per idle relayed conn, KiB", False)]
    labels = list(runs)
    lines = ["| workload | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for key, name, higher in metrics:
        cells = []
        for label in labels:
            value = runs[label].get(key)
            if value is None:
                cells.append("-")
                continue
            cell = f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
            if (label != "direct" and direct.get(key) and "fail" not in key
                    and key != "udp_lost"):
                ratio = value / direct[key]
                cell += f" ({ratio:.2f}x)" if higher else f" (+{value - direct[key]:,.0f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or so)")
    parser.add_argument("--tls", default="0,1", help="TLS modes to measure, e.g. 0,1")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="",
                        help="extra columns: forward (server mode=2, tls=0), single-end "
                             "(client mode=1), block (server block=123, tls=0), e.g. "
                             "forward,single-end")
    parser.add_argument("--types", default="0",
                        help="pool transports: a column per type and --tls mode besides type=0, "
                             "e.g. 0,2 (WebSocket)")
    parser.add_argument("--peer", default="",
                        help="another program that takes NodePass URLs (a NodePass binary, "
                             "say): a column for it per --tls mode, started as PEER URL")
    parser.add_argument("--peer-name", default="", help="its column's name (default: the "
                                                        "program's file name)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    args.tls = [int(t) for t in args.tls.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    args.types = [int(t) for t in args.types.split(",") if t]
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets
    results = run(args)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nfigures: {args.json}")


if __name__ == "__main__":
    main()
