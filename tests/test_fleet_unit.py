"""What a fleet master makes of what the others tell (nodepass/master/fleet.py), on a
Clock: no database, the notifications handed in as PostgreSQL would deliver them."""

import json
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from nodepass.master.events import EventHub
from nodepass.master.fleet import MISSED_BEATS, Fleet
from nodepass.master.instances import Instance, snapshot
from nodepass.master.outbox import Outbox
from nodepass.master.registry import Registry
from nodepass.master.store import Store
from nodepass.tunables import Tunables
from nodepass.url import MasterConfig, parse

ME, OTHER = "a" * 16, "b" * 16
URL = "server://127.0.0.1:7000/127.0.0.1:8000"


def told(instance_id="ins_00000001", order=(1.0, 1), **changes):
    instance = Instance(instance_id, parse(URL), 100.0, status="running", node=OTHER)
    for name, value in changes.items():
        setattr(instance, name, value)
    data = snapshot(instance)
    data["q"] = list(order)
    return json.loads(json.dumps(data))  # as it crosses the wire


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
        fake_store = SimpleNamespace(node=ME, outbox=Outbox((), {}, lambda f: False),
                                     degraded=None)
        self.fleet = Fleet(self.clock, self.registry, fake_store)
        self.fleet.deaf = None
        self.registry.fleet = self.fleet

    def hear(self, **message):
        self.fleet._heard(json.dumps(message))

    def test_another_nodes_instance_is_shown_and_an_older_snapshot_never_wins(self):
        self.hear(k="create", n=OTHER, i="ins_00000001", s=told(alias="one"))
        shown = self.registry.get("ins_00000001")
        assert (shown.node, shown.alias, shown.status, shown.stale) == (OTHER, "one",
                                                                        "running", False)
        assert self.registry.describe(shown)["node"] == OTHER
        self.hear(k="update", n=OTHER, i="ins_00000001", s=told(alias="two", order=(1.0, 3)))
        self.hear(k="update", n=OTHER, i="ins_00000001", s=told(alias="old", order=(1.0, 2)))
        assert self.registry.get("ins_00000001").alias == "two"
        assert self.events == [("create", "ins_00000001", None),
                               ("update", "ins_00000001", None)]
        # a restarted node numbers from its new start: newer than anything before
        self.hear(k="update", n=OTHER, i="ins_00000001", s=told(alias="new", order=(2.0, 1)))
        assert self.registry.get("ins_00000001").alias == "new"
        assert self.registry.all() == [self.registry.get("ins_00000001")]
        assert self.registry.all(ME) == [] and len(self.registry.all(OTHER)) == 1

    def test_its_logs_and_its_deletion_are_told_here(self):
        self.hear(k="create", n=OTHER, i="ins_00000001", s=told())
        self.hear(k="log", n=OTHER, i="ins_00000001", l="info", m="hello", line="x")
        assert self.registry.logs(self.registry.get("ins_00000001"), 5)[0]["message"] == \
            "hello"
        self.hear(k="delete", n=OTHER, i="ins_00000001")
        assert "ins_00000001" not in self.registry.remote
        assert self.events[-2:] == [("log", "ins_00000001", "hello"),
                                    ("delete", "ins_00000001", None)]
        self.hear(k="log", n=OTHER, i="ins_00000001", l="info", m="late", line="x")
        assert len(self.events) == 3  # nothing for an instance no longer there

    def test_what_this_node_told_itself_is_not_shown_twice(self):
        self.hear(k="create", n=ME, i="ins_00000002", s=told("ins_00000002"))
        assert self.registry.remote == {} and self.events == []

    def test_a_node_silent_for_three_heartbeats_has_its_instances_marked_stale(self):
        self.hear(k="create", n=OTHER, i="ins_00000001", s=told())
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
        self.hear(k="create", n=OTHER, i="ins_00000001", s=bad)
        assert self.registry.remote == {}
