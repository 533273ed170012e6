"""What a fleet master has to write, on its way to the database.

Entries are keyed: a newer entry for the same key replaces the older one (an
instance's row, its counters, what it looks like -- the latest wins) and goes to the
end of the line.  The whole outbox is written as one batch, in one transaction, while
the previous batch is not in flight; what changed meanwhile waits for the next.  Every
entry is idempotent (an upsert, an update or a delete by key), so a batch whose fate
is unknown is simply written again.

A batch that fails because the database is away stays, and is tried again with
backoff; the outbox is then ``degraded`` and says why.  A batch that fails for what it
says (a bug, a value PostgreSQL refuses) is written again entry by entry, and only the
entries refused again are left out (and logged) -- one bad entry never blocks the rest.

Bounded: one entry per key, and of the kinds that have a key per occurrence (log lines,
traffic samples), only the newest ``limits[kind]`` wait.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.backoff import backoff

Entry = tuple[Any, ...]  # (kind, ...): what pgstore.write_one writes
# (entries, careful) -> Deferred[list of (entry, why) refused]
Writer = Callable[[list[Entry], bool], "Deferred[list[tuple[Entry, str]]]"]
RETRY_FIRST = 0.5  # seconds; doubling to 12 times this while the database stays away


class Outbox:
    log = logs.logger("nodepass.master")

    def __init__(self, order: tuple[str, ...], limits: Mapping[str, int],
                 is_down: Callable[[Failure], bool]) -> None:
        self.order = order  # kinds in the order a batch writes them
        self.limits = dict(limits)
        self.is_down = is_down  # a failure that means "the database is away"
        self.pending: OrderedDict[Any, tuple[int, Entry]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.seq = 0
        self.degraded: str | None = None
        self.on_status: list[Callable[[str | None], None]] = []
        self.dropped = 0
        self.reactor: Any = None
        self.write: Writer | None = None
        self._in_flight = False
        self._careful = False
        self._retry: Any = None
        self._attempts = 0
        self._delay = backoff(RETRY_FIRST)
        self._waiters: list[tuple[int, Deferred[bool]]] = []

    def start(self, reactor: Any, write: Writer) -> None:
        self.reactor = reactor
        self.write = write
        self._kick()

    def stop(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.write = None

    # -- what goes in ---------------------------------------------------------

    def put(self, key: Any, entry: Entry) -> None:
        self.seq += 1
        if self.pending.pop(key, None) is None:
            self.counts[key[0]] += 1
        self.pending[key] = (self.seq, entry)
        limit = self.limits.get(key[0])
        if limit is not None and self.counts[key[0]] > limit:
            self._drop_oldest(key[0], self.counts[key[0]] - limit)
        self._kick()

    def drop(self, key: Any) -> None:
        if self.pending.pop(key, None) is not None:
            self.counts[key[0]] -= 1

    def get(self, key: Any) -> Entry | None:
        found = self.pending.get(key)
        return None if found is None else found[1]

    def _drop_oldest(self, kind: str, count: int) -> None:
        for key in [k for k in self.pending if k[0] == kind][:count]:
            self.drop(key)
            self.dropped += 1

    def durable(self) -> Deferred[bool]:
        """Fires True once everything put so far is written, or False at once while the
        database is away (it is written when the database is back)."""
        if not self.pending:
            return succeed(True)
        if self.degraded or self.write is None:
            return succeed(False)
        waiter: Deferred[bool] = Deferred()
        self._waiters.append((self.seq, waiter))
        return waiter

    # -- what goes out ----------------------------------------------------------

    def _kick(self) -> None:
        if (self.write is None or self._in_flight or self._retry is not None
                or not self.pending):
            return
        self._in_flight = True
        # the rest of this reactor turn's entries join the batch
        self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self.write is None:
            self._in_flight = False
            return
        rank = {kind: i for i, kind in enumerate(self.order)}
        batch = sorted(self.pending.items(), key=lambda item: (rank[item[0][0]], item[1][0]))
        d = self.write([entry for _, (_, entry) in batch], self._careful)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,))

    def _written(self, refused: list[tuple[Entry, str]],
                 batch: list[tuple[Any, tuple[int, Entry]]]) -> None:
        self._in_flight = False
        self._careful = False
        self._attempts = 0
        for entry, why in refused:
            self.log.error("the fleet database refused a write of {kind}, left out: {why}",
                           kind=entry[0], why=why)
        for key, (seq, _) in batch:
            found = self.pending.get(key)
            if found is not None and found[0] == seq:
                self.drop(key)
        if self.dropped:
            self.log.warn("{n} log lines and traffic samples were left out while the fleet "
                          "database was away", n=self.dropped)
            self.dropped = 0
        self._set_status(None)
        oldest = min((seq for seq, _ in self.pending.values()), default=self.seq + 1)
        waiting, self._waiters = self._waiters, []
        for seq, waiter in waiting:
            if waiter.called:  # given up on
                continue
            if seq < oldest:
                waiter.callback(True)
            else:
                self._waiters.append((seq, waiter))
        self._kick()

    def _failed(self, failure: Failure) -> None:
        self._in_flight = False
        self._attempts += 1
        if self.is_down(failure):
            self._set_status(_one_line(failure.value))
            waiting, self._waiters = self._waiters, []
            for _, waiter in waiting:
                if not waiter.called:
                    waiter.callback(False)
        else:
            self.log.failure("writing to the fleet database failed; writing each entry on "
                             "its own", failure)
            self._careful = True
        if self.reactor is not None and self.write is not None:
            self._retry = self.reactor.callLater(self._delay(self._attempts), self._again)

    def _again(self) -> None:
        self._retry = None
        self._kick()

    def _set_status(self, why: str | None) -> None:
        was, self.degraded = self.degraded, why
        if (was is None) != (why is None):
            for observer in list(self.on_status):
                observer(why)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
