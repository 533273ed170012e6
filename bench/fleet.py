"""A fleet on PostgreSQL: what a command and an event cost between masters.

    python bench/fleet.py [--counts 10,100,1000] [--samples 50]

Starts a PostgreSQL of its own (Debian's package, tests/postgres.py: a Unix socket in a
temporary directory, nothing on TCP) and two masters on it, A and B.  For each count, B
runs that many server instances (created through B's own API, each a real process with
the default REPORT_INTERVAL of 5 s: the updates they cause are the load the fleet
carries), then:

- command round trip: PUT alias on one of B's instances, asked of A (through the
  database to B and back) against the same PUT asked of B itself (direct), p50 / p99;
- action round trip: stop + start of one of B's instances asked of A, against B itself;
- event delay between masters: B changes an instance's alias; the time until A's event
  stream tells it, against B's own stream (direct), p50 / p99;
- notifications per second the fleet carries at that count (pg_stat: NOTIFY queue use).

Loopback only; every wait is bounded; the instances, masters and PostgreSQL are gone
at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.postgres import Postgres, need_postgres  # noqa: E402

KEY = "bench-fleet-key-0123456789"
SERVER = "server://127.0.0.1:0/127.0.0.1:0?log=warn"


class Master:
    def __init__(self, name: str, pg: Postgres) -> None:
        self.name = name
        self.state = tempfile.mkdtemp(prefix=f"np-fleet-{name}-")
        self.out = open(os.path.join(self.state, "out"), "w+")  # noqa: SIM115
        env = {k: v for k, v in pg.env().items() if not k.startswith(("NP_", "NODEPASS_"))}
        env.update(PYTHONPATH=str(REPO), NODEPASS_API_KEY=KEY, NODEPASS_STATE_DIR=self.state,
                   NODEPASS_DATABASE_URL=pg.dsn, FLEET_HEARTBEAT="1s")
        self.proc = subprocess.Popen([sys.executable, "-m", "nodepass",
                                      "master://127.0.0.1:0?log=warn"],
                                     env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.port = self._announced_port(env)
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        self.node = self.call("GET", "/info")["master_id"]

    def _announced_port(self, env: dict[str, str]) -> int:
        # log=warn hides the announcement: ask the kernel which port the master listens on
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"master {self.name} exited: {self._tail()}")
            ports = _listening_ports(self.proc.pid)
            if ports:
                return min(ports)
            time.sleep(0.05)
        raise SystemExit(f"master {self.name} did not listen within 20 s")

    def _tail(self) -> str:
        self.out.seek(0)
        return self.out.read()[-2000:]

    def call(self, method: str, path: str, body: object = None, timeout: float = 30) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "X-API-Key": KEY, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            envelope = json.loads(response.read())
        if not envelope["success"]:
            raise SystemExit(f"{method} {path}: {envelope['error']}")
        return envelope["data"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()
        shutil.rmtree(self.state, ignore_errors=True)


def _listening_ports(pid: int) -> list[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.append(int(fields[1].split(":")[1], 16))
    return ports


class Stream(threading.Thread):
    """A master's seed event stream, noting when each alias was first told."""

    def __init__(self, master: Master) -> None:
        super().__init__(daemon=True)
        self.seen: dict[str, float] = {}
        self.connection = http.client.HTTPConnection("127.0.0.1", master.port, timeout=60)
        self.connection.request("GET", "/api/v1/events", headers={"X-API-Key": KEY})
        self.response = self.connection.getresponse()
        self.start()

    def run(self) -> None:
        kind = ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "update":
                    alias = json.loads(line[6:]).get("alias") or ""
                    if alias.startswith("mark-") and alias not in self.seen:
                        self.seen[alias] = time.perf_counter()
        except (OSError, ValueError):
            return

    def wait(self, alias: str, timeout: float = 10.0) -> float:
        end = time.perf_counter() + timeout
        while alias not in self.seen:
            if time.perf_counter() > end:
                raise SystemExit(f"no event for {alias} within {timeout} s")
            time.sleep(0.0005)
        return self.seen[alias]


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1,
                                                   int(len(ordered) * 0.99))]


def timed(call, samples: int) -> list[float]:
    times = []
    for n in range(samples):
        start = time.perf_counter()
        call(n)
        times.append((time.perf_counter() - start) * 1000)
    return times


def grow(b: Master, count: int, have: list[str]) -> None:
    while len(have) < count:
        have.append(b.call("POST", "/instances", {"url": SERVER})["id"])


def notifications_per_second(pg: Postgres, seconds: float = 5.0) -> float:
    """How many notifications the fleet sends, counted by a listener of our own."""
    import psycopg

    with psycopg.connect(pg.dsn, password=pg.password, autocommit=True) as conn:
        conn.execute("LISTEN nodepass")
        count, end = 0, time.monotonic() + seconds
        for _ in conn.notifies(timeout=seconds, stop_after=None):
            count += 1
            if time.monotonic() > end:
                break
        return count / seconds


def measure(count: int, a: Master, b: Master, subject: str, samples: int,
            a_stream: Stream, b_stream: Stream, pg: Postgres) -> tuple:
    path = f"/instances/{subject}"
    fleet = timed(lambda n: a.call("PUT", path, {"alias": f"a{count}-{n}"}), samples)
    direct = timed(lambda n: b.call("PUT", path, {"alias": f"b{count}-{n}"}), samples)
    actions = max(5, samples // 5)
    fleet_action = timed(lambda n: a.call("PUT", path, {"action": "restart"}), actions)
    direct_action = timed(lambda n: b.call("PUT", path, {"action": "restart"}), actions)
    delays, local = [], []
    for n in range(samples):
        alias = f"mark-{count}-{n}"
        sent = time.perf_counter()
        b.call("PUT", path, {"alias": alias})
        delays.append((a_stream.wait(alias) - sent) * 1000)
        local.append((b_stream.wait(alias) - sent) * 1000)
    return (count, percentiles(fleet), percentiles(direct), percentiles(fleet_action),
            percentiles(direct_action), percentiles(delays), percentiles(local),
            notifications_per_second(pg))


def run(counts: list[int], samples: int) -> None:
    need_postgres()
    pg = Postgres().start()
    a = b = None
    try:
        a, b = Master("A", pg), Master("B", pg)
        end = time.monotonic() + 15
        while not any(n["id"] == b.node and n["online"]
                      for n in a.call("GET", "/nodes")["nodes"]):
            if time.monotonic() > end:
                raise SystemExit("A never saw B")
            time.sleep(0.1)
        a_stream, b_stream = Stream(a), Stream(b)
        ids: list[str] = []
        rows = []
        for count in counts:
            grow(b, count, ids)
            time.sleep(6)  # one REPORT_INTERVAL with every instance reporting
            rows.append(measure(count, a, b, ids[0], samples, a_stream, b_stream, pg))
            print(f"{count} instances done", file=sys.stderr, flush=True)
        print("| instances on B | command A→B p50/p99 ms (B direct) | ratio p50 | restart "
              "A→B p50/p99 ms (B direct) | event B→A p50/p99 ms (B's own stream) | "
              "ratio p50 | notifications/s |")
        print("|---|---|---|---|---|---|---|")
        for count, fl, di, fa, da, de, lo, rate in rows:
            print(f"| {count} | {fl[0]:.1f} / {fl[1]:.1f} ({di[0]:.1f} / {di[1]:.1f}) | "
                  f"{fl[0] / di[0]:.1f} | {fa[0]:.0f} / {fa[1]:.0f} ({da[0]:.0f} / "
                  f"{da[1]:.0f}) | {de[0]:.1f} / {de[1]:.1f} ({lo[0]:.1f} / {lo[1]:.1f}) | "
                  f"{de[0] / lo[0]:.1f} | {rate:.0f} |")
    finally:
        for master in (a, b):
            if master is not None:
                master.stop()
        pg.cleanup()


def heard_cost(count: int = 1000) -> float:
    """Milliseconds of a master's reactor to take in ``count`` updates from another node
    (the notifications verified and parsed, the mirror updated, both dialects' events
    rendered), in this process with the master's own pieces and no database; the
    instances were first shown from their rows (which carry the URL), as at start."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from nodepass.master.api import MasterAPI
    from nodepass.master.events import EventHub
    from nodepass.master.fleet import Fleet
    from nodepass.master.instances import Instance, snapshot
    from nodepass.master.npapi import NodePassAPI
    from nodepass.master.outbox import Outbox
    from nodepass.master.pgstore import signed
    from nodepass.master.registry import Registry
    from nodepass.master.state import ApiKey
    from nodepass.master.store import Store
    from nodepass.master.tcping import TcpPing
    from nodepass.master.web import KeyCheck
    from nodepass.tunables import Tunables
    from nodepass.url import MasterConfig, parse

    clock, me, other = Clock(), "a" * 16, "b" * 16
    store = Store.open(None)
    store.set_setting("mid", me)
    registry = Registry(clock, MasterConfig(), Tunables(), {}, store, EventHub(clock))
    keys = KeyCheck(ApiKey(KEY), clock)
    MasterAPI(registry, "/api", keys)
    NodePassAPI(registry, "/api/np", keys, TcpPing(clock))
    secret = b"s" * 32
    fleet = Fleet(clock, registry, SimpleNamespace(
        node=me, outbox=Outbox((), {}, lambda f: False), degraded=None, run=1, secret=secret,
        sign=lambda text: signed(secret, text), db=None))
    fleet.deaf = None
    registry.fleet = fleet

    def notices(kind: str, order: int) -> list[str]:
        told = []
        for n in range(count):
            instance = Instance(f"ins_{n:08x}", parse(
                f"server://127.0.0.1:{10000 + n}/127.0.0.1:{30000 + n}"), 100.0,
                status="running", node=other)
            instance.report.update(connections=1, pool=8, ping_ms=1.2, state="waiting",
                                   mode="reverse", transport="tcp")
            data = snapshot(instance)
            data["q"] = [1.0, order * count + n]
            shown = fleet.public(data) if kind == "update" else data  # as notices carry them
            told.append(signed(secret, json.dumps({"k": kind, "n": other, "i": instance.id,
                                                   "s": shown})))
        return told

    for text in notices("create", 0):
        fleet._heard(text)
    best = float("inf")
    for round_ in range(1, 4):
        updates = notices("update", round_)
        start = time.perf_counter()
        for text in updates:
            fleet._heard(text)
        best = min(best, (time.perf_counter() - start) * 1000)
    store.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,1000")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    run([int(c) for c in args.counts.split(",")], args.samples)
    print(f"\nreactor time for one master to take in 1,000 updates from another: "
          f"{heard_cost():.0f} ms (best of 3, in process)")


if __name__ == "__main__":
    main()
