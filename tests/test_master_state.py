"""The master beyond the seed: durable state, restart policy, events, history, metrics."""

import json
import os
import signal
import socket
import sqlite3

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from nodepass.master.store import MIGRATIONS
from tests.integration import eventually, free_port, http_backend, need, sleep, spawn
from tests.test_master_api import KEY, Api, api_tunnel, start_master


def server_url():
    return f"server://k@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


async def restart_master(case, master, name="master-2", **env):
    again = spawn(case, f"master://127.0.0.1:{master.port}", name=name,
                  NODEPASS_STATE_DIR=str(master.state), NODEPASS_API_KEY=KEY,
                  REPORT_INTERVAL="500ms", **env)
    again.base, again.state, again.port = master.base, master.state, master.port
    await again.wait_for("master API at")
    return again


class Durable(TestCase):
    timeout = 120

    async def test_restart_survival_after_sigterm(self):
        master = await start_master(self)
        api = Api(master.base)
        running = await api.ok("POST", "/instances", {
            "url": server_url(), "alias": "edge", "tags": {"site": "paris"}, "restart": True},
            status=201)
        stopped = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        await api.ok("PUT", f"/instances/{stopped['id']}", {"action": "stop"})
        before = {i["id"]: i for i in (await api.ok("GET", "/instances"))["instances"]}
        self.assertEqual(await master.stop(), 0)

        again = await restart_master(self, master)
        await _until_status(api, running["id"], "running")
        after = {i["id"]: i for i in (await api.ok("GET", "/instances"))["instances"]}
        self.assertEqual(set(after), set(before))
        for key in ("url", "created_at", "alias", "tags", "restart", "type"):
            self.assertEqual(after[running["id"]][key], before[running["id"]][key], key)
        self.assertEqual(after[running["id"]]["status"], "running")
        self.assertEqual(after[stopped["id"]]["status"], "stopped")
        await again.wait_for("restored 2 instances from the state database")

    async def test_kill_9_right_after_201_keeps_the_instance(self):
        master = await start_master(self)
        api = Api(master.base)
        created = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        await master.stop(signal.SIGKILL)
        await eventually(lambda: gone(created["pid"]), timeout=15)
        await restart_master(self, master)
        await _until_status(api, created["id"], "running")
        got = await api.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["url"], got["created_at"], got["status"]),
                         (created["url"], created["created_at"], "running"))

    async def test_counters_survive_a_restart(self):
        curl = need("curl", "curl")
        backend = await http_backend(self, b"page", b"p" * 50_000)
        master = await start_master(self)
        api = Api(master.base)
        server, _, exposed = await api_tunnel(api, backend)
        await master.wait_for(rf"\[{server['id']}\] client .* tunnel session open")
        await _fetch(curl, exposed)
        path = f"/instances/{server['id']}"

        async def out():
            return (await api.ok("GET", path))["tcp_out"]

        for _ in range(50):
            if await out() >= 50_000:
                break
            await sleep(0.1)
        counted = await out()
        self.assertGreaterEqual(counted, 50_000)
        await master.stop()
        await restart_master(self, master)
        self.assertEqual(await out(), counted)

    async def test_migration_from_schema_1(self):
        master = await start_master(self)
        await master.stop()
        db = master.state / "nodepass.db"
        db.unlink()
        old = sqlite3.connect(db)
        for statement in MIGRATIONS[0]:
            old.execute(statement)
        old.execute("INSERT INTO instances VALUES ('ins_0ld0ld00', ?, 1700000000.0, 'stopped')",
                    (server_url() + "?log=info&tls=0",))
        old.execute("PRAGMA user_version=1")
        old.commit()
        old.close()
        await restart_master(self, master)
        got = await Api(master.base).ok("GET", "/instances/ins_0ld0ld00")
        self.assertEqual((got["status"], got["created_at"], got["tags"], got["restart"]),
                         ("stopped", "2023-11-14T22:13:20Z", {}, False))
        check = sqlite3.connect(db)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        check.close()

    async def refused(self, prepare, fragment):
        master = await start_master(self)
        await master.stop()
        db = master.state / "nodepass.db"
        prepare(db)
        content = db.read_bytes()
        again = spawn(self, f"master://127.0.0.1:{master.port}", name="master-2",
                      NODEPASS_STATE_DIR=str(master.state), NODEPASS_API_KEY=KEY)
        self.assertEqual(await again.ended.addTimeout(20, reactor), 1)
        await again.wait_for(fragment)
        self.assertEqual(db.read_bytes(), content, "the database must not be touched")

    async def test_newer_schema_is_refused(self):
        def newer(db):
            con = sqlite3.connect(db)
            con.execute("PRAGMA user_version=99")
            con.commit()
            con.close()

        await self.refused(newer, "FATAL .*schema version 99, newer than this nodepass")

    async def test_corrupt_database_is_refused(self):
        def corrupt(db):
            for extra in ("-wal", "-shm"):
                db.with_name(db.name + extra).unlink(missing_ok=True)
            db.write_bytes(b"this is not a database at all" * 100)

        await self.refused(corrupt, "FATAL .*unreadable or corrupt")

    async def test_persist_0_keeps_nothing(self):
        master = await start_master(self, query="?persist=0")
        await master.wait_for("persist=0: instances live in memory")
        await Api(master.base).ok("POST", "/instances", {"url": server_url()}, status=201)
        self.assertFalse((master.state / "nodepass.db").exists())
        await master.stop()
        again = spawn(self, f"master://127.0.0.1:{master.port}?persist=0", name="master-2",
                      NODEPASS_STATE_DIR=str(master.state), NODEPASS_API_KEY=KEY)
        await again.wait_for("master API at")
        self.assertEqual((await Api(master.base).ok("GET", "/instances"))["instances"], [])


async def _until_status(api, instance_id, status, timeout=10.0):
    """Restored instances start in the background: wait (bounded) for ``status``."""
    for _ in range(int(timeout * 10)):
        if (await api.ok("GET", f"/instances/{instance_id}"))["status"] == status:
            return
        await sleep(0.1)
    raise AssertionError(f"{instance_id} never became {status}")


async def _fetch(curl, port):
    from twisted.internet.utils import getProcessOutputAndValue

    out, _, code = await getProcessOutputAndValue(
        curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{port}/page"])
    assert code == 0, code
    return out


class RestartPolicy(TestCase):
    timeout = 120

    async def test_backoff_grows_is_capped_and_resets_after_health(self):
        master = await start_master(self, SERVICE_COOLDOWN="200ms")
        api = Api(master.base)
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        created = await api.ok("POST", "/instances", {
            "url": f"server://k@127.0.0.1:{port}/127.0.0.1:{free_port()}", "restart": True},
            status=201)
        self.assertEqual(created["status"], "error")
        expected = ["0.2", "0.4", "0.8", "1.6", "2.4", "2.4"]  # capped at 12 cooldowns
        for n, delay in enumerate(expected, 1):
            await master.wait_for(rf"instance {created['id']} will be restarted in {delay}s "
                                  rf"\(attempt {n}\)")
        got = await api.ok("GET", f"/instances/{created['id']}")
        self.assertGreaterEqual(got["restarts"], 5)
        self.assertIn("Address already in use", got["error"])
        blocker.close()  # the port is free: the next attempt runs
        path = f"/instances/{created['id']}"

        async def running():
            return (await api.ok("GET", path))["status"] == "running"

        for _ in range(100):
            if await running():
                break
            await sleep(0.1)
        self.assertTrue(await running())
        await sleep(2.5)  # 10 cooldowns of health
        os.kill((await api.ok("GET", path))["pid"], signal.SIGKILL)
        await master.wait_for(rf"instance {created['id']} will be restarted in 0.2s "
                              r"\(attempt 1\)", nth=2)

    async def test_restart_false_stays_in_error(self):
        master = await start_master(self, SERVICE_COOLDOWN="200ms")
        api = Api(master.base)
        created = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        os.kill(created["pid"], signal.SIGKILL)
        await sleep(1.5)
        got = await api.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["status"], got["restarts"]), ("error", 0))
        self.assertEqual(master.count("will be restarted"), 0)
        # and it can be turned on by update
        updated = await api.ok("PUT", f"/instances/{created['id']}", {"restart": True})
        self.assertTrue(updated["restart"])


class SSE:
    """A real HTTP client on /v1/events, collecting (id, event, data)."""

    def __init__(self):
        self.events = []
        self.buffer = b""
        self.response = None
        self.waiters = []

    async def connect(self, base, last_id=None):
        headers = {"X-API-Key": [KEY], "Accept": ["text/event-stream"]}
        if last_id is not None:
            headers["Last-Event-ID"] = [str(last_id)]
        self.response = await treq.get(base + "/events", headers=headers, unbuffered=True,
                                       persistent=False)
        self.done = treq.collect(self.response, self._chunk)
        return self

    def _chunk(self, data):
        self.raw = getattr(self, "raw", b"") + data
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields = {}
            for line in block.decode().splitlines():
                if line.startswith(":"):
                    continue
                key, _, value = line.partition(": ")
                fields[key] = value
            if "event" in fields:
                self.events.append((int(fields["id"]), fields["event"],
                                    json.loads(fields["data"])))
        for waiter in list(self.waiters):
            kind, d = waiter
            if any(e[1] == kind for e in self.events):
                self.waiters.remove(waiter)
                d.callback(None)

    def kinds(self):
        return [e[1] for e in self.events]

    def wait(self, kind, timeout=20):
        d = Deferred()
        self.waiters.append((kind, d))
        self._chunk(b"")
        return d.addTimeout(timeout, reactor)



class Events(TestCase):
    timeout = 120

    async def test_event_order_and_resume(self):
        master = await start_master(self)
        api = Api(master.base)
        sse = await SSE().connect(master.base)
        await sse.wait("initial")
        created = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        await sse.wait("create")
        await sse.wait("update")
        await sse.wait("log")
        await api.ok("DELETE", f"/instances/{created['id']}")
        await sse.wait("delete")
        ids = [e[0] for e in sse.events]
        self.assertEqual(ids[1:], sorted(ids[1:]))
        kinds = sse.kinds()
        self.assertEqual(kinds[0], "initial")
        self.assertLess(kinds.index("create"), kinds.index("update"))
        self.assertLess(kinds.index("update"), kinds.index("delete"))
        log = next(e[2] for e in sse.events if e[1] == "log")
        self.assertEqual(log["id"], created["id"])
        await eventually(lambda: b": keep-alive" in sse.raw, timeout=5)  # every 1.5 s here
        code, envelope, _ = await Api(master.base, key="wrong").call("GET", "/events")
        self.assertEqual((code, envelope["error"]["code"]), (401, "UNAUTHORIZED"))

        # resume: what happened while away arrives, without a new snapshot
        last = sse.events[-1][0]
        second = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        resumed = await SSE().connect(master.base, last_id=last)
        await resumed.wait("create")
        self.assertNotIn("initial", resumed.kinds())
        self.assertTrue(all(e[0] > last for e in resumed.events))
        self.assertIn(second["id"], [e[2].get("id") for e in resumed.events
                                     if e[1] == "create"])

        await master.stop()
        await resumed.wait("shutdown")
        await resumed.done  # the master ends the stream after saying so
        self.assertEqual(resumed.kinds()[-1], "shutdown")

    async def test_a_subscriber_that_never_reads_is_dropped(self):
        master = await start_master(self)
        api = Api(master.base)
        created = await api.ok("POST", "/instances", {"url": server_url()}, status=201)
        lazy = socket.socket()
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(("127.0.0.1", master.port))
        lazy.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n"
                     .encode())
        self.addCleanup(lazy.close)
        from tests.integration import rss_kib

        before = rss_kib(master.pid)
        big = {f"k{i}": "v" * 256 for i in range(64)}
        for n in range(400):
            await api.ok("PUT", f"/instances/{created['id']}", {"tags": big, "alias": str(n)})
            if master.count("dropping an event subscriber that stopped reading"):
                break
        await master.wait_for("dropping an event subscriber that stopped reading")
        grown = (rss_kib(master.pid) - before) / 1024
        self.assertLess(grown, 32, f"the master grew by {grown:.1f} MiB")


class HistoryAndMetrics(TestCase):
    timeout = 120

    async def test_rates_and_metrics_match_real_traffic(self):
        curl = need("curl", "curl")
        body = b"m" * 200_000
        backend = await http_backend(self, b"page", body)
        master = await start_master(self)
        api = Api(master.base)
        tunnel, exposed = free_port(), free_port()
        server = await api.ok("POST", "/instances", {
            "url": f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{exposed}", "alias": "front",
            "tags": {"env": "test"}}, status=201)
        await api.ok("POST", "/instances", {
            "url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{backend}",
            "tags": {"env": "other"}}, status=201)
        await master.wait_for(rf"\[{server['id']}\] client .* tunnel session open")
        for _ in range(3):
            self.assertEqual(len(await _fetch(curl, exposed)), len(body))
        path = f"/instances/{server['id']}"
        for _ in range(60):
            if (await api.ok("GET", path))["tcp_out"] >= 3 * len(body):
                break
            await sleep(0.1)
        await sleep(1.2)  # two more samples
        data = await api.ok("GET", path)
        history = await api.ok("GET", f"{path}/traffic?window=60")
        carried = sum(s["tcp_out_rate"] for s in history["samples"]) * history["interval"]
        self.assertLess(abs(carried - data["tcp_out"]), data["tcp_out"] * 0.05 + 1000,
                        (carried, data["tcp_out"]))
        self.assertTrue(all(set(s) >= {"time", "tcp_in_rate", "tcp_out_rate", "udp_in_rate",
                                       "udp_out_rate", "connections", "ping"}
                            for s in history["samples"]))

        response = await treq.get(master.base + "/metrics", headers={"X-API-Key": [KEY]},
                                  persistent=False)
        self.assertEqual(response.code, 200)
        text = (await treq.content(response)).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sent = [s for s in families["nodepass_instance_bytes"].samples
                if s.labels["id"] == server["id"] and s.labels["protocol"] == "tcp"
                and s.labels["direction"] == "out" and s.name.endswith("_total")]
        self.assertEqual(sent[0].value, (await api.ok("GET", path))["tcp_out"])
        self.assertEqual(sent[0].labels["alias"], "front")
        up = [s for s in families["nodepass_instance_status"].samples
              if s.labels["id"] == server["id"] and s.labels["status"] == "running"]
        self.assertEqual(up[0].value, 1)
        self.assertIn("nodepass_master_uptime_seconds", families)
        refused = [s for s in families["nodepass_instance_refused"].samples
                   if s.labels["id"] == server["id"] and s.name.endswith("_total")]
        self.assertEqual(refused[0].value, (await api.ok("GET", path))["refused"])

        # tag filter and info
        tagged = await api.ok("GET", "/instances?tag=env:test")
        self.assertEqual([i["id"] for i in tagged["instances"]], [server["id"]])
        info = await api.ok("GET", "/info")
        self.assertEqual(info["instances"]["running"], 2)
        self.assertEqual(info["state_dir"], str(master.state))
        code, envelope, _ = await api.call("GET", "/metrics".replace("/metrics", "/info"),
                                           headers={"X-API-Key": ["wrong"]})
        self.assertEqual((code, envelope["error"]["code"]), (401, "UNAUTHORIZED"))
