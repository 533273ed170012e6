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
traffic samples), only the newest ``limits[kind]`` wait.  A batch holds at most MAX_BATCH
entries, the first kinds first (the heartbeat before a backlog of samples), so what waited
through a long outage goes out in pieces, each quick.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.backoff import backoff

Entry = tuple[Any, ...]  # (kind, ...): what pgstore.write_one writes
# (entries, careful) -> Deferred[list of (entry, why) refused]
Writer = Callable[[list[Entry], bool], "Deferred[list[tuple[Entry, str]]]"]
RETRY_FIRST = 0.5  # seconds; doubling to 12 times this while the database stays away
MAX_BATCH = 2000  # entries in one transaction


class Outbox:
    log = logs.logger("nodepass.master")

    def __init__(self, order: tuple[str, ...], limits: Mapping[str, int],
                 is_down: Callable[[Failure], bool]) -> None:
        self.order = order  # kinds in the order a batch writes them
        self.limits = dict(limits)
        self.is_down = is_down  # a failure that means "the database is away"
        # per kind, in the order of the entries' last put: (seq, entry) by key
        self.kinds: dict[str, OrderedDict[Any, tuple[int, Entry]]] = {
            kind: OrderedDict() for kind in order}
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
        self._release(False)

    # -- what goes in ---------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.kinds.values())

    def __contains__(self, key: Any) -> bool:
        return key in self.kinds[key[0]]

    def __iter__(self) -> Iterator[Any]:
        for entries in self.kinds.values():
            yield from entries

    def put(self, key: Any, entry: Entry) -> None:
        """``key[0]`` is the entry's kind."""
        self.seq += 1
        entries = self.kinds[key[0]]
        entries.pop(key, None)
        entries[key] = (self.seq, entry)
        limit = self.limits.get(key[0])
        while limit is not None and len(entries) > limit:
            entries.popitem(last=False)
            self.dropped += 1
        self._kick()

    def drop(self, key: Any) -> None:
        self.kinds[key[0]].pop(key, None)

    def get(self, key: Any) -> Entry | None:
        found = self.kinds[key[0]].get(key)
        return None if found is None else found[1]

    def _oldest(self) -> int:
        """The oldest entry durable() waits for: not log lines and samples (kinds with a
        limit), which may be left out and need not hold up an answer."""
        firsts = (next(iter(entries.values()))[0] for kind, entries in self.kinds.items()
                  if entries and kind not in self.limits)
        return min(firsts, default=self.seq + 1)

    def durable(self) -> Deferred[bool]:
        """Fires True once everything put so far is written, or False at once while the
        database is away (it is written when the database is back)."""
        if self._oldest() > self.seq:
            return succeed(True)
        if self.degraded or self.write is None:
            return succeed(False)
        waiter: Deferred[bool] = Deferred()
        self._waiters.append((self.seq, waiter))
        return waiter

    # -- what goes out ----------------------------------------------------------

    def _kick(self) -> None:
        if (self.write is None or self._in_flight or self._retry is not None
                or not len(self)):
            return
        self._in_flight = True
        # the rest of this reactor turn's entries join the batch
        self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self.write is None:
            self._in_flight = False
            return
        batch: list[tuple[Any, tuple[int, Entry]]] = []
        for kind in self.order:
            for item in self.kinds[kind].items():
                if len(batch) == MAX_BATCH:
                    break
                batch.append(item)
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
            entries = self.kinds[key[0]]
            found = entries.get(key)
            if found is not None and found[0] == seq:
                del entries[key]
        if self.dropped:
            self.log.warn("{n} log lines and traffic samples were left out while the fleet "
                          "database was away", n=self.dropped)
            self.dropped = 0
        self._set_status(None)
        oldest = self._oldest()
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
        if self.reactor is not None and self.write is not None:
            # set before anyone hears of the failure: what they put meanwhile waits for it
            self._retry = self.reactor.callLater(self._delay(self._attempts), self._again)
        if self.is_down(failure):
            self._set_status(_one_line(failure.value))
            self._release(False)
        else:
            self.log.failure("writing to the fleet database failed; writing each entry on "
                             "its own", failure)
            self._careful = True

    def _release(self, written: bool) -> None:
        waiting, self._waiters = self._waiters, []
        for _, waiter in waiting:
            if not waiter.called:
                waiter.callback(written)

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
