"""A fleet: masters on one PostgreSQL (docs/fleet.md), each a real process, with a real
PostgreSQL started for the test (tests/postgres.py)."""

import os
import shutil
import signal
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.integration import eventually, sleep, spawn
from tests.postgres import started_postgres
from tests.procs import run_nodepass
from tests.sse import EventStream
from tests.test_master_api import KEY, Api, api_port

HEARTBEAT = 0.3  # seconds: offline after 3 of them
SERVER = "server://127.0.0.1:0/127.0.0.1:0?log=info"


class FleetCase(TestCase):
    """A PostgreSQL for the test, and masters on it."""

    timeout = 90

    def setUp(self):
        self.pg = started_postgres(self)

    async def master(self, name, state=None):
        """A master of the fleet; ``state`` (a directory) keeps its node id across runs."""
        if state is None:
            state = Path(tempfile.mkdtemp())
            self.addCleanup(shutil.rmtree, state, True)
        master = spawn(self, "master://127.0.0.1:0", name=name, NODEPASS_STATE_DIR=str(state),
                       NODEPASS_API_KEY=KEY, NODEPASS_DATABASE_URL=self.pg.dsn,
                       PGPASSWORD=self.pg.password, REPORT_INTERVAL="500ms",
                       FLEET_HEARTBEAT=f"{int(HEARTBEAT * 1000)}ms", FLEET_COMMAND_WAIT="10s")
        await api_port(master)
        master.state = state
        master.api = Api(master.base)
        master.np = Api(master.base.replace("/api/v1", "/api/np/v1"))
        master.node = (await master.api.ok("GET", "/info"))["master_id"]
        return master

    async def knows(self, master, *nodes):
        async def check():
            seen = {n["id"]: n["online"] for n in
                    (await master.api.ok("GET", "/nodes"))["nodes"]}
            return all(seen.get(node) for node in nodes)

        await eventually(check)

    async def watch(self, url):
        """An event stream, whose end when its master is killed is no error."""
        stream = await EventStream(url, KEY).open()
        stream.ended.addErrback(lambda _: None)
        return stream

    def commands(self):
        with self.pg.connect() as conn:
            return conn.execute("SELECT op, state, node FROM nodepass.commands ORDER BY seq"
                                ).fetchall()


class Fleet(FleetCase):

    async def test_three_masters_one_view_and_control_from_any(self):
        a, b, c = [await self.master(name) for name in ("A", "B", "C")]
        await self.knows(a, b.node, c.node)
        await self.knows(c, a.node, b.node)
        events = await self.watch(f"{a.base}/events")
        np_events = await self.watch(a.np.base + "/events")

        # create on B, asked of A: B runs it, A answers with what B did
        made = await a.api.ok("POST", "/instances", {"url": SERVER, "node": b.node,
                                                     "alias": "web"}, status=201)
        assert made["node"] == b.node and made["status"] == "running", made
        ident = made["id"]
        await b.wait_for(rf"\[{ident}\] .*tunnel listening on")
        assert not any(ident in line for line in a.lines + c.lines)  # only B runs it
        with open(f"/proc/{made['pid']}/environ", "rb") as f:  # B's child, not B
            environ = f.read()
        assert self.pg.password.encode() not in environ and b"PGPASSWORD" not in environ
        created = await events.wait(lambda e: e.name == "create" and e.json["id"] == ident)
        assert created.json["node"] == b.node

        # one view from anywhere, both dialects, with ?node=
        seen_c = await c.api.ok("GET", f"/instances/{ident}")
        assert (seen_c["node"], seen_c["alias"], seen_c["stale"]) == (b.node, "web", False)
        mine = await c.api.ok("POST", "/instances", {"url": SERVER}, status=201)
        assert mine["node"] == c.node
        async def both_seen():
            listed = (await a.api.ok("GET", "/instances"))["instances"]
            return {(i["id"], i["node"]) for i in listed} == {(ident, b.node),
                                                              (mine["id"], c.node)}
        await eventually(both_seen)
        only_b = (await a.api.ok("GET", f"/instances?node={b.node}"))["instances"]
        assert [i["id"] for i in only_b] == [ident]
        code, np_list, _ = await a.np.call("GET", f"/instances?node={c.node}")
        assert code == 200 and [i["id"] for i in np_list[1:]] == [mine["id"].removeprefix(
            "ins_")] and np_list[1]["node"] == c.node, np_list
        code, none, _ = await a.np.call("GET", "/instances?node=0000000000000000")
        assert code == 200 and len(none) == 1  # the key record only

        # control from C: each answer is B's real outcome
        stopped = await c.api.ok("PUT", f"/instances/{ident}", {"action": "stop"})
        assert stopped["status"] == "stopped" and stopped["stopped_at"], stopped
        assert (await b.api.ok("GET", f"/instances/{ident}"))["status"] == "stopped"
        started = await c.api.ok("PUT", f"/instances/{ident}", {"action": "start"})
        assert started["status"] == "running" and started["pid"], started
        code, patched, _ = await c.np.call("PATCH", f"/instances/{ident}",
                                           {"alias": "web2", "action": "restart"})
        assert code == 200 and patched["alias"] == "web2" and patched["node"] == b.node
        url2 = "server://127.0.0.1:0/127.0.0.1:0?log=warn"
        replaced = await c.api.ok("PUT", f"/instances/{ident}", {"url": url2})
        assert "log=warn" in replaced["url"] and replaced["status"] == "running"
        code, same, _ = await c.api.call("PUT", f"/instances/{ident}", {"url": url2})
        assert code == 409 and same["error"]["code"] == "CONFLICT", same  # B's own check
        code, bad, _ = await c.api.call("PUT", f"/instances/{ident}", {"action": "fly"})
        assert code == 400 and bad["error"]["code"] == "INVALID_ACTION"
        reset = await c.api.ok("PUT", f"/instances/{ident}", {"action": "reset"})
        assert reset["tcp_in"] == 0
        code, wrong, _ = await a.api.call("POST", "/instances", {"url": SERVER,
                                                                 "node": "nosuchnode"})
        assert code == 404 and wrong["error"]["code"] == "NODE_NOT_FOUND", wrong
        assert "nosuchnode" in wrong["error"]["message"]

        # A's stream told each of B's changes, with the node
        await events.wait(lambda e: e.name == "update" and e.json["id"] == ident
                          and e.json["alias"] == "web2")
        await np_events.wait(lambda e: e.json["type"] == "update"
                             and (e.json["instance"] or {}).get("alias") == "web2")
        assert all(e.json["node"] == b.node for e in events.events
                   if e.name in ("create", "update") and e.json["id"] == ident)

        # traffic history is shared: C reads the samples B wrote
        async def sampled():
            data = await c.api.ok("GET", f"/instances/{ident}/traffic?window=60")
            return data["samples"]
        await eventually(sampled)

        code, deleted, _ = await c.api.call("DELETE", f"/instances/{ident}")
        assert code == 200 and deleted["data"] == {"id": ident, "deleted": True}, deleted
        await events.wait(lambda e: e.name == "delete" and e.json["id"] == ident)
        code, gone, _ = await b.api.call("GET", f"/instances/{ident}")
        assert code == 404, gone
        ran = [row for row in self.commands() if row[2] == b.node]
        # stop, start, PATCH, PUT url, the same url again (B's 409), reset; the bad action
        # was refused by C itself
        assert [op for op, _, _ in ran] == ["create"] + ["control"] * 6 + ["delete"], ran
        assert [state for _, state, _ in ran].count("failed") == 1
        assert b.count("fleet command ") == 8  # each carried out once

    async def test_a_dead_node_goes_offline_and_its_queued_commands_run_once_when_back(self):
        a = await self.master("A")
        b = await self.master("B")
        await self.knows(a, b.node)
        made = await a.api.ok("POST", "/instances", {"url": SERVER, "node": b.node},
                              status=201)
        ident = made["id"]
        events = await self.watch(f"{a.base}/events")

        b.send_signal(signal.SIGKILL)
        await b.ended
        killed = reactor.seconds()
        stale = await events.wait(lambda e: e.name == "update" and e.json["id"] == ident
                                  and e.json["stale"], timeout=10)
        # offline after three heartbeats missed, seen at A's next look (+ slack for CI)
        assert reactor.seconds() - killed < 4 * HEARTBEAT + 1.5
        assert stale.json["node"] == b.node
        nodes = {n["id"]: n for n in (await a.api.ok("GET", "/nodes"))["nodes"]}
        assert nodes[b.node]["online"] is False

        code, answer, _ = await a.api.call("PUT", f"/instances/{ident}", {"action": "stop"})
        assert code == 504 and answer["error"]["code"] == "NODE_OFFLINE", answer
        assert b.node in answer["error"]["message"] and "queued" in answer["error"]["message"]
        code, _, _ = await a.api.call("PUT", f"/instances/{ident}", {"alias": "later"})
        assert code == 504

        b2 = await self.master("B again", state=b.state)
        assert b2.node == b.node

        async def carried_out():
            seen = await a.api.ok("GET", f"/instances/{ident}")
            return seen if seen["status"] == "stopped" and seen["alias"] == "later" else None

        seen = await eventually(carried_out)
        assert seen["stale"] is False
        await sleep(4 * HEARTBEAT)  # a second look at the queue must find nothing to do
        assert b2.count("fleet command ") == 2, b2.lines
        assert [(op, state) for op, state, _ in self.commands()] == [
            ("create", "done"), ("control", "done"), ("control", "done")]

    async def test_postgresql_restarted_masters_degrade_and_recover(self):
        a = await self.master("A")
        b = await self.master("B")
        await self.knows(a, b.node)
        first = await a.api.ok("POST", "/instances", {"url": SERVER}, status=201)
        second = await a.api.ok("POST", "/instances", {"url": SERVER}, status=201)
        on_b = await a.api.ok("POST", "/instances", {"url": SERVER, "node": b.node},
                              status=201)

        self.pg.stop()

        async def degraded(master):
            async def check():
                return (await master.api.ok("GET", "/info"))["store"]["status"] == "degraded"
            await eventually(check)

        await degraded(a)
        await degraded(b)
        info = (await a.np.call("GET", "/info"))[1]
        assert info["store"]["status"] == "degraded"
        # A's instances keep running; what needs the database is refused, clearly
        assert (await a.api.ok("GET", f"/instances/{first['id']}"))["status"] == "running"
        code, refused, _ = await a.api.call("POST", "/instances", {"url": SERVER})
        assert code == 503 and refused["error"]["code"] == "FLEET_UNAVAILABLE", refused
        code, refused, _ = await a.api.call("PUT", f"/instances/{on_b['id']}",
                                            {"action": "stop"})
        assert code == 503 and refused["error"]["code"] == "FLEET_UNAVAILABLE", refused
        # a change to A's own instance is made now and written when the database is back
        stopped = await a.api.ok("PUT", f"/instances/{second['id']}", {"action": "stop"})
        assert stopped["status"] == "stopped"

        self.pg.start_again()

        async def recovered():
            info = await a.api.ok("GET", "/info")
            return info["store"]["status"] == "ok" and not info["store"]["pending_writes"]
        await eventually(recovered)

        async def b_sees_the_stop():
            seen = await b.api.ok("GET", f"/instances/{second['id']}")
            return seen["status"] == "stopped"
        await eventually(b_sees_the_stop)
        after = await a.api.ok("PUT", f"/instances/{on_b['id']}", {"action": "stop"})
        assert after["status"] == "stopped"
        with self.pg.connect() as conn:
            rows = conn.execute("SELECT id, node, desired FROM nodepass.instances ORDER BY id"
                                ).fetchall()
        assert sorted(rows) == sorted([(first["id"], a.node, "running"),
                                       (second["id"], a.node, "stopped"),
                                       (on_b["id"], b.node, "stopped")]), rows
        assert [(op, state) for op, state, _ in self.commands()] == [
            ("create", "done"), ("control", "done")]
        assert b.count("fleet command ") == 2


class FleetDashboard(FleetCase):
    """The dashboard of one master of a fleet, in a real headless Chromium."""

    async def test_other_nodes_tunnels_show_their_node_and_an_unreachable_database_a_banner(
            self):
        from twisted.internet.threads import deferToThread

        from tests.test_dashboard import Page, browser

        a = await self.master("A")
        b = await self.master("B")
        code, _, _ = await b.np.call("POST", "/info", {"alias": "nat-box"})
        assert code == 200
        await self.knows(a, b.node)
        made = await a.api.ok("POST", "/instances", {"url": SERVER, "node": b.node},
                              status=201)
        driver = await deferToThread(browser, self)
        page = Page(driver, f"http://127.0.0.1:{a.port}")
        made_here = await deferToThread(self.session, page, made, b.node)
        assert (await b.api.ok("GET", f"/instances/{made_here}"))["alias"] == "from-a"

    def session(self, page, made, b_node):
        from selenium.webdriver.support.ui import Select

        by = page.by
        page.driver.get(f"{page.origin}/api/")
        page.until(lambda: page.find("login").is_displayed(), "the key is asked for")
        page.login(KEY)
        page.until(lambda: page.row(made["id"]), "B's tunnel is listed on A's dashboard")

        def node_of(instance_id):
            row = page.row(instance_id)
            return row.find_element(by.CSS_SELECTOR, 'td[data-column="node"]').text if row \
                else ""
        page.until(lambda: node_of(made["id"]) == "nat-box", "with B's alias as its node")
        assert not page.find("store-banner").is_displayed()

        # a new tunnel made in A's form, to run on B
        page.find("new-button").click()
        form = page.find("create-form")
        page.until(lambda: page.find("create-node-label").is_displayed(),
                   "in a fleet the form asks which node")
        form.find_element(by.NAME, "tunnel").send_keys("127.0.0.1:0")
        form.find_element(by.NAME, "targets").send_keys("127.0.0.1:0")
        form.find_element(by.NAME, "alias").send_keys("from-a")
        Select(form.find_element(by.NAME, "node")).select_by_visible_text("nat-box")
        page.find("create-submit").click()
        page.until(lambda: page.find("detail").is_displayed()
                   and page.text("detail-title") == "from-a", "its page opens")
        made_here = page.driver.current_url.rsplit("/", 1)[1]
        page.driver.get(f"{page.origin}/api/#/")
        page.until(lambda: node_of(made_here) == "nat-box", "it runs on B")

        self.pg.stop()
        page.until(lambda: page.find("store-banner").is_displayed(),
                   "an unreachable database is said")
        assert "keep running" in page.text("store-banner")
        self.pg.start_again()
        page.until(lambda: not page.find("store-banner").is_displayed(),
                   "and no longer once it is back")
        return made_here


class Settings(TestCase):
    """What the fleet database is, checked before the master starts."""

    def setUp(self):
        self.pg = started_postgres(self)
        self.state = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.state, True)

    def run_master(self, url="master://127.0.0.1:0", **env):
        from tests.procs import clean_env

        return run_nodepass(url, env=clean_env(NODEPASS_STATE_DIR=self.state, **env))

    def test_bad_settings_are_refused_in_one_line(self):
        with_password = self.pg.dsn.replace("nodepass@", f"nodepass:{self.pg.password}@")
        cases = [
            (dict(NODEPASS_DATABASE_URL=with_password), "carries a password"),
            (dict(NODEPASS_DATABASE_URL=self.pg.dsn, PGPASSWORD="wrong"),
             "password authentication failed"),
            (dict(NODEPASS_DATABASE_URL=self.pg.dsn.replace(self.pg.socket_dir,
                                                            "/nonexistent")),
             "cannot be reached"),
        ]
        for env, expected in cases:
            result = self.run_master(**env)
            assert result.returncode == 2, (env, result)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], result.stderr
            assert self.pg.password not in result.stdout + result.stderr
            assert "Traceback" not in result.stderr
        # state= in the master URL names the database too (percent-encoded there)
        from urllib.parse import quote

        result = self.run_master(f"master://127.0.0.1:0?state={quote(self.pg.dsn, safe='')}",
                                 PGPASSWORD="wrong")
        assert result.returncode == 2 and "password authentication failed" in result.stderr
        result = self.run_master("master://127.0.0.1:0?persist=0",
                                 NODEPASS_DATABASE_URL=self.pg.dsn, PGPASSWORD=self.pg.password)
        assert result.returncode == 2 and "persist=0" in result.stderr, result

    def test_the_schema_migrates_forward_and_a_newer_one_is_refused_untouched(self):
        from nodepass.master import pg as pgmod
        from nodepass.master.pgstore import PgStore
        from nodepass.master.store import StoreError

        os.environ["PGPASSWORD"] = self.pg.password
        self.addCleanup(os.environ.pop, "PGPASSWORD", None)
        with self.pg.connect() as conn:
            conn.execute("CREATE SCHEMA nodepass")
            conn.execute("SET search_path = nodepass")
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (3)")
            for step in pgmod.MIGRATIONS[:3]:
                for statement in step:
                    conn.execute(statement)
            conn.execute("INSERT INTO instances (id, url, created_at, desired, tcp_in) VALUES "
                         "('ins_00000001', 'server://127.0.0.1:1/127.0.0.1:2', 1.0, 'stopped',"
                         " 42)")
            conn.execute("INSERT INTO issued_ids VALUES ('ins_00000001')")
        store = PgStore(self.pg.dsn, Path(self.state))
        assert store.found_version == 3
        [kept] = store.load()
        assert (kept.id, kept.counters["tcp_in"], kept.desired) == ("ins_00000001", 42,
                                                                     "stopped")
        assert "ins_00000001" in store.issued()
        with self.pg.connect() as conn:
            assert conn.execute("SELECT version FROM nodepass.schema_version").fetchone() == (
                pgmod.SCHEMA_VERSION,)
            conn.execute("UPDATE nodepass.schema_version SET version = 99")
            before = conn.execute("SELECT * FROM nodepass.instances").fetchall()
        with self.assertRaises(StoreError) as raised:
            PgStore(self.pg.dsn, Path(self.state))
        assert "schema version 99" in str(raised.exception)
        with self.pg.connect() as conn:
            assert conn.execute("SELECT version FROM nodepass.schema_version").fetchone() == (99,)
            assert conn.execute("SELECT * FROM nodepass.instances").fetchall() == before
