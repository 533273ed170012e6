"""The NodePass dialect against a real master on 127.0.0.1, one contract test per row of
../shared/NODEPASS-API.md (treq, a real SSE parser), and what only a real master shows:
key rotation on disk, counters reset across a master restart, both streams at once."""

from __future__ import annotations

import json
import stat

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.integration import closed_port, echo_backend, exchange, sleep
from tests.sse import EventStream
from tests.test_master_api import KEY, Api, start_master
from tests.test_master_state import restart_master

RECORD_FIELDS = {"id", "alias", "type", "status", "url", "config", "restart", "meta", "mode",
                 "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx",
                 "node", "stale"}  # the last two: ours, for a fleet (docs/fleet.md)


def np_base(master) -> str:
    return f"http://127.0.0.1:{master.port}/api/np/v1"


def server_url(key: str = "k") -> str:
    return f"server://{key}@127.0.0.1:0/127.0.0.1:0"


class NpApi:
    """treq in the NodePass dialect: (status, JSON or None, response)."""

    def __init__(self, base: str, key: str | None = KEY) -> None:
        self.base, self.key = base, key
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def call(self, method, path, body=None, key="default"):
        key = self.key if key == "default" else key
        headers = {"X-API-Key": [key]} if key else {}
        if body is not None:
            headers["Content-Type"] = ["application/json"]
        response = await treq.request(method, self.base + path, headers=headers,
                                      data=json.dumps(body).encode() if body is not None
                                      else None, pool=self.pool, timeout=30)
        text = await treq.content(response)
        return response.code, json.loads(text) if text else None, response

    async def ok(self, method, path, body=None, status=200):
        code, data, _ = await self.call(method, path, body)
        assert code == status, (code, data)
        return data


class Contract(TestCase):
    timeout = 120

    async def setUp(self):
        self.master = await start_master(self)
        self.np = NpApi(np_base(self.master))
        self.seed = Api(self.master.base)

    def assertRecord(self, record):
        self.assertEqual(set(record), RECORD_FIELDS)
        self.assertTrue(all(v is not None for v in record.values()), record)
        self.assertEqual(set(record["meta"]), {"peer", "tags"})

    async def pid_of(self, short):
        return (await self.seed.ok("GET", f"/instances/ins_{short}"))["pid"]

    async def test_instance_rows(self):
        np = self.np
        records = await np.ok("GET", "/instances")
        self.assertEqual([r["id"] for r in records], ["********"])
        self.assertRecord(records[0])

        created = await np.ok("POST", "/instances", {"url": server_url(), "alias": "edge"}, 201)
        self.assertRecord(created)
        self.assertRegex(created["id"], r"^[0-9a-f]{8}$")
        self.assertEqual((created["status"], created["restart"], created["type"]),
                         ("running", True, "server"))
        self.assertIn("&dns=5m0s&", created["config"])
        path = f"/instances/{created['id']}"
        self.assertEqual((await np.ok("GET", path))["alias"], "edge")
        self.assertEqual([r["id"] for r in await np.ok("GET", "/instances")],
                         ["********", created["id"]])

        patched = await np.ok("PATCH", path, {"alias": "core", "restart": False, "meta": {
            "peer": {"type": "2"}, "tags": {"site": "paris"}}})
        self.assertEqual((patched["alias"], patched["restart"], patched["meta"]["tags"],
                          patched["meta"]["peer"]["type"]), ("core", False, {"site": "paris"},
                                                             "2"))
        self.assertEqual(await np.ok("PATCH", path, {}), patched)
        self.assertEqual((await np.ok("PATCH", path, {"action": "stop"}))["status"], "stopped")
        self.assertEqual((await np.ok("PATCH", path, {"action": "start"}))["status"],
                         "running")
        code, error, _ = await np.call("PATCH", path, {"action": "explode"})
        self.assertEqual((code, error["error"][:15]), (400, "Invalid action:"))

        pid = await self.pid_of(created["id"])
        code, error, _ = await np.call("PUT", path, {"url": server_url() + "?mode=7"})
        self.assertEqual(code, 400)
        self.assertIn("Invalid URL: query: bad value '7' for 'mode'", error["error"])
        self.assertEqual(await self.pid_of(created["id"]), pid)  # left running, untouched
        new_url = server_url(key="k2")
        replaced = await np.ok("PUT", path, {"url": new_url})
        self.assertEqual((replaced["id"], replaced["status"], replaced["url"]),
                         (created["id"], "running", new_url + "?log=info&tls=0"))
        self.assertNotEqual(await self.pid_of(created["id"]), pid)  # a new process
        seed_view = await self.seed.ok("GET", f"/instances/ins_{created['id']}")
        self.assertEqual(seed_view["url"], new_url + "?log=info&tls=0")

        code, body, _ = await np.call("DELETE", path)
        self.assertEqual((code, body), (204, None))
        code, error, _ = await np.call("GET", path)
        self.assertEqual((code, error["error"][:18]), (404, "Instance not found"))
        for method in ("PUT", "DELETE"):
            code, error, _ = await np.call(method, "/instances/********", {"url": new_url}
                                           if method == "PUT" else None)
            self.assertEqual(code, 403)
        code, error, _ = await np.call("GET", "/instances", key=None)
        self.assertEqual((code, error["error"]), (401, "Unauthorized: API key required"))
        code, error, _ = await np.call("GET", "/instances", key="wrong")
        self.assertEqual((code, error["error"]), (401, "Unauthorized: Invalid API key"))

    async def test_info_and_tcping_rows(self):
        np = self.np
        info = await np.ok("GET", "/info")
        for name in ("cpu", "mem_total", "mem_used", "swap_total", "swap_used", "netrx",
                     "nettx", "diskr", "diskw", "sysup", "uptime"):
            self.assertIs(type(info[name]), int, name)
        for name in ("alias", "os", "arch", "ver", "name", "log", "tls", "crt", "key", "mid"):
            self.assertIs(type(info[name]), str, name)
        self.assertEqual((info["ver"], info["tls"], info["os"]), ("v1.14.0", "0", "linux"))
        self.assertGreater(info["sysup"], info["uptime"])
        self.assertGreater(info["mem_total"], 0)
        renamed = await np.ok("POST", "/info", {"alias": "paris-1"})
        self.assertEqual((renamed["alias"], renamed["mid"]), ("paris-1", info["mid"]))

        open_port = await np.ok("GET", f"/tcping?target=127.0.0.1:{self.master.port}")
        self.assertEqual((open_port["target"], open_port["connected"], open_port["error"]),
                         (f"127.0.0.1:{self.master.port}", True, None))
        self.assertIs(type(open_port["latency"]), int)
        closed = await np.ok("GET", f"/tcping?target=127.0.0.1:{closed_port(self)}")
        self.assertEqual((closed["connected"], closed["error"]),
                         (False, "Connection refused"))
        for query, fragment in (("", "Target address required"),
                                ("?target=127.0.0.1", "missing port"),
                                ("?target=127.0.0.1:99999", "out of range")):
            code, error, _ = await np.call("GET", f"/tcping{query}")
            self.assertEqual(code, 400)
            self.assertIn(fragment, error["error"])
        code, _, _ = await np.call("GET", f"/tcping?target=127.0.0.1:{self.master.port}",
                                   key=None)
        self.assertEqual(code, 401)

    async def test_events_row_seen_by_both_dialects(self):
        np_stream = await EventStream(f"{self.np.base}/events", KEY).open()
        seed_stream = await EventStream(f"{self.master.base}/events", KEY).open()
        self.assertEqual(np_stream.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        self.assertEqual(np_stream.retry, 3000)
        first = await np_stream.wait(lambda e: True)
        self.assertEqual((first.name, first.json["type"], first.json["instance"]["id"]),
                         ("instance", "initial", "********"))

        made_in_seed = await self.seed.ok("POST", "/instances", {"url": server_url()}, 201)
        short = made_in_seed["id"].removeprefix("ins_")
        await np_stream.wait(lambda e: e.json["type"] == "create"
                             and e.json["instance"]["id"] == short)
        await np_stream.wait(lambda e: e.json["type"] == "log" and "listening" in e.json["logs"])
        await self.np.ok("PATCH", f"/instances/{short}", {"alias": "renamed"})
        await seed_stream.wait(lambda e: e.name == "update"
                               and e.json.get("alias") == "renamed")
        made_in_np = await self.np.ok("POST", "/instances", {"url": server_url()}, 201)
        await seed_stream.wait(lambda e: e.name == "create"
                               and e.json["id"] == f"ins_{made_in_np['id']}")
        await np_stream.wait(lambda e: e.json["type"] == "update"
                             and e.json["instance"]["id"] == made_in_np["id"])

        for event in np_stream.events:
            self.assertEqual(event.name, "instance")
            data = event.json
            self.assertEqual(set(data), {"type", "time", "instance", "logs"})
            self.assertIsInstance(data["logs"], str)
            self.assertRegex(data["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertRecord(data["instance"])

        self.assertEqual(await self.master.stop(), 0)
        await np_stream.ended
        last = np_stream.events[-1].json
        self.assertEqual((last["type"], last["instance"]), ("shutdown", None))

    async def test_openapi_and_docs_rows(self):
        from openapi_spec_validator import validate

        response = await treq.get(f"{self.np.base}/openapi.json", pool=self.np.pool)
        document = json.loads(await treq.content(response))
        self.assertEqual(document["openapi"], "3.1.0")
        validate(document)
        self.assertIn("/api/np/v1/instances/{id}", document["paths"])
        response = await treq.get(f"{self.np.base}/docs", pool=self.np.pool)
        page = (await treq.content(response)).decode()
        self.assertEqual(response.code, 200)
        self.assertIn("swagger-ui-bundle.js", page)
        self.assertNotIn("<script>", page)  # no inline script


class KeyOnDisk(TestCase):
    timeout = 60

    async def test_rotation_saves_the_new_key_and_ends_streams_opened_with_the_old(self):
        master = await start_master(self, key=None)
        key_file = master.state / "api.key"
        old = key_file.read_text().strip()
        np = NpApi(np_base(master), key=old)
        stream = await EventStream(f"{np.base}/events", old).open()
        await stream.wait(lambda e: True)
        rotated = await np.ok("PATCH", "/instances/********", {"action": "restart"})
        new = rotated["url"]
        self.assertNotEqual(new, old)
        self.assertEqual(key_file.read_text().strip(), new)
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(master.count(new), 0)  # the new key is never logged
        await stream.ended.addTimeout(10, reactor)  # its stream ended at once
        code, _, _ = await np.call("GET", "/instances")
        self.assertEqual(code, 401)
        self.assertEqual((await Api(master.base, new).ok("GET", "/instances"))["instances"], [])
        await master.stop()
        again = await restart_master(self, master, key=None)
        self.assertEqual(len(await NpApi(np_base(again), key=new).ok("GET", "/instances")), 1)


class ResetAcrossRestart(TestCase):
    timeout = 120

    async def test_reset_counters_stay_zero_after_the_master_restarts(self):
        backend = await echo_backend(self)
        master = await start_master(self)
        np = NpApi(np_base(master))
        server = await np.ok("POST", "/instances", {"url": server_url()}, 201)
        tunnel = await master.listening_port("tunnel", instance=f"ins_{server['id']}")
        exposed = await master.listening_port("target", instance=f"ins_{server['id']}")
        await np.ok("POST", "/instances",
                    {"url": f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{backend}"}, 201)
        await master.wait_for(rf"\[ins_{server['id']}\] client .* tunnel session open")
        path = f"/instances/{server['id']}"

        async def counted(at_least):
            for _ in range(100):
                record = await np.ok("GET", path)
                if record["tcprx"] >= at_least:
                    return record
                await sleep(0.1)
            raise AssertionError(f"tcprx never reached {at_least}: {record}")

        result = await exchange(exposed, iter([b"x" * 5000]), timeout=10)
        self.assertEqual(len(result.received), 5000)
        await counted(5000)
        reset = await np.ok("PATCH", path, {"action": "reset"})
        self.assertEqual((reset["tcprx"], reset["tcptx"], reset["status"]), (0, 0, "running"))
        await master.stop()
        again = await restart_master(self, master)
        after = await NpApi(np_base(again)).ok("GET", path)
        self.assertEqual((after["tcprx"], after["tcptx"]), (0, 0))
        seed = await Api(again.base).ok("GET", f"/instances/ins_{server['id']}")
        self.assertEqual((seed["tcp_in"], seed["tcp_out"]), (0, 0))
