"""The master's seed API in memory: the real Registry, EventHub, store and Klein routes on
a Clock; instance processes played through the same protocol real children speak; HTTP
by treq through the master's own site (fakemaster.SiteAgent).  Every flow of
../shared/seed/api.md, errors, the restart policy, events, traffic history and metrics,
and durable state."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.events import EventHub
from nodepass.master.registry import Registry
from nodepass.master.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError
from nodepass.tunables import Tunables
from nodepass.url import MasterConfig
from tests.fakemaster import KEY, Children, MemoryMaster
from tests.test_np_memory import StreamRequest

SERVER = "server://k@127.0.0.1:10101/127.0.0.1:8080"


class Case(SynchronousTestCase):
    config: MasterConfig | None = None

    def setUp(self):
        self.master = MemoryMaster(self, config=self.config, report_interval=1.0,
                                   service_cooldown=0.2)

    def call(self, method, path, body=None, **kwargs):
        return self.successResultOf(ensureDeferred(
            self.master.call(method, self.master.seed + path, body, **kwargs)))

    def ok(self, method, path, body=None, status=200, **kwargs):
        code, envelope, _ = self.call(method, path, body, **kwargs)
        self.assertEqual(code, status, envelope)
        self.assertEqual((envelope["success"], envelope["error"]), (True, None))
        return envelope["data"]

    def error(self, status, code, method, path, fragment="", **kwargs):
        got, envelope, response = self.call(method, path, **kwargs)
        self.assertEqual(got, status, envelope)
        self.assertEqual((envelope["success"], envelope["data"]), (False, None))
        self.assertEqual(envelope["error"]["code"], code)
        self.assertIn(fragment, envelope["error"]["message"])
        return response

    def create(self, url=SERVER, **fields):
        return self.ok("POST", "/instances", {"url": url, **fields}, status=201)


class SeedFlows(Case):
    def test_create_list_get_monitor_control_delete(self):
        created = self.create(SERVER + "?tls=1")
        self.assertRegex(created["id"], r"^ins_[0-9a-f]{8}$")
        self.assertEqual((created["status"], created["type"], created["url"]),
                         ("running", "server", SERVER + "?log=info&tls=1"))
        self.assertRegex(created["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual([i["id"] for i in self.ok("GET", "/instances")["instances"]],
                         [created["id"]])
        path = f"/instances/{created['id']}"
        got = self.ok("GET", path)
        for field in ("connections", "pool_size", "uptime", "ping", "tcp_in", "tcp_out",
                      "udp_in", "udp_out", "error", "pid"):
            self.assertIn(field, got)
        stopped = self.ok("PUT", path, {"action": "stop"})
        self.assertEqual(stopped["status"], "stopped")
        self.assertIsNotNone(stopped["stopped_at"])
        self.assertEqual(self.ok("PUT", path, {"action": "stop"})["status"], "stopped")
        self.assertEqual(self.ok("PUT", path, {"action": "start"})["status"], "running")
        restarted = self.ok("PUT", path, {"action": "restart"})
        self.assertEqual(restarted["status"], "running")
        self.assertRegex(restarted["restarted_at"], r"Z$")
        self.assertEqual(self.ok("DELETE", path), {"id": created["id"], "deleted": True})
        self.error(404, "INSTANCE_NOT_FOUND", "GET", path)
        self.assertEqual(self.ok("GET", "/instances")["instances"], [])
        self.assertEqual(self.master.children.running(), [])  # every process was stopped

    def test_concurrent_control_requests_are_serialised(self):
        created = self.create()
        path = self.master.seed + f"/instances/{created['id']}"
        actions = ["restart", "stop", "start", "restart", "stop", "start", "restart"]
        pending = [ensureDeferred(self.master.call("PUT", path, {"action": a}))
                   for a in actions]
        statuses = [self.successResultOf(d)[1]["data"]["status"] for d in pending]
        expected = {"start": "running", "restart": "running", "stop": "stopped"}
        self.assertEqual(statuses, [expected[a] for a in actions])
        self.assertEqual(len(self.master.children.running()), 1)  # never two processes

    def test_ids_are_unique_and_never_reused(self):
        ids = [self.create(SERVER.replace("10101", str(10101 + n)))["id"] for n in range(3)]
        self.assertEqual(len(set(ids)), 3)
        self.ok("DELETE", f"/instances/{ids[0]}")
        self.assertIn(ids[0], self.master.store.issued())

    def test_a_start_that_fails_shows_error_with_the_reason(self):
        self.master.children.failing.append(
            "cannot listen for tunnel on 127.0.0.1:10101: Address already in use")
        failed = self.create()
        self.assertEqual(failed["status"], "error")
        self.assertEqual(failed["error"], "exited with status 1: cannot listen for tunnel on "
                                          "127.0.0.1:10101: Address already in use")

    def test_an_instance_killed_from_outside_shows_error(self):
        created = self.create()
        self.master.children.kill(created["id"])
        got = self.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["status"], got["error"], got["pid"]),
                         ("error", "killed by SIGKILL", None))

    def test_a_process_that_cannot_be_started_shows_error(self):
        self.master.children.refuse_start = True
        failed = self.create()
        self.assertEqual((failed["status"], failed["error"]), ("error", "cannot start: "
                                                                         "cannot fork"))

    def test_tags_filter_and_metadata(self):
        a = self.create(alias="edge", tags={"site": "paris"}, restart=True)
        self.create(SERVER.replace("10101", "10102"), tags={"site": "lyon"})
        self.assertEqual((a["alias"], a["tags"], a["restart"]), ("edge", {"site": "paris"},
                                                                 True))
        tagged = self.ok("GET", "/instances?tag=site:paris")["instances"]
        self.assertEqual([i["id"] for i in tagged], [a["id"]])
        changed = self.ok("PUT", f"/instances/{a['id']}", {"tags": {"site": "nice"},
                                                           "restart": False})
        self.assertEqual((changed["tags"], changed["restart"]), ({"site": "nice"}, False))
        self.error(400, "INVALID_REQUEST", "GET", "/instances?tag=nocolon", "key:value")


class Lifecycle(Case):
    def test_a_child_that_never_says_ready_is_answered_for_after_five_seconds(self):
        self.master.children.silent = True
        pending = ensureDeferred(self.master.call("POST", self.master.seed + "/instances",
                                                  {"url": SERVER}))
        self.master.clock.advance(4.9)
        self.master.http.flush()
        self.assertNoResult(pending)
        self.master.clock.advance(0.1)
        self.master.http.flush()
        code, envelope, _ = self.successResultOf(pending)
        self.assertEqual((code, envelope["data"]["status"]), (201, "running"))

    def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(self):
        created = self.create()
        self.master.children.latest(created["id"])[2].stubborn = True
        pending = ensureDeferred(self.master.call(
            "PUT", self.master.seed + f"/instances/{created['id']}", {"action": "stop"}))
        self.master.clock.advance(5.0 + 2.0 - 0.1)  # SHUTDOWN_TIMEOUT + 2 s
        self.master.http.flush()
        self.assertNoResult(pending)
        self.master.clock.advance(0.1)
        self.master.http.flush()
        self.assertEqual(self.successResultOf(pending)[1]["data"]["status"], "stopped")
        self.assertEqual(self.master.children.latest(created["id"])[2].signals,
                         [signal.SIGTERM, signal.SIGKILL])


class Errors(Case):
    def test_bad_bodies(self):
        cases = [
            (400, "INVALID_JSON", "not valid JSON", {"raw": b"{url:"}),
            (400, "INVALID_JSON", "JSON object", {"raw": b"[1]"}),
            (400, "INVALID_REQUEST", "unknown field 'uri'", {"body": {"uri": "x"}}),
            (400, "INVALID_REQUEST", "'url'", {"body": {}}),
            (400, "INVALID_REQUEST", "'tags'", {"body": {"url": SERVER, "tags": {"a": 1}}}),
            (400, "INVALID_URL", "unknown parameter 'tsl'", {"body": {"url": SERVER + "?tsl=1"}}),
            (400, "INVALID_URL", "a master cannot run another master",
             {"body": {"url": "master://127.0.0.1:9999"}}),
            (415, "UNSUPPORTED_MEDIA_TYPE", "", {"raw": b'{"url": "x"}',
                                                 "headers": {"Content-Type": ["text/plain"]}}),
            (413, "PAYLOAD_TOO_LARGE", "", {"raw": b'{"url": "' + b"x" * 70000 + b'"}'}),
        ]
        for status, code, fragment, kwargs in cases:
            self.error(status, code, "POST", "/instances", fragment, **kwargs)
        self.assertEqual(self.master.children.spawned, [])

    def test_unknown_instance_action_route_method(self):
        for method in ("GET", "DELETE"):
            self.error(404, "INSTANCE_NOT_FOUND", method, "/instances/ins_nope", "ins_nope")
        self.error(404, "INSTANCE_NOT_FOUND", "PUT", "/instances/ins_nope",
                   body={"action": "start"})
        created = self.create()
        self.error(400, "INVALID_ACTION", "PUT", f"/instances/{created['id']}",
                   "allowed: start, stop, restart", body={"action": "explode"})
        response = self.error(405, "METHOD_NOT_ALLOWED", "PATCH", "/instances", "PATCH")
        self.assertIn("GET", response.headers.getRawHeaders("Allow")[0])
        self.error(404, "NOT_FOUND", "GET", "/nothing-here", "/api/v1")

    def test_authentication(self):
        self.error(401, "UNAUTHORIZED", "GET", "/instances", "X-API-Key", key=None)
        self.error(401, "UNAUTHORIZED", "GET", "/instances", key="wrong")
        code, envelope, _ = self.call("GET", "/instances", key=None,
                                      headers={"Authorization": [f"Bearer {KEY}"]})
        self.assertEqual((code, envelope["data"]), (200, {"instances": []}))
        code, _, _ = self.call("GET", "/openapi.json", key=None)  # the docs need no key
        self.assertEqual(code, 200)

    def test_cors_preflight_and_headers(self):
        code, _, response = self.call("OPTIONS", "/instances", key=None, headers={
            "Origin": ["http://panel.example"], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(code, 204)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])
        self.assertIn("X-API-Key", headers.getRawHeaders("Access-Control-Allow-Headers")[0])
        self.assertIn("PUT", headers.getRawHeaders("Access-Control-Allow-Methods")[0])
        _, _, plain = self.call("GET", "/instances")
        self.assertEqual(plain.headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])

    def test_the_openapi_document_validates(self):
        from openapi_spec_validator import validate

        _, document, _ = self.call("GET", "/openapi.json", key=None)
        validate(document)
        self.assertIn("/api/v1/instances/{id}", document["paths"])
        self.assertIn("ApiKey", document["components"]["securitySchemes"])


class CustomPrefix(Case):
    config = MasterConfig(prefix="/admin/np", auth=1)

    def test_the_api_lives_under_the_prefix(self):
        self.assertEqual(self.master.seed, "http://127.0.0.1:9090/admin/np/v1")
        self.assertEqual(self.ok("GET", "/instances")["instances"], [])
        code, envelope, _ = self.successResultOf(ensureDeferred(self.master.call(
            "GET", "http://master/api/v1/instances")))
        self.assertEqual((code, envelope["error"]["code"]), (404, "NOT_FOUND"))


class Inheritance(Case):
    config = MasterConfig(log="debug")

    def test_instances_inherit_log_and_tls(self):
        self.assertTrue(self.create()["url"].endswith("?log=debug&tls=0"))
        explicit = self.create("client://k@127.0.0.1:1/127.0.0.1:2?log=warn")
        self.assertTrue(explicit["url"].endswith("?log=warn"))

    def test_percent_encoded_parameter_names_count_as_given(self):
        # '%74ls=1' is tls=1 to the parser: the master's tls=0 must not replace it
        made = self.create("server://k@127.0.0.1:0/127.0.0.1:0?%74ls=1&%6cog=warn")
        self.assertTrue(made["url"].endswith("?log=warn&tls=1"), made["url"])
        self.assertEqual(self.master.children.spawned[-1][0].split("?")[1], "log=warn&tls=1")


class AuthOff(SynchronousTestCase):
    def test_auth_0_takes_requests_without_a_key(self):
        master = MemoryMaster(self, key=None, config=MasterConfig(auth=0))
        code, envelope, _ = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", key=None)))
        self.assertEqual((code, envelope["data"]), (200, {"instances": []}))


class RestartPolicy(Case):
    def test_backoff_grows_is_capped_and_resets_after_health(self):
        created = self.create(restart=True)
        children, clock = self.master.children, self.master.clock
        path = f"/instances/{created['id']}"
        children.failing.extend(["crashed"] * 5)  # the next five starts die at once
        killed, seen = clock.seconds(), len(children.spawned)
        children.kill(created["id"])
        while len(children.spawned) < seen + 6:
            clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
            if len(children.spawned) < seen + 6 and children.spawned[-1][2].ended:
                self.assertEqual(self.ok("GET", path)["status"], "error")
        starts = [killed, *children.times[seen:]]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
        self.assertEqual(gaps, [0.2, 0.4, 0.8, 1.6, 2.4, 2.4])  # cooldown 0.2 s, capped at 12
        got = self.ok("GET", path)
        self.assertEqual((got["status"], got["restarts"]), ("running", 6))
        clock.advance(2.0)  # healthy for 10 cooldowns: the next failure starts over
        children.kill(created["id"])
        clock.advance(0.2)
        self.assertEqual(len(children.spawned), seen + 7)

    def test_restart_false_stays_in_error_until_turned_on(self):
        created = self.create()
        self.master.children.kill(created["id"])
        self.master.clock.advance(30)
        got = self.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["status"], got["restarts"]), ("error", 0))
        self.assertTrue(self.ok("PUT", f"/instances/{created['id']}",
                                {"restart": True})["restart"])

    def test_an_instance_whose_host_ended_comes_back_and_is_set_apart_the_second_time(self):
        created = self.create()  # restart: false
        children, clock = self.master.children, self.master.clock
        children.lose_host(created["id"])
        got = self.ok("GET", f"/instances/{created['id']}")
        self.assertEqual((got["status"], got["error"]), ("error", "killed by SIGSEGV"))
        clock.advance(0.2)
        self.assertEqual(self.ok("GET", f"/instances/{created['id']}")["status"], "running")
        self.assertFalse(children.latest(created["id"])[1].alone)
        children.lose_host(created["id"])  # again: it may be the one that crashes hosts
        clock.advance(0.4)
        self.assertTrue(children.latest(created["id"])[1].alone)
        children.kill(created["id"])  # its own crash, alone: it stays set apart
        clock.advance(30)
        self.assertEqual(self.ok("GET", f"/instances/{created['id']}")["status"], "error")
        self.ok("PUT", f"/instances/{created['id']}", {"action": "start"})
        self.assertTrue(children.latest(created["id"])[1].alone)
        clock.advance(2.0)  # healthy for 10 cooldowns, then stopped: trusted again
        self.ok("PUT", f"/instances/{created['id']}", {"action": "restart"})
        self.assertFalse(children.latest(created["id"])[1].alone)

    def test_stop_cancels_a_pending_restart(self):
        created = self.create(restart=True)
        self.master.children.kill(created["id"])
        self.ok("PUT", f"/instances/{created['id']}", {"action": "stop"})
        spawned = len(self.master.children.spawned)
        self.master.clock.advance(30)
        self.assertEqual(len(self.master.children.spawned), spawned)


class Events(Case):
    def subscribe(self, last_id=None):
        request = StreamRequest(last_id)
        self.master.api.seed.events(request)
        return request

    def events(self, request):
        out = []
        for block in b"".join(request.written).decode().split("\n\n"):
            if block and not block.startswith(":"):
                fields = dict(line.split(": ", 1) for line in block.split("\n"))
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
        return out

    def test_event_order_resume_and_keepalive(self):
        stream = self.subscribe()
        created = self.create()
        self.master.children.say(created["id"], "hello")
        self.ok("DELETE", f"/instances/{created['id']}")
        kinds = [kind for _, kind, _ in self.events(stream)]
        self.assertEqual(kinds, ["initial", "create", "update", "log", "update", "delete"])
        ids = [event_id for event_id, _, _ in self.events(stream)][1:]
        self.assertEqual(ids, sorted(ids))
        log = next(data for _, kind, data in self.events(stream) if kind == "log")
        self.assertEqual(log, {"id": created["id"], "level": "info", "message": "hello"})
        self.master.clock.advance(15.0)  # a keep-alive comment at most every 15 s
        self.assertIn(b": keep-alive\n\n", stream.written)
        last = self.events(stream)[-1][0]
        second = self.create()
        resumed = self.events(self.subscribe(last_id=last))
        self.assertNotIn("initial", [kind for _, kind, _ in resumed])
        self.assertTrue(all(event_id > last for event_id, _, _ in resumed))
        self.assertIn(second["id"], [d.get("id") for _, k, d in resumed if k == "create"])

    def test_a_resume_too_old_gets_a_fresh_snapshot(self):
        created = self.create()
        instance = self.master.registry.get(created["id"])
        for _ in range(1100):  # more than the hub keeps
            self.master.hub.publish("update", instance)
        (event,) = self.events(self.subscribe(last_id=1))
        self.assertEqual(event[1], "initial")


class HistoryAndMetrics(Case):
    def test_rates_follow_the_reports_and_metrics_match(self):
        created = self.create(alias="front", tags={"env": "test"})
        children, clock = self.master.children, self.master.clock
        for second in range(1, 6):  # 1000 bytes out every second
            children.report(created["id"], tcp_out=1000 * second, tcp_in=10 * second,
                            connections=2, ping_ms=0.5)
            clock.advance(1.0)
        path = f"/instances/{created['id']}"
        history = self.ok("GET", f"{path}/traffic?window=60")
        rates = [s["tcp_out_rate"] for s in history["samples"]]
        self.assertEqual(rates[1:], [1000.0] * (len(rates) - 1))
        self.assertEqual((history["interval"], history["samples"][-1]["connections"]), (1.0, 2))
        self.error(400, "INVALID_REQUEST", "GET", f"{path}/traffic?window=0", "window")
        code, text, _ = self.call("GET", "/metrics")
        self.assertEqual(code, 200)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sent = [s for s in families["nodepass_instance_bytes"].samples
                if s.labels["id"] == created["id"] and s.labels["direction"] == "out"
                and s.labels["protocol"] == "tcp" and s.name.endswith("_total")]
        self.assertEqual((sent[0].value, sent[0].labels["alias"]), (5000, "front"))
        up = [s for s in families["nodepass_instance_status"].samples
              if s.labels["id"] == created["id"] and s.labels["status"] == "running"]
        self.assertEqual(up[0].value, 1)
        info = self.ok("GET", "/info")
        self.assertEqual(info["instances"]["running"], 1)


class Durable(SynchronousTestCase):
    """The state database through a master's life: kept, migrated, or refused."""

    def folder(self):
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        return folder

    def registry(self, folder):
        store = Store.open(folder)
        self.addCleanup(store.close)
        children = Children()
        registry = Registry(self.clock, MasterConfig(), Tunables(), {}, store,
                            EventHub(self.clock), spawn=children)
        return registry, children

    def setUp(self):
        from twisted.internet.task import Clock

        self.clock = Clock()

    def test_instances_counters_and_intent_survive_a_restart(self):
        folder = self.folder()
        registry, children = self.registry(folder)
        running = self.successResultOf(ensureDeferred(registry.create(
            SERVER, "edge", {"site": "paris"}, True)))
        stopped = self.successResultOf(ensureDeferred(registry.create(
            SERVER.replace("10101", "10102"))))
        self.successResultOf(ensureDeferred(registry.stop(stopped)))
        running.report = {"tcp_out": 4242}
        self.successResultOf(ensureDeferred(registry.shutdown()))
        again, children = self.registry(folder)
        again.restore()
        back = again.instances[running.id]
        self.assertEqual((back.url, back.alias, back.tags, back.auto_restart, back.status),
                         (running.url, "edge", {"site": "paris"}, True, "running"))
        self.assertEqual(back.counters()["tcp_out"], 4242)
        self.assertEqual(again.instances[stopped.id].status, "stopped")
        self.assertEqual(len(children.spawned), 1)  # only what was meant to run

    def test_a_schema_1_database_is_migrated(self):
        folder = self.folder()
        old = sqlite3.connect(folder / "nodepass.db")
        for statement in MIGRATIONS[0]:
            old.execute(statement)
        old.execute("INSERT INTO instances VALUES ('ins_0ld0ld00', ?, 1700000000.0, 'stopped')",
                    (SERVER + "?log=info&tls=0",))
        old.execute("PRAGMA user_version=1")
        old.commit()
        old.close()
        registry, _ = self.registry(folder)
        registry.restore()
        restored = registry.describe(registry.instances["ins_0ld0ld00"])
        self.assertEqual((restored["status"], restored["created_at"], restored["tags"],
                          restored["restart"]), ("stopped", "2023-11-14T22:13:20Z", {}, False))
        check = sqlite3.connect(folder / "nodepass.db")
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        check.close()

    def test_a_newer_or_corrupt_database_is_refused_untouched(self):
        folder = self.folder()
        db = folder / "nodepass.db"
        con = sqlite3.connect(db)
        con.execute("PRAGMA user_version=99")
        con.commit()
        con.close()
        content = db.read_bytes()
        with self.assertRaisesRegex(StoreError, "schema version 99, newer than this nodepass"):
            Store.open(folder)
        self.assertEqual(db.read_bytes(), content)
        db.write_bytes(b"this is not a database at all" * 100)
        with self.assertRaisesRegex(StoreError, "unreadable or corrupt"):
            Store.open(folder)
        self.assertEqual(db.read_bytes(), b"this is not a database at all" * 100)

    def test_persist_0_keeps_nothing(self):
        """persist=0: the master's state folder gets no database; a new master knows none
        of the old instances."""
        from nodepass.master.service import api_app
        from nodepass.master.state import ApiKey

        folder = self.folder()
        registry = Registry(self.clock, MasterConfig(persist=0), Tunables(), {},
                            Store.open(None), EventHub(self.clock), spawn=Children())
        api_app(registry, MasterConfig(persist=0), ApiKey("k"), str(folder))
        self.successResultOf(ensureDeferred(registry.create(SERVER)))
        self.assertEqual(list(folder.iterdir()), [])
        again = Registry(self.clock, MasterConfig(persist=0), Tunables(), {}, Store.open(None),
                         EventHub(self.clock), spawn=Children())
        again.restore()
        self.assertEqual(again.instances, {})


class _PausingRequest:
    """A request whose transport pauses its producer, as a full socket buffer does."""

    def __init__(self):
        from twisted.internet.defer import Deferred

        self.written = []
        self.producer = None
        self.finished = Deferred()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self.finished

    def write(self, data):
        self.written.append(data)

    def finish(self):
        pass


class SlowSubscribers(SynchronousTestCase):
    """A burst bigger than a transport's buffer reaches a subscriber that reads; one that
    stopped reading is dropped once MAX_BEHIND bytes waited for it."""

    def test_a_burst_passes_and_a_stalled_reader_goes(self):
        from nodepass.master.events import MAX_BEHIND, Subscriber

        request = _PausingRequest()
        subscriber = Subscriber(request, "seed", lambda s: None)
        event = b"x" * 600
        subscriber.pauseProducing()  # the transport's buffer is over its mark
        for _ in range(500):  # one tick's updates for 500 instances
            subscriber.send(event)
        self.assertEqual(len(request.written), 500)
        self.assertFalse(subscriber.closed)
        subscriber.resumeProducing()  # it drained: the count starts again
        subscriber.pauseProducing()
        for _ in range(MAX_BEHIND // len(event) + 1):
            subscriber.send(event)
        self.assertTrue(subscriber.closed)
        kept = len(request.written)
        subscriber.send(event)
        self.assertEqual(len(request.written), kept)
