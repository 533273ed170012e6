"""The master as a process: its state across real restarts and kills, a database it must
refuse, and an event subscriber that stops reading on a real socket.  The rest of the
master is tested in memory (test_master_memory.py)."""

import os
import signal
import socket

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.integration import eventually, sleep, spawn
from tests.test_master_api import KEY, Api, api_port, start_master


def server_url():
    return "server://k@127.0.0.1:0/127.0.0.1:0"


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


async def restart_master(case, master, name="master-2", key=KEY, **env):
    """A new master process on ``master``'s state directory (and a port of its own)."""
    if key is not None:
        env["NODEPASS_API_KEY"] = key
    again = spawn(case, "master://127.0.0.1:0", name=name,
                  NODEPASS_STATE_DIR=str(master.state), REPORT_INTERVAL="500ms", **env)
    again.state = master.state
    await api_port(again)
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
        api = Api(again.base)
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
        api = Api((await restart_master(self, master)).base)
        await _until_status(api, created["id"], "running")
        got = await api.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["url"], got["created_at"], got["status"]),
                         (created["url"], created["created_at"], "running"))

    async def refused(self, prepare, fragment):
        master = await start_master(self)
        await master.stop()
        db = master.state / "nodepass.db"
        prepare(db)
        content = db.read_bytes()
        again = spawn(self, "master://127.0.0.1:0", name="master-2",
                      NODEPASS_STATE_DIR=str(master.state), NODEPASS_API_KEY=KEY)
        self.assertEqual(await again.ended.addTimeout(20, reactor), 2)  # refused before start
        await again.wait_for(fragment)
        self.assertEqual(db.read_bytes(), content, "the database must not be touched")

    async def test_corrupt_database_is_refused(self):
        def corrupt(db):
            for extra in ("-wal", "-shm"):
                db.with_name(db.name + extra).unlink(missing_ok=True)
            db.write_bytes(b"this is not a database at all" * 100)

        await self.refused(corrupt, "nodepass: error: state database .*unreadable or corrupt")


async def _until_status(api, instance_id, status, timeout=10.0):
    """Restored instances start in the background: wait (bounded) for ``status``."""
    for _ in range(int(timeout * 10)):
        if (await api.ok("GET", f"/instances/{instance_id}"))["status"] == status:
            return
        await sleep(0.1)
    raise AssertionError(f"{instance_id} never became {status}")


class Events(TestCase):
    timeout = 120

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


