"""The NodePass dialect (and the seed's additions) on a master in memory: the real
Registry, EventHub and Klein routes, children played by the test, HTTP by treq through
the master's own site (fakemaster.SiteAgent)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.npview import config_url, short_id
from nodepass.master.registry import Registry
from nodepass.master.store import Store
from nodepass.master.tcping import TcpPing, TooManyPingsError
from nodepass.tunables import Tunables, go_duration, parse_duration
from nodepass.url import Address, MasterConfig, format_url, parse
from tests.fakemaster import KEY, MemoryMaster

SERVER = "server://k@127.0.0.1:10101/127.0.0.1:8080"
CLIENT = "client://k@127.0.0.1:10101/127.0.0.1:9000"
# Go's field names and JSON types (int for every counter, never null)
RECORD_TYPES = {"id": str, "alias": str, "type": str, "status": str, "url": str, "config": str,
                "restart": bool, "meta": dict, "mode": int, "ping": int, "pool": int,
                "tcps": int, "udps": int, "tcprx": int, "tcptx": int, "udprx": int,
                "udptx": int, "node": str, "stale": bool}  # the last two: a fleet's (ours)
INFO_TYPES = {"alias": str, "os": str, "arch": str, "cpu": int, "mem_total": int,
              "mem_used": int, "swap_total": int, "swap_used": int, "netrx": int, "nettx": int,
              "diskr": int, "diskw": int, "sysup": int, "ver": str, "name": str, "uptime": int,
              "log": str, "tls": str, "crt": str, "key": str, "mid": str,
              "store": dict}  # ours: where the state is kept, and whether it can be written


def run(case, coroutine):
    return case.successResultOf(ensureDeferred(coroutine))


class Case(SynchronousTestCase):
    def setUp(self):
        self.master = MemoryMaster(self, report_interval=1.0)

    def call(self, method, path, body=None, dialect="np", **kwargs):
        base = self.master.np if dialect == "np" else self.master.seed
        return run(self, self.master.call(method, base + path, body, **kwargs))

    def ok(self, method, path, body=None, status=200, dialect="np", **kwargs):
        code, data, _ = self.call(method, path, body, dialect, **kwargs)
        self.assertEqual(code, status, data)
        return data

    def error(self, status, fragment, method, path, body=None, **kwargs):
        code, data, response = self.call(method, path, body, **kwargs)
        self.assertEqual(code, status, data)
        self.assertEqual(set(data), {"error", "message"})
        self.assertEqual(data["error"], data["message"])
        self.assertIn(fragment, data["error"])
        return response

    def assertRecord(self, record):
        self.assertEqual(set(record), set(RECORD_TYPES))
        for name, kind in RECORD_TYPES.items():
            self.assertIs(type(record[name]), kind, (name, record))
        self.assertEqual(set(record["meta"]), {"peer", "tags"})
        self.assertEqual(set(record["meta"]["peer"]), {"sid", "type", "alias"})

    def create(self, url=SERVER, **fields):
        return self.ok("POST", "/instances", {"url": url, **fields}, status=201)


class Instances(Case):
    def test_the_list_is_an_array_with_the_key_record_first(self):
        self.create()
        self.create(CLIENT.replace("10101", "10102"))
        records = self.ok("GET", "/instances")
        self.assertIsInstance(records, list)
        self.assertEqual([r["type"] for r in records], ["", "server", "client"])
        for record in records:
            self.assertRecord(record)
        key = records[0]
        self.assertEqual((key["id"], key["url"], key["status"]), ("********", KEY, ""))
        self.assertRegex(key["config"], r"^[0-9a-f]{16}$")  # the master id

    def test_create_answers_every_field_as_nodepass_does(self):
        created = self.create(alias="edge")
        self.assertRecord(created)
        self.assertRegex(created["id"], r"^[0-9a-f]{8}$")
        self.assertEqual((created["status"], created["restart"], created["alias"]),
                         ("running", True, "edge"))  # restart defaults to true here
        self.assertEqual(created["url"], SERVER + "?log=info&tls=0")
        self.assertEqual(created["config"], SERVER + "?block=0&dial=auto&dns=5m0s&log=info"
                                                     "&max=1024&mode=0&notcp=0&noudp=0&proxy=0"
                                                     "&rate=0&read=0s&slot=65536&tls=0&type=0")
        self.assertEqual(created["mode"], 1)  # the child reported reverse mode
        bare = self.create(SERVER.replace("10101", "10102"))
        self.assertEqual((bare["alias"], bare["meta"]),
                         ("", {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}))
        kept = self.create(SERVER.replace("10101", "10103"), restart=False,
                           meta={"tags": {"site": "paris"}, "peer": {"type": "2"}})
        self.assertEqual((kept["restart"], kept["meta"]["tags"], kept["meta"]["peer"]["type"]),
                         (False, {"site": "paris"}, "2"))
        seed = self.ok("GET", f"/instances/ins_{kept['id']}", dialect="seed")["data"]
        self.assertEqual((seed["restart"], seed["tags"], seed["alias"]),
                         (False, {"site": "paris"}, None))

    def test_create_refusals(self):
        self.error(400, "'url' is required", "POST", "/instances", {"alias": "x"})
        self.error(400, "unknown field 'uri' (allowed: url, alias, restart, meta, node)", "POST",
                   "/instances", {"uri": SERVER})
        self.error(400, "Invalid URL: query: unknown parameter 'tsl'", "POST", "/instances",
                   {"url": SERVER + "?tsl=1"})
        self.error(400, "Invalid URL: scheme: a master cannot run another master", "POST",
                   "/instances", {"url": "master://127.0.0.1:9"})
        self.error(400, "Invalid request body: the body is not valid JSON", "POST",
                   "/instances", raw=b"{url:")
        self.error(400, "a JSON object is expected", "POST", "/instances", raw=b"[1]")
        self.error(413, "exceeds 65536 bytes", "POST", "/instances",
                   raw=b'{"url": "' + b"x" * 70000 + b'"}')
        self.error(400, "'alias' must be a string of at most 256", "POST", "/instances",
                   {"url": SERVER, "alias": "a" * 257})
        self.assertEqual(len(self.ok("GET", "/instances")), 1)  # nothing was made

    def test_a_body_without_content_type_is_read_as_nodepass_reads_it(self):
        code, data, _ = self.call("POST", "/instances", raw=json.dumps({"url": SERVER}).encode(),
                                  headers={"Content-Type": ["text/plain"]})
        self.assertEqual((code, data["type"]), (201, "server"))

    def test_get_by_short_or_full_id(self):
        created = self.create()
        self.assertEqual(self.ok("GET", f"/instances/{created['id']}"), created)
        self.assertEqual(self.ok("GET", f"/instances/ins_{created['id']}")["id"], created["id"])
        self.error(404, "Instance not found: no instance with id 'ins_0badc0de'", "GET",
                   "/instances/0badc0de")
        self.assertEqual(self.ok("GET", "/instances/********")["url"], KEY)


class Patch(Case):
    def test_an_empty_body_changes_nothing(self):
        """NodePassDash's older clients send {} for every PATCH."""
        created = self.create()
        self.assertEqual(self.ok("PATCH", f"/instances/{created['id']}", {}), created)
        self.assertEqual(self.ok("PATCH", "/instances/********", {})["url"], KEY)

    def test_actions(self):
        path = f"/instances/{self.create()['id']}"
        self.assertEqual(self.ok("PATCH", path, {"action": "stop"})["status"], "stopped")
        self.assertEqual(self.ok("PATCH", path, {"action": "start"})["status"], "running")
        spawned = len(self.master.children.spawned)
        self.assertEqual(self.ok("PATCH", path, {"action": "restart"})["status"], "running")
        self.assertEqual(len(self.master.children.spawned), spawned + 1)

    def test_reset_zeroes_the_counters_and_nothing_else(self):
        created = self.create()
        self.master.children.report(f"ins_{created['id']}", tcp_in=500, tcp_out=700, udp_in=5,
                                    udp_out=7, connections=2)
        path = f"/instances/{created['id']}"
        before = self.ok("GET", path)
        self.assertEqual((before["tcprx"], before["tcptx"], before["udprx"], before["udptx"],
                          before["tcps"]), (500, 700, 5, 7, 2))
        after = self.ok("PATCH", path, {"action": "reset"})
        self.assertEqual((after["tcprx"], after["tcptx"], after["udprx"], after["udptx"]),
                         (0, 0, 0, 0))
        self.assertEqual((after["status"], after["tcps"]), ("running", 2))
        self.assertEqual(len(self.master.children.spawned), 1)  # the process was not touched
        (stored,) = self.master.store.load()
        self.assertEqual(stored.counters, dict.fromkeys(("tcp_in", "tcp_out", "udp_in",
                                                         "udp_out"), 0))  # saved at once
        self.master.children.report(f"ins_{created['id']}", tcp_in=600, tcp_out=700, udp_in=5,
                                    udp_out=7)
        self.assertEqual(self.ok("GET", path)["tcprx"], 100)  # counting goes on from zero
        seed = self.ok("GET", f"/instances/ins_{created['id']}", dialect="seed")["data"]
        self.assertEqual((seed["tcp_in"], seed["tcp_out"]), (100, 0))

    def test_metadata_alias_restart_peer_and_tags(self):
        path = f"/instances/{self.create(meta={'tags': {'a': '1'}})['id']}"
        sid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        changed = self.ok("PATCH", path, {"alias": "edge", "restart": False, "meta": {
            "peer": {"sid": sid.upper(), "type": "1", "alias": "home"}, "tags": {"b": "2"}}})
        self.assertEqual((changed["alias"], changed["restart"]), ("edge", False))
        self.assertEqual(changed["meta"], {"peer": {"sid": sid, "type": "1", "alias": "home"},
                                           "tags": {"b": "2"}})  # tags replace
        kept = self.ok("PATCH", path, {"meta": {"peer": {}}})  # an empty peer keeps it
        self.assertEqual(kept["meta"]["peer"], changed["meta"]["peer"])
        partial = self.ok("PATCH", path, {"meta": {"peer": {"alias": "office"}}})
        self.assertEqual(partial["meta"]["peer"], {"sid": sid, "type": "1", "alias": "office"})
        cleared = self.ok("PATCH", path, {"alias": "", "meta": {"peer": {"sid": ""},
                                                                "tags": {}}})
        self.assertEqual((cleared["alias"], cleared["meta"]["peer"]["sid"],
                          cleared["meta"]["tags"]), ("", "", {}))
        nulls = self.ok("PATCH", path, {"alias": None, "restart": None, "meta": None})
        self.assertEqual(nulls, cleared)  # null means "not given", as Go reads it

    def test_refusals_change_nothing(self):
        path = f"/instances/{self.create()['id']}"
        before = self.ok("GET", path)
        for body, fragment in (
                ({"alias": "x", "action": "explode"},
                 "Invalid action: 'explode' (allowed: start, stop, restart, reset)"),
                ({"alias": "x", "meta": {"peer": {"sid": "nope"}}}, "peer 'sid' must be a UUID"),
                ({"alias": "x", "meta": {"peer": {"type": "3"}}}, "peer 'type' must be"),
                ({"alias": "x", "meta": {"peer": {"alias": "p" * 257}}},
                 "peer 'alias' must be at most 256"),
                ({"alias": "x", "meta": {"peer": {"iid": "1"}}}, "unknown peer field 'iid'"),
                ({"alias": "x", "meta": {"tags": {"k:v": "1"}}}, "keys of 1-256 characters "
                                                                 "without ':'"),
                ({"alias": "x", "meta": {"tags": {f"k{i}": "" for i in range(65)}}},
                 "at most 64 string values"),
                ({"alias": "x", "meta": {"labels": {}}}, "'meta' must be an object of 'peer' "
                                                         "and 'tags'"),
                ({"alias": "x", "restart": "yes"}, "'restart' must be true or false"),
                ({"alias": "x", "url": SERVER}, "unknown field 'url' (allowed: action, alias, "
                                                "restart, meta)")):
            self.error(400, fragment, "PATCH", path, body)
        self.assertEqual(self.ok("GET", path), before)

    def test_the_key_record_takes_only_restart(self):
        self.error(400, 'takes only {"action": "restart"}', "PATCH", "/instances/********",
                   {"alias": "x"})
        self.error(403, "Forbidden: API Key", "PUT", "/instances/********", {"url": SERVER})
        self.error(403, "Forbidden: API Key", "DELETE", "/instances/********")


class KeyRotation(Case):
    def test_restart_on_the_key_record_makes_a_new_key_at_once(self):
        rotated = self.ok("PATCH", "/instances/********", {"action": "restart"})
        new = rotated["url"]
        self.assertNotEqual(new, KEY)
        self.assertGreaterEqual(len(new), 32)
        key_file = self.master.folder / "api.key"
        self.assertEqual(key_file.read_text().strip(), new)  # saved like today's
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.error(401, "Unauthorized: Invalid API key", "GET", "/instances")
        code, data, _ = self.call("GET", "/instances", dialect="seed")
        self.assertEqual((code, data["error"]["code"]), (401, "UNAUTHORIZED"))
        self.assertEqual(self.ok("GET", "/instances", key=new)[0]["url"], new)
        self.assertEqual(self.ok("GET", "/instances", dialect="seed", key=new)["data"],
                         {"instances": []})
        self.error(401, "Unauthorized: API key required", "GET", "/instances", key=None)

    def test_a_key_from_the_environment_is_not_rotated_here(self):
        self.master.key.origin = "env"
        self.error(409, "set by NODEPASS_API_KEY", "PATCH", "/instances/********",
                   {"action": "restart"})
        self.assertEqual(self.ok("GET", "/instances")[0]["url"], KEY)


class Put(Case):
    def test_a_new_url_restarts_the_instance_under_the_same_id(self):
        created = self.create(alias="edge")
        self.master.children.report(f"ins_{created['id']}", tcp_in=42)
        new_url = SERVER.replace("8080", "8081") + "?mode=1"
        replaced = self.ok("PUT", f"/instances/{created['id']}", {"url": new_url})
        self.assertEqual((replaced["id"], replaced["alias"], replaced["status"]),
                         (created["id"], "edge", "running"))
        self.assertEqual(replaced["url"], SERVER.replace("8080", "8081") + "?log=info&tls=0"
                                                                          "&mode=1")
        self.assertEqual(replaced["tcprx"], 42)  # the instance's history goes on
        (old, new) = self.master.children.spawned
        self.assertTrue(old[2].ended)
        self.assertEqual(new[0], replaced["url"])  # the process runs the new URL
        seed = self.ok("GET", f"/instances/ins_{created['id']}", dialect="seed")["data"]
        self.assertEqual(seed["url"], replaced["url"])
        stored = self.master.store.load()[0]
        self.assertEqual(stored.url, replaced["url"])

    def test_a_bad_or_same_url_leaves_the_running_instance_alone(self):
        created = self.create()
        path = f"/instances/{created['id']}"
        self.error(400, "Invalid URL: query: bad value '9' for 'mode'", "PUT", path,
                   {"url": SERVER + "?mode=9"})
        self.error(409, "Instance URL conflict", "PUT", path, {"url": SERVER})
        self.error(400, "'url' is required", "PUT", path, {})
        self.error(400, "unknown field 'action' (allowed: url)", "PUT", path,
                   {"url": SERVER, "action": "stop"})
        (only,) = self.master.children.spawned
        self.assertEqual((only[2].signals, self.ok("GET", path)), ([], created))


class Delete(Case):
    def test_delete_answers_204_with_no_body(self):
        created = self.create()
        code, data, response = self.call("DELETE", f"/instances/{created['id']}")
        self.assertEqual((code, data), (204, None))
        self.assertEqual(response.headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])
        self.error(404, "Instance not found", "DELETE", f"/instances/{created['id']}")
        self.assertEqual(len(self.ok("GET", "/instances")), 1)


class Info(Case):
    def test_fields_and_types(self):
        info = self.ok("GET", "/info")
        self.assertEqual(set(info), {*INFO_TYPES, "version"})
        for name, kind in INFO_TYPES.items():
            self.assertIs(type(info[name]), kind, name)
        self.assertEqual((info["ver"], info["tls"], info["log"], info["crt"], info["os"]),
                         ("v1.14.0", "0", "info", "", "linux"))
        self.assertGreaterEqual(info["mem_total"], info["mem_used"])
        self.assertGreater(info["mem_total"], 0)
        self.assertGreater(info["sysup"], 0)
        self.assertRegex(info["mid"], r"^[0-9a-f]{16}$")

    def test_post_sets_the_master_alias_everywhere(self):
        info = self.ok("POST", "/info", {"alias": "paris-1"})
        self.assertEqual(info["alias"], "paris-1")
        self.assertEqual(self.ok("GET", "/instances")[0]["alias"], "paris-1")
        self.assertEqual(self.ok("GET", "/info", dialect="seed")["data"]["alias"], "paris-1")
        self.error(400, "'alias' must be a string of at most 256", "POST", "/info",
                   {"alias": "a" * 300})
        self.error(400, "unknown field 'name'", "POST", "/info", {"name": "x"})

    def test_the_master_id_and_alias_are_kept_in_the_state(self):
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        first = Registry(self.master.clock, MasterConfig(), Tunables(), {}, Store.open(folder),
                         self.master.hub)
        first.set_alias("kept")
        first.store.close()
        again = Registry(self.master.clock, MasterConfig(), Tunables(), {}, Store.open(folder),
                         self.master.hub)
        self.assertEqual((again.master_id, again.alias), (first.master_id, "kept"))
        again.store.close()


class Routes(Case):
    def test_wrong_method_unknown_route_and_preflight_in_each_dialect(self):
        response = self.error(405, "Method not allowed: POST (allowed: ", "POST",
                              "/instances/abc")
        self.assertIn("PATCH", response.headers.getRawHeaders("Allow")[0])
        self.error(404, "Not found: no route /api/np/v1/nothing (this API lives under "
                        "/api/np/v1)", "GET", "/nothing")
        code, data, _ = self.call("GET", "/nothing", dialect="seed")
        self.assertEqual((code, data["error"]["code"]), (404, "NOT_FOUND"))
        code, _, response = self.call("OPTIONS", "/instances/abc", key=None, headers={
            "Access-Control-Request-Method": ["PATCH"], "Origin": ["http://panel.test"]})
        self.assertEqual(code, 204)
        headers = response.headers
        self.assertIn("PATCH", headers.getRawHeaders("Access-Control-Allow-Methods")[0])
        self.assertIn("Cache-Control", headers.getRawHeaders("Access-Control-Allow-Headers")[0])
        self.assertIn("X-API-Key", headers.getRawHeaders("Access-Control-Allow-Headers")[0])

    def test_the_openapi_document_is_3_1_and_validates(self):
        from openapi_spec_validator import validate

        code, document, _ = self.call("GET", "/openapi.json", key=None)
        self.assertEqual((code, document["openapi"]), (200, "3.1.0"))
        validate(document)
        self.assertEqual(
            {p.removeprefix("/api/np/v1") for p in document["paths"]},
            {"/instances", "/instances/{id}", "/info", "/tcping", "/events", "/openapi.json",
             "/docs"})


class CrossDialect(Case):
    def test_made_in_one_controlled_in_the_other(self):
        seeded = self.ok("POST", "/instances", {"url": SERVER, "tags": {"site": "lyon"}},
                         status=201, dialect="seed")["data"]
        short = short_id(seeded["id"])
        self.assertEqual(self.ok("GET", f"/instances/{short}")["meta"]["tags"], {"site": "lyon"})
        self.ok("PATCH", f"/instances/{short}", {"alias": "a", "action": "stop"})
        seed_view = self.ok("GET", f"/instances/{seeded['id']}", dialect="seed")["data"]
        self.assertEqual((seed_view["alias"], seed_view["status"]), ("a", "stopped"))
        self.assertFalse(seed_view["restart"])  # the seed's own default
        made = self.create(CLIENT)
        data = self.ok("PUT", f"/instances/ins_{made['id']}",
                       {"action": "reset", "peer": {"alias": "x"}}, dialect="seed")["data"]
        self.assertEqual(data["peer"]["alias"], "x")
        self.assertEqual(self.ok("GET", f"/instances/{made['id']}")["meta"]["peer"]["alias"], "x")

    def test_the_seed_dialect_replaces_urls_and_resets_too(self):
        seeded = self.ok("POST", "/instances", {"url": SERVER}, status=201,
                         dialect="seed")["data"]
        path = f"/instances/{seeded['id']}"
        code, data, _ = self.call("PUT", path, {"url": SERVER + "?rate=x"}, dialect="seed")
        self.assertEqual((code, data["error"]["code"]), (400, "INVALID_URL"))
        code, data, _ = self.call("PUT", path, {"url": SERVER}, dialect="seed")
        self.assertEqual((code, data["error"]["code"]), (409, "CONFLICT"))
        code, data, _ = self.call("PUT", path, {"url": SERVER + "?rate=1", "action": "stop"},
                                  dialect="seed")
        self.assertEqual((code, data["error"]["code"]), (400, "INVALID_REQUEST"))
        replaced = self.ok("PUT", path, {"url": SERVER + "?rate=1"}, dialect="seed")["data"]
        self.assertTrue(replaced["url"].endswith("&rate=1"))
        self.master.children.report(seeded["id"], tcp_out=9)
        reset = self.ok("PUT", path, {"action": "reset"}, dialect="seed")["data"]
        self.assertEqual(reset["tcp_out"], 0)


class Events(Case):
    """Both dialects' streams from one hub, read through a stand-in for the response."""

    def subscribe(self, dialect, last_id=None):
        request = StreamRequest(last_id)
        api = self.master.api.nodepass if dialect == "np" else self.master.api.seed
        api.events(request)
        return request

    def events(self, request):
        out = []
        for block in b"".join(request.written).decode().split("\n\n"):
            if not block or block.startswith(":"):
                continue
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            out.append(fields)
        return out

    def test_each_dialect_tells_the_same_events_its_way(self):
        self.create()
        np_stream, seed_stream = self.subscribe("np"), self.subscribe("seed")
        opening, *initial = self.events(np_stream)
        self.assertEqual(opening, {"retry": "3000"})
        self.assertEqual([e["event"] for e in initial], ["instance", "instance"])
        kinds = [json.loads(e["data"]) for e in initial]
        self.assertEqual([(k["type"], k["instance"]["id"]) for k in kinds],
                         [("initial", "********"), ("initial", kinds[1]["instance"]["id"])])
        self.assertEqual([e["event"] for e in self.events(seed_stream)], ["initial"])
        made = self.create(CLIENT)
        self.master.children.say(f"ins_{made['id']}", "tunnel session open")
        self.ok("DELETE", f"/instances/{made['id']}", status=204)
        np_events = [json.loads(e["data"]) for e in self.events(np_stream)[3:]]
        self.assertEqual([e["type"] for e in np_events],
                         ["create", "update", "log", "update", "delete"])
        for event in np_events:
            self.assertEqual(set(event), {"type", "time", "instance", "logs"})
            self.assertRegex(event["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertRecord(event["instance"])
        log = np_events[2]
        self.assertEqual(log["logs"], "2026-01-01 10:00:00.000  INFO   tunnel session open")
        self.assertEqual(np_events[0]["logs"], "")
        seed_events = self.events(seed_stream)[1:]
        self.assertEqual([e["event"] for e in seed_events],
                         ["create", "update", "log", "update", "delete"])
        self.assertEqual(json.loads(seed_events[2]["data"])["message"], "tunnel session open")
        # the same ids in both dialects, so each resumes where it left off
        self.assertEqual([e["id"] for e in self.events(np_stream)[3:]],
                         [e["id"] for e in seed_events])

    def test_resume_after_the_last_event_seen(self):
        self.create()
        first = self.subscribe("np")
        made = self.create(CLIENT)
        last_seen = self.events(first)[-1]["id"]
        self.ok("PATCH", f"/instances/{made['id']}", {"alias": "later"})
        resumed = self.subscribe("np", last_id=last_seen)
        opening, *missed = self.events(resumed)
        self.assertEqual(opening, {"retry": "3000"})
        self.assertEqual([json.loads(e["data"])["type"] for e in missed], ["update"])
        self.assertEqual(json.loads(missed[0]["data"])["instance"]["alias"], "later")

    def test_a_tick_updates_running_instances_and_shutdown_comes_last(self):
        self.create()
        stream = self.subscribe("np")
        self.master.clock.advance(1.0)
        self.master.hub.publish("shutdown")
        *_, update, shutdown = [json.loads(e["data"]) for e in self.events(stream)[1:]]
        self.assertEqual((update["type"], shutdown["type"], shutdown["instance"]),
                         ("update", "shutdown", None))

    def test_a_subscriber_that_stops_reading_is_dropped_once_too_much_waits(self):
        from nodepass.master import events

        stream = self.subscribe("np")
        stream.producer.pauseProducing()  # its connection's buffer is over its mark
        written = len(stream.written)
        self.create()  # a burst passes: the event waits in the transport
        self.assertFalse(stream.finished)
        self.assertGreater(len(stream.written), written)
        self.patch(events, "MAX_BEHIND", 0)  # ... until more than MAX_BEHIND waits
        written = len(stream.written)
        self.create()
        self.assertTrue(stream.finished)
        self.assertEqual(len(stream.written), written)  # nothing more was queued for it
        self.assertEqual(self.master.hub.subscribers, set())

    def test_a_new_key_ends_the_streams_opened_with_the_old_one(self):
        np_stream, seed_stream = self.subscribe("np"), self.subscribe("seed")
        self.ok("PATCH", "/instances/********", {"action": "restart"})
        self.assertTrue(np_stream.finished and seed_stream.finished)


class StreamRequest:
    """What the event routes use of a request: headers in, bytes out, a producer."""

    def __init__(self, last_id=None):
        self.written = []
        self.headers = {}
        self.code = 200
        self.finished = False
        self._finish = Deferred()
        self.requestHeaders = {}
        self._last_id = last_id

    def getHeader(self, name):
        if name.lower() == b"last-event-id" and self._last_id is not None:
            return str(self._last_id).encode()
        if name.lower() == b"x-api-key":
            return KEY.encode()
        return None

    def setHeader(self, name, value):
        self.headers[name] = value

    def setResponseCode(self, code):
        self.code = code

    def getClientAddress(self):
        return None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None
        self.finished = True

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return self._finish


class ConfigURL(SynchronousTestCase):
    def test_every_parameter_written_out_and_parsed_back_the_same(self):
        tunables = Tunables(min_pool_capacity=16, max_pool_capacity=1024)
        for url in ("server://k@h:1/h:2?dns=1h30m&read=90s&block=31&max=7&rate=5&mode=2",
                    "server://h:1/h:2,h:3?tls=1&notcp=1&proxy=2&slot=0&dial=127.0.0.2",
                    "client://k@h:1/h:2?min=3&max=9&dns=0&sni=example.com&mode=1",
                    "client://k@[::1]:1/[::1]:2?dial=::1&log=debug"):
            config = parse(url)
            written = config_url(config, tunables)
            again = parse(written)
            for field in ("tunnel", "targets", "mode", "rate", "slot", "read", "proxy", "dial",
                          "notcp", "noudp", "dns", "block", "log", "tunnel_key"):
                self.assertEqual(getattr(again, field), getattr(config, field), (url, field))
            query = written.partition("?")[2].split("&")
            self.assertEqual(query, sorted(query))  # sorted by name, as Go writes it
        self.assertEqual(config_url(parse("client://h:1/h:2"), tunables),
                         "client://h:1/h:2?block=0&dial=auto&dns=5m0s&log=info&min=16&mode=0"
                         "&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536")
        self.assertEqual(format_url(parse(config_url(parse("server://h:1/h:2"), tunables))),
                         "server://h:1/h:2?log=info&tls=0&max=1024")

    def test_go_durations(self):
        for seconds, text in ((0, "0s"), (300, "5m0s"), (3600, "1h0m0s"), (90, "1m30s"),
                              (1.5, "1.5s"), (0.5, "500ms"), (5400.25, "1h30m0.25s")):
            self.assertEqual(go_duration(seconds), text)
            self.assertEqual(parse_duration(text), seconds)


class Tcping(SynchronousTestCase):
    def ping(self, reactor, target="127.0.0.1:9", **kwargs):
        pinger = TcpPing(reactor, **kwargs)
        host, port = target.rsplit(":", 1)
        return pinger, ensureDeferred(pinger.ping(Address(host, int(port))))

    def test_connected_measures_and_closes(self):
        reactor = MemoryReactorClock()
        _, result = self.ping(reactor)
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 5.0))
        reactor.advance(0.012)
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(self.successResultOf(result),
                         {"connected": True, "latency": 12, "error": None})
        self.assertTrue(transport.disconnecting)

    def test_refused_and_timed_out(self):
        reactor = MemoryReactorClock()
        _, refused = self.ping(reactor)
        reactor.tcpClients[0][2].clientConnectionFailed(None, ConnectionRefusedError())
        self.assertEqual(self.successResultOf(refused)["error"],
                         "Connection was refused by other side")
        _, silent = self.ping(reactor, timeout=2.0)
        reactor.advance(2.0)
        self.assertEqual(self.successResultOf(silent),
                         {"connected": False, "latency": 2000,
                          "error": "no connection within 2s"})

    def test_at_most_limit_at_once(self):
        reactor = MemoryReactorClock()
        pinger = TcpPing(reactor, limit=2)
        for _ in range(2):
            ensureDeferred(pinger.ping(Address("127.0.0.1", 9)))
        self.failureResultOf(ensureDeferred(pinger.ping(Address("127.0.0.1", 9))),
                             TooManyPingsError)
        reactor.advance(5.0)
        self.assertEqual(pinger.running, 0)
