"""What a fleet master makes of what the others tell (nodepass/master/fleet.py), on a
Clock: no database, the notifications handed in as PostgreSQL would deliver them."""

import json
from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from nodepass.master.events import EventHub
from nodepass.master.fleet import MISSED_BEATS, Fleet, claim_next, read_live
from nodepass.master.instances import Instance, snapshot
from nodepass.master.outbox import Outbox
from nodepass.master.pgstore import signed
from nodepass.master.registry import Registry
from nodepass.master.store import Store
from nodepass.tunables import Tunables
from nodepass.url import MasterConfig, format_url, parse

ME, OTHER = "a" * 16, "b" * 16
URL = "server://127.0.0.1:7000/127.0.0.1:8000"


def told(instance_id="ins_00000001", order=(1.0, 1), **changes):
    instance = Instance(instance_id, parse(URL), 100.0, status="running", node=OTHER)
    for name, value in changes.items():
        setattr(instance, name, value)
    data = snapshot(instance)
    data["q"] = list(order)
    return json.loads(json.dumps(data))  # as it crosses the wire


class FakeDatabase:
    """What the fleet asks of its database: recorded, answered by the test."""

    def __init__(self):
        self.asked = []

    def run(self, work, *args):
        if work is claim_next:  # nothing queued for this node
            return succeed([])
        d = Deferred()
        self.asked.append((work, args, d))
        return d


class Heard(TestCase):
    def setUp(self):
        self.clock = Clock()
        store = Store.open(None)
        self.addCleanup(store.close)
        store.set_setting("mid", ME)
        self.registry = Registry(self.clock, MasterConfig(), Tunables(), {}, store,
                                 EventHub(self.clock))
        self.events = []
        self.registry.hub.add_dialect(
            "test", lambda _id, kind, subject, fields: self.events.append(
                (kind, subject.id if subject else None, fields.get("message"))) or b"")
        self.db = FakeDatabase()
        self.secret = b"s" * 32
        fake_store = SimpleNamespace(node=ME, outbox=Outbox(("log", "live", "result"), {},
                                                            lambda f: False),
                                     degraded=None, run=7, secret=self.secret, db=self.db,
                                     sign=lambda text: signed(self.secret, text))
        self.fleet = Fleet(self.clock, self.registry, fake_store)
        self.fleet.deaf = None
        self.registry.fleet = self.fleet

    def hear(self, **message):
        """A notification a master sent (signed with the fleet's secret)."""
        self.fleet._heard(signed(self.secret, json.dumps(message)))

    def reads(self):
        """The instance rows the fleet asked for: (args, Deferred)."""
        return [(args, d) for work, args, d in self.db.asked if work is read_live]

    def row(self, told_snapshot):
        """What a master reads from the instances table (the URL in full)."""
        self.fleet._resynced(([(told_snapshot["id"], OTHER, told_snapshot)], []),
                             self.fleet.generation)

    def notice(self, kind, told_snapshot):
        """What a notification carries: the URL only as its mark."""
        self.hear(k=kind, n=OTHER, i=told_snapshot["id"], s=self.fleet.public(told_snapshot))

    def test_another_nodes_instance_is_shown_and_an_older_snapshot_never_wins(self):
        self.row(told(alias="one"))
        shown = self.registry.get("ins_00000001")
        assert (shown.node, shown.alias, shown.status, shown.stale) == (OTHER, "one",
                                                                        "running", False)
        assert self.registry.describe(shown)["node"] == OTHER
        self.notice("update", told(alias="two", order=(1.0, 3)))
        self.notice("update", told(alias="old", order=(1.0, 2)))
        assert self.registry.get("ins_00000001").alias == "two"
        assert self.events == [("create", "ins_00000001", None),
                               ("update", "ins_00000001", None)]
        # a restarted node numbers from its new run: newer than anything before
        self.notice("update", told(alias="new", order=(2.0, 1)))
        assert self.registry.get("ins_00000001").alias == "new"
        assert self.registry.all() == [self.registry.get("ins_00000001")]
        assert self.registry.all(ME) == [] and len(self.registry.all(OTHER)) == 1
        assert self.reads() == []  # the URL was known: nothing to read

    def test_notifications_carry_no_url_and_a_new_one_is_read_from_the_row(self):
        secret_url = format_url(parse("server://tunnel-key@127.0.0.1:7000/127.0.0.1:8000"))
        first = told(alias="a")
        first["url"] = secret_url
        public = self.fleet.public(first)
        assert "url" not in public and "tunnel-key" not in json.dumps(public)
        self.notice("create", first)  # never seen: its row is read
        [(args, d)] = self.reads()
        assert args == ("ins_00000001",) and self.registry.remote == {}
        self.notice("update", first)  # one read at a time
        assert len(self.reads()) == 1
        d.callback((OTHER, first))
        assert self.registry.get("ins_00000001").url == secret_url
        moved = told(alias="a", order=(1.0, 5))
        moved["url"] = secret_url.replace("7000", "7001")
        self.notice("update", moved)  # its mark no longer matches: read again
        assert len(self.reads()) == 2 and self.registry.get("ins_00000001").url == secret_url

    def test_an_instance_naming_files_of_its_own_node_is_shown_here(self):
        on_b = told()
        on_b["url"] = ("server://k@127.0.0.1:7000/127.0.0.1:8000?tls=2&crt=/etc/only-on-b/c.pem"
                       "&key=/etc/only-on-b/k.pem")
        self.row(on_b)
        assert self.registry.get("ins_00000001").config.crt == "/etc/only-on-b/c.pem"

    def test_a_row_asked_for_during_its_read_is_read_again(self):
        first = told(alias="a")
        self.notice("create", first)
        self.notice("update", told(alias="b", order=(1.0, 2)))  # while the first read runs
        [(_, d)] = self.reads()
        d.callback((OTHER, first))
        reads = self.reads()
        assert len(reads) == 2  # the row is read once more: it may have changed meanwhile
        newer = told(alias="b", order=(1.0, 2))
        reads[1][1].callback((OTHER, newer))
        assert self.registry.get("ins_00000001").alias == "b"

    def test_an_outcome_is_told_with_its_snapshot_but_a_refusal_only_by_its_row(self):
        ok = {"ok": True, "snapshot": told(alias="x")}
        ok["snapshot"]["url"] = "server://secret-key@127.0.0.1:7000/127.0.0.1:8000"
        self.fleet._told_outcome("c1", ok)
        refused = {"ok": False, "code": "CONFLICT", "status": 409,
                   "message": "already runs server://secret-key@..."}
        self.fleet._told_outcome("c2", refused)
        notices = {entry[1]: entry[4] for entry in
                   (self.fleet.store.outbox.get(("result", c)) for c in ("c1", "c2"))}
        assert "secret-key" not in notices["c1"] and '"alias": "x"' in notices["c1"]
        assert "secret-key" not in notices["c2"] and "409" not in notices["c2"]
        rows = {c: json.loads(self.fleet.store.outbox.get(("result", c))[3])
                for c in ("c1", "c2")}
        assert rows["c2"] == refused  # the asker reads the words from the row

    def test_its_logs_and_its_deletion_are_told_here(self):
        self.row(told())
        self.hear(k="log", n=OTHER, i="ins_00000001", l="info", m="hello", line="x")
        assert self.registry.logs(self.registry.get("ins_00000001"), 5)[0]["message"] == \
            "hello"
        self.hear(k="delete", n=OTHER, i="ins_00000001")
        assert "ins_00000001" not in self.registry.remote
        assert self.events[-2:] == [("log", "ins_00000001", "hello"),
                                    ("delete", "ins_00000001", None)]
        self.hear(k="log", n=OTHER, i="ins_00000001", l="info", m="late", line="x")
        assert len(self.events) == 3  # nothing for an instance no longer there
        # a snapshot that was on its way (a command's outcome, a row read before the
        # delete) never brings it back
        self.row(told(order=(9.0, 9)))
        self.notice("update", told(order=(9.0, 10)))
        assert "ins_00000001" not in self.registry.remote and len(self.events) == 3

    def test_a_fresh_look_at_the_tables_forgets_only_what_they_no_longer_hold(self):
        self.row(told("ins_00000001"))
        started = self.fleet.generation  # the look at the tables starts here
        self.fleet._apply(OTHER, told("ins_00000002"))  # told while the look was under way
        self.fleet._resynced(([], []), started)
        assert list(self.registry.remote) == ["ins_00000002"]

    def test_what_this_node_told_itself_is_not_shown_twice(self):
        self.hear(k="create", n=ME, i="ins_00000002", s=told("ins_00000002"))
        assert self.registry.remote == {} and self.events == []

    def test_notifications_no_master_sent_are_ignored_and_said_once_a_minute(self):
        self.row(told())
        count = len(self.events)
        forged = [json.dumps({"k": "delete", "n": OTHER, "i": "ins_00000001"}),  # unsigned
                  signed(b"x" * 32, json.dumps({"k": "delete", "n": OTHER,  # another secret
                                                "i": "ins_00000001"}))]
        odd = [signed(self.secret, text) for text in (
            "not json", "[1, 2]", '{"k": "update"}', '{"k": "bogus", "n": "x", "i": "y"}',
            json.dumps({"k": "update", "n": OTHER, "i": "x", "s": {"id": "x", "q": "soon"}}),
            json.dumps({"k": "log", "n": OTHER, "i": 5, "l": 1, "m": 2}),
            json.dumps({"k": "result", "c": ["x"]}))]
        for payload in forged + odd:
            self.fleet._heard(payload)
        assert list(self.registry.remote) == ["ins_00000001"] and len(self.events) == count
        assert self.flushLoggedErrors() == []  # warnings, not failures
        assert self.fleet._odd == 8  # the first was said at once, the others counted

    def test_a_node_silent_for_three_heartbeats_has_its_instances_marked_stale(self):
        self.row(told())
        beat = 5.0
        self.fleet._nodes_read([(ME, "", "v", beat, 0.0), (OTHER, "b", "v", beat, 1.0)])
        assert not self.registry.get("ins_00000001").stale
        self.fleet._nodes_read([(ME, "", "v", beat, 0.0),
                                (OTHER, "b", "v", beat, MISSED_BEATS * beat + 0.1)])
        shown = self.registry.get("ins_00000001")
        assert shown.stale and self.registry.describe(shown)["stale"] is True
        assert self.events[-1] == ("update", "ins_00000001", None)
        count = len(self.events)
        self.fleet._nodes_read([(ME, "", "v", beat, 0.0), (OTHER, "b", "v", beat, 30.0)])
        assert len(self.events) == count  # said once
        self.fleet._nodes_read([(ME, "", "v", beat, 0.0), (OTHER, "b", "v", beat, 0.2)])
        assert not self.registry.get("ins_00000001").stale
        assert [(n["id"], n["online"], n["self"]) for n in self.registry.nodes()] == [
            (ME, True, True), (OTHER, True, False)]

    def test_a_snapshot_this_master_cannot_read_is_left_out_with_a_warning(self):
        bad = told()
        bad["url"] = "nonsense://"
        self.row(bad)
        assert self.registry.remote == {}


class DeletedStaysDeleted(TestCase):
    """A change that waited for its turn behind a delete (a command from another master,
    or this master's own API) never brings the instance back."""

    def test_a_start_queued_behind_a_delete_is_refused_and_spawns_nothing(self):
        from tests.fakemaster import Children

        clock = Clock()
        store = Store.open(None)
        self.addCleanup(store.close)
        children = Children()
        children.stubborn = True  # SIGTERM is ignored: the delete holds the instance
        registry = Registry(clock, MasterConfig(), Tunables(), {}, store, EventHub(clock),
                            spawn=children)
        created = self.successResultOf(Deferred.fromCoroutine(registry.create(URL)))
        deleting = Deferred.fromCoroutine(registry.delete(created))
        starting = Deferred.fromCoroutine(registry.control(created, action="start"))
        renaming = Deferred.fromCoroutine(registry.control(created, alias="back"))
        clock.advance(60)  # the grace runs out: SIGKILL
        self.successResultOf(deleting)
        for refused in (starting, renaming):
            assert self.failureResultOf(refused).value.code == "INSTANCE_NOT_FOUND"
        assert children.running() == [] and len(children.spawned) == 1
        assert registry.instances == {} and store.load() == []


class DatabaseUrl(TestCase):
    def test_a_password_is_refused_however_it_is_spelled_and_never_repeated(self):
        from nodepass.master.pg import check_dsn
        from nodepass.master.store import StoreError

        for dsn in ("postgresql://u:s3cr/t@db/x", "postgresql://u:s3cr?t@db:5432/x",
                    "postgresql://u@db/x?%70assword=s3cr", "postgres://u@db/x?sslmode=require"
                    "&password=s3cr", "postgresql://u:s3cr@/x?host=/run/pg"):
            with self.assertRaises(StoreError) as raised:
                check_dsn(dsn)
            said = str(raised.exception)
            assert ("password" in said or "malformed" in said) and "s3cr" not in said, said
        with self.assertRaises(StoreError) as raised:
            check_dsn("postgresql://u@db:port/x")
        assert "malformed" in str(raised.exception)
        assert check_dsn("postgresql://u@/x?host=/run/pg") == "postgresql://u@/x?host=/run/pg"
