"""The fleet's outbox (nodepass/master/outbox.py) on a Clock, with a fake database."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from nodepass.master.outbox import MAX_BATCH, RETRY_FIRST, Outbox


class DownError(Exception):
    pass


class FakeDatabase:
    """Each write waits until the test answers it: ok, down, or refusing some entries."""

    def __init__(self):
        self.calls = []  # (entries, careful, Deferred)
        self.committed = []

    def write(self, entries, careful):
        d = Deferred()
        self.calls.append((list(entries), careful, d))
        return d

    def ok(self, refused=()):
        entries, _, d = self.calls[-1]
        self.committed.extend(e for e in entries if e not in refused)
        d.callback([(e, "refused") for e in refused])

    def down(self):
        self.calls[-1][2].errback(Failure(DownError("connection refused")))

    def bug(self):
        self.calls[-1][2].errback(Failure(ValueError("cannot write that")))


def outbox(limits=None):
    clock = Clock()
    box = Outbox(("node", "row", "live", "log"), limits or {},
                 lambda failure: bool(failure.check(DownError)))
    db = FakeDatabase()
    statuses = []
    box.on_status.append(statuses.append)
    box.start(clock, db.write)
    return box, db, clock, statuses


class OutboxTests(TestCase):
    def test_writes_of_one_thing_coalesce_and_a_batch_goes_in_kind_order(self):
        box, db, clock, _ = outbox()
        box.put(("live", "a"), ("live", "a", 1))
        box.put(("row", "a"), ("row", "a", 1))
        box.put(("live", "a"), ("live", "a", 2))  # replaces the first
        clock.advance(0)
        [(entries, careful, _)] = db.calls
        assert entries == [("row", "a", 1), ("live", "a", 2)] and not careful
        box.put(("live", "a"), ("live", "a", 3))  # while the batch is in flight
        db.ok()
        clock.advance(0)
        assert db.calls[-1][0] == [("live", "a", 3)]
        db.ok()
        assert not len(box)

    def test_while_the_database_is_away_writes_wait_and_are_sent_once_it_is_back(self):
        box, db, clock, statuses = outbox()
        box.put(("row", "a"), ("row", "a", 1))
        clock.advance(0)
        durable = box.durable()
        db.down()
        assert box.degraded == "connection refused" and statuses == ["connection refused"]
        assert self.successResultOf(durable) is False  # not waited for while away
        box.put(("row", "b"), ("row", "b", 1))
        clock.advance(0)
        assert len(db.calls) == 1  # nothing tried before the backoff's delay
        clock.advance(RETRY_FIRST)
        db.down()
        assert statuses == ["connection refused"]  # said once
        clock.advance(RETRY_FIRST * 2)
        durable = box.durable()
        assert self.successResultOf(durable) is False
        db.ok()
        assert db.committed == [("row", "a", 1), ("row", "b", 1)]  # each once, none lost
        assert box.degraded is None and statuses == ["connection refused", None]
        assert not len(box)

    def test_durable_fires_once_everything_put_before_it_is_written(self):
        box, db, clock, _ = outbox()
        box.put(("row", "a"), ("row", "a", 1))
        clock.advance(0)
        first = box.durable()
        box.put(("row", "a"), ("row", "a", 2))  # newer than the batch in flight
        second = box.durable()
        db.ok()
        assert self.successResultOf(first) is True
        self.assertNoResult(second)  # "a" as it is now is not written yet
        clock.advance(0)
        db.ok()
        assert self.successResultOf(second) is True

    def test_an_entry_refused_for_what_it_is_blocks_nothing_else(self):
        box, db, clock, statuses = outbox()
        box.put(("row", "good"), ("row", "good"))
        box.put(("row", "bad"), ("row", "bad"))
        clock.advance(0)
        db.bug()
        assert box.degraded is None and statuses == []  # the database is not away
        clock.advance(RETRY_FIRST)
        entries, careful, _ = db.calls[-1]
        assert careful and entries == [("row", "good"), ("row", "bad")]
        db.ok(refused=[("row", "bad")])
        assert db.committed == [("row", "good")] and not len(box)
        self.flushLoggedErrors(ValueError)
        box.put(("row", "next"), ("row", "next"))
        clock.advance(0)
        assert db.calls[-1][1] is False  # back to one transaction per batch

    def test_log_lines_waiting_are_bounded_the_oldest_left_out(self):
        box, db, clock, _ = outbox(limits={"log": 3})
        box.put(("row", "a"), ("row", "a"))
        clock.advance(0)
        db.down()
        for n in range(10):
            box.put(("log", n), ("log", n))
        assert [k for k in box if k[0] == "log"] == [("log", 7), ("log", 8),
                                                            ("log", 9)]
        assert ("row", "a") in box  # state is never left out
        clock.advance(RETRY_FIRST)
        db.ok()
        assert db.committed == [("row", "a"), ("log", 7), ("log", 8), ("log", 9)]

    def test_a_backlog_goes_in_batches_the_heartbeat_first(self):
        box, db, clock, _ = outbox(limits={"log": 10 * MAX_BATCH})
        box.put(("row", "a"), ("row", "a"))
        clock.advance(0)
        db.down()
        for n in range(2 * MAX_BATCH):
            box.put(("log", n), ("log", n))
        box.put(("node",), ("node", "alive"))  # put last, written first
        clock.advance(RETRY_FIRST)
        entries = db.calls[-1][0]
        assert len(entries) == MAX_BATCH and entries[:2] == [("node", "alive"), ("row", "a")]
        db.ok()
        clock.advance(0)
        db.ok()
        clock.advance(0)
        db.ok()
        assert not len(box) and len(db.committed) == 2 * MAX_BATCH + 2
        assert len(set(db.committed)) == len(db.committed)  # each once

    def test_an_answer_waits_for_state_not_for_a_backlog_of_log_lines(self):
        box, db, clock, _ = outbox(limits={"log": 10 * MAX_BATCH})
        for n in range(2 * MAX_BATCH):
            box.put(("log", n), ("log", n))
        box.put(("row", "a"), ("row", "a"))
        durable = box.durable()
        clock.advance(0)
        db.ok()  # the first batch: the row, then log lines
        assert self.successResultOf(durable) is True and len(box) > 0

    def test_a_stop_answers_every_waiter(self):
        box, _db, clock, _ = outbox()
        box.put(("row", "a"), ("row", "a"))
        clock.advance(0)
        durable = box.durable()
        box.stop()
        assert self.successResultOf(durable) is False

    def test_stopped_it_writes_nothing_more(self):
        box, db, clock, _ = outbox()
        box.put(("row", "a"), ("row", "a"))
        clock.advance(0)
        db.down()
        box.stop()
        clock.advance(60)
        assert len(db.calls) == 1 and ("row", "a") in box
