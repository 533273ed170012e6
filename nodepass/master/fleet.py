"""Many masters, one state: the fleet on PostgreSQL (docs/fleet.md).

Each master is a node.  It says it is alive every FLEET_HEARTBEAT (a row in
``nodes``); one silent for three heartbeats is offline, and its instances are shown
as last told, marked ``stale``.  What its own instances look like goes to the
database (``instances.live``) with a notification in the same transaction, so every
other master keeps a mirror of them (``Registry.remote``), tells its subscribers, and
reads the tables again whenever it may have missed a notification (at start and after
its listening connection came back).

Notifications carry no instance URL (whoever may connect to the database may LISTEN,
and a URL holds its tunnel's key): only a mark of it, an HMAC under the fleet's own
secret, by which a master knows its copy of the URL is current, or reads the row.

A change asked of another node's instance travels as a command: a row in
``commands`` (the source of truth) and a notification.  The owning master claims it
(once: ``state`` goes from queued to running in one UPDATE), carries it out through
its registry as if its own API had been asked, and writes the outcome, which wakes
the asking master (a notification, or its poll every second if that was missed).  A
master starting, or hearing the database again, carries out what was queued for it;
one that died carrying a command out marks it ``interrupted`` rather than run it twice.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import LoopingCall

from nodepass import logs
from nodepass.master import pg
from nodepass.master.history import HISTORY_SAMPLES
from nodepass.master.instances import Instance, InstanceError, from_snapshot, snapshot
from nodepass.master.pglisten import Listener
from nodepass.master.pgstore import CHANNEL, NOTICE_LIMIT, PgStore, mark, signed, verified

if TYPE_CHECKING:
    from nodepass.master.registry import Registry

MISSED_BEATS = 3
LOG_TEXT = 2000  # characters of a log line carried to other masters, at most
POLL = 1.0  # seconds between looks at a command's row while waiting for its outcome
DONE = ("done", "failed", "interrupted", "cancelled", "expired")
GONE_KEPT = 100_000  # deleted instances remembered (ids are never reused)
ODD_SAID_EVERY = 60.0  # seconds between warnings about notifications no master sent
PRUNE_EVERY = 60.0  # seconds between prunings of old traffic samples and commands
AT_ONCE = 8  # commands for this node carried out at the same time, at most
COMMAND_TTL = 86400  # seconds a command waits for its node, and is kept once done


@dataclass
class Node:
    id: str
    alias: str = ""
    version: str = ""
    heartbeat: float = 5.0
    age: float = 0.0  # seconds since its last heartbeat, as the database's clock saw it
    online: bool = True

    def label(self) -> str:
        return f"{self.id} ({self.alias})" if self.alias else self.id

    def describe(self, me: str) -> dict[str, Any]:
        return {"id": self.id, "alias": self.alias, "version": self.version,
                "online": self.online, "self": self.id == me,
                "last_heartbeat": round(self.age, 1), "heartbeat": self.heartbeat}


class Fleet:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, registry: Registry, store: PgStore) -> None:
        self.reactor = reactor
        self.registry = registry
        self.store = store
        self.node = store.node
        tunables = registry.tunables
        self.heartbeat = tunables.fleet_heartbeat
        self.command_wait = tunables.fleet_command_wait
        self.retention = HISTORY_SAMPLES * tunables.report_interval  # traffic kept, s
        self.nodes: dict[str, Node] = {}
        # what each snapshot of ours is numbered by: this run's number (the database's,
        # larger than any earlier run's) and a count
        self.order = [store.run, 0]
        self.seen: dict[str, list[float]] = {}  # the newest number applied, per instance
        self.fresh: dict[str, int] = {}  # the generation it was last applied in
        self.urls: dict[str, tuple[str, str]] = {}  # (mark, URL) of what is shown
        self.generation = 0
        self.gone: OrderedDict[str, None] = OrderedDict()  # deleted: never shown again
        self.reading: set[str] = set()  # rows being read for a URL not told
        self.read_again: set[str] = set()  # asked for while being read
        self.in_progress: set[str] = set()  # commands this run is carrying out
        self._full = False  # the last claim took all it could: more may wait
        self._polling = LoopingCall(self._poll)
        self._polling.clock = reactor
        self._looking = False
        self.waiting: dict[str, Deferred[dict[str, Any]]] = {}
        self.claim = secrets.token_hex(8)  # this run's, on the commands it claims
        self.listener: Listener | None = None
        self.deaf: str | None = "not listening yet"
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self._stopped = False
        self._working = False
        self._more_work = False
        self._first_read = True  # this run's first look marks what an earlier run left
        self._reread = False  # a look failed: try again at the next heartbeat
        self._odd = 0  # notifications ignored since the last warning
        self._odd_said_at = float("-inf")
        self._pruned_at = float("-inf")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.store.start(self.reactor)
        assert self.store.db is not None
        self.listener = Listener(self.reactor, self.store.db, CHANNEL, self._heard,
                                 self._listening, self._deaf)
        self.listener.start()
        self._beat.start(self.heartbeat, now=True)

    def stop(self) -> None:
        """No more commands taken, no more notifications heard (the store still writes)."""
        self._stopped = True
        for loop in (self._beat, self._polling):
            if loop.running:
                loop.stop()
        if self.listener is not None:
            self.listener.stop()
        for waiter in list(self.waiting.values()):
            waiter.cancel()

    @property
    def problem(self) -> str | None:
        """Why the fleet's database cannot be used now (None: it can)."""
        return self.store.degraded or self.deaf

    @property
    def status(self) -> str:
        return "degraded" if self.problem else "ok"

    def describe(self) -> dict[str, Any]:
        """What /info says of the fleet."""
        return {"store": "postgresql", "database": self.store.where, "node": self.node,
                "status": self.status, "error": self.problem,
                "pending_writes": len(self.store.outbox),
                "nodes": [n.describe(self.node) for n in self.sorted_nodes()]}

    def sorted_nodes(self) -> list[Node]:
        return sorted(self.nodes.values(), key=lambda n: (n.id != self.node, n.id))

    # -- what this node tells the others ------------------------------------------

    def local_changed(self, kind: str, instance: Instance) -> None:
        if kind == "delete":
            self.store.delete(instance.id)  # its row goes, and the others are told
            return
        pending = self.store.outbox.get(("live", instance.id))
        if pending is not None and pending[2] == "create":
            kind = "create"  # not told yet: the others hear of it as new
        told = self._numbered(instance)
        self.store.outbox.put(("live", instance.id), (
            "live", instance.id, kind, json.dumps(told),
            self._notice({"k": kind, "n": self.node, "i": instance.id, "s": self.public(told)},
                         {"k": kind, "n": self.node, "i": instance.id})))

    def _numbered(self, instance: Instance) -> dict[str, Any]:
        """Its snapshot, numbered so that a master never takes an older one for newer."""
        self.order[1] += 1
        told = snapshot(instance)
        told["q"] = list(self.order)
        return told

    def public(self, told: dict[str, Any]) -> dict[str, Any]:
        """A snapshot as a notification may carry it: the URL replaced by its mark."""
        shown = {k: v for k, v in told.items() if k != "url"}
        shown["uh"] = self.url_mark(told["url"])
        return shown

    def url_mark(self, url: str) -> str:
        return mark(self.store.secret, url)

    def _notice(self, full: dict[str, Any], short: dict[str, Any]) -> str:
        """``full`` as a signed notification, or ``short`` when it would not fit (the
        others read the row)."""
        text = json.dumps(full)
        return self.store.sign(text if len(text.encode()) <= NOTICE_LIMIT
                               else json.dumps(short))

    def local_log(self, instance: Instance, level: str, text: str, line: str) -> None:
        limit = LOG_TEXT
        while True:  # characters are not bytes: JSON may spell one in twelve
            notice = json.dumps({"k": "log", "n": self.node, "i": instance.id, "l": level,
                                 "m": text[:limit], "line": line[:limit]})
            if len(notice.encode()) <= NOTICE_LIMIT or limit < 100:
                break
            limit //= 2
        if len(notice.encode()) <= NOTICE_LIMIT:
            self.store.outbox.put(("log", self.store.outbox.seq + 1),
                                  ("log", self.store.sign(notice)))

    def local_sample(self, instance: Instance, sample: dict[str, Any]) -> None:
        at = sample["timestamp"]
        self.store.outbox.put(("traffic", instance.id, at),
                              ("traffic", instance.id, at, json.dumps(sample)))

    # -- what the others tell ------------------------------------------------------

    def _heard(self, payload: str) -> None:
        """A notification on the fleet's channel.  Anyone who may connect to the database
        may send one: what is not a master's is ignored (and said once a minute)."""
        try:
            text = verified(self.store.secret, payload)
            if text is None:
                raise ValueError("not signed with the fleet's secret")
            self._dispatch(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._odd += 1
            now = self.reactor.seconds()
            if now - self._odd_said_at >= ODD_SAID_EVERY:
                self.log.warn("ignored {n} notifications on the fleet's channel that are not "
                              "a master's (the last: {why})", n=self._odd, why=str(e)[:200])
                self._odd, self._odd_said_at = 0, now

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise TypeError("not a JSON object")
        kind = message["k"]
        if kind == "command":
            if message.get("node") == self.node:
                self._carry_out()
            return
        if kind == "result":
            self._result_heard(_text(message["c"]), message.get("r"))
            return
        node, instance_id = _text(message["n"]), _text(message["i"])
        if node == self.node:
            return  # our own, told to our subscribers already
        self._alive(node)
        if kind in ("create", "update"):
            if "s" in message:
                self._apply(node, message["s"])
            else:  # too big for a notification
                self._read_row(instance_id)
        elif kind == "delete":
            self._forget(instance_id)
        elif kind == "log":
            instance = self.registry.remote.get(instance_id)
            if instance is not None:
                self.registry.remote_logged(instance, _text(message["l"]),
                                            _text(message["m"]), _text(message.get("line", "")))
        else:
            raise ValueError(f"unknown kind {str(kind)[:40]!r}")

    def _apply(self, node: str, told: Any) -> Instance | None:
        """Another node's instance as it told it: shown when newer than what was (None
        when it is not, cannot be read, or its URL must be read from its row first)."""
        if node == self.node:
            return None
        if not isinstance(told, dict):
            raise TypeError("a snapshot that is not an object")
        instance_id = _text(told["id"])
        order = told.get("q")
        if not (isinstance(order, list) and len(order) == 2
                and all(isinstance(x, int | float) for x in order)):
            raise TypeError("a snapshot without its number")
        if instance_id in self.gone:
            return None
        known = self.registry.remote.get(instance_id)
        if order <= self.seen.get(instance_id, [-1, -1]):
            return known
        if "url" not in told:
            mark, url = self.urls.get(instance_id, ("", ""))
            if not mark or mark != told.get("uh"):
                self._read_row(instance_id)  # a URL this master has not seen: read it
                return None
            told = {**told, "url": url}
        try:
            instance = from_snapshot(told, node, known)
        except (ValueError, KeyError, TypeError) as e:
            self.log.warn("instance {id} of node {node} cannot be shown here: {why}",
                          id=instance_id, node=node, why=str(e)[:200])
            return None
        self.seen[instance_id] = order
        if self.urls.get(instance_id, ("", ""))[1] != told["url"]:
            self.urls[instance_id] = (self.url_mark(told["url"]), told["url"])
        self.generation += 1
        self.fresh[instance_id] = self.generation
        instance.stale = not self._online(node)
        self.registry.remote_changed(instance, known is None)
        return instance

    def _read_row(self, instance_id: str) -> None:
        """Read what an instance's row says: one read at a time per instance, and one more
        when asked again meanwhile (the row may have changed since the read began)."""
        if self.store.db is None:
            return
        if instance_id in self.reading:
            self.read_again.add(instance_id)
            return
        self.reading.add(instance_id)

        def read(found: tuple[str, dict[str, Any]] | None) -> None:
            if found:
                self._apply(*found)

        def failed(failure: Any) -> None:
            self._reread = True  # the whole fleet is looked at again at the next heartbeat
            if not failure.check(pg.DatabaseDownError, TypeError, KeyError, ValueError):
                self.log.failure("reading instance {id}", failure, id=instance_id)

        def done(_: Any) -> None:
            self.reading.discard(instance_id)
            if instance_id in self.read_again:
                self.read_again.discard(instance_id)
                self._read_row(instance_id)

        d = self.store.db.run(read_live, instance_id)
        d.addCallback(read).addErrback(failed).addBoth(done)

    def _forget(self, instance_id: str) -> None:
        self.seen.pop(instance_id, None)
        self.fresh.pop(instance_id, None)
        self.urls.pop(instance_id, None)
        self.gone[instance_id] = None
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)
        self.registry.remote_gone(instance_id)

    def _listening(self) -> None:
        """The notification connection is (again) up: read what may have been missed."""
        self.deaf = None
        self._read_fleet()

    def _read_fleet(self) -> None:
        self._reread = False
        d = self.store.db.run(read_fleet, self.node, self.store.secret, self.claim,
                              self._first_read, sorted(self.in_progress))
        d.addCallback(self._resynced, self.generation)
        d.addErrback(self._not_read)

    def _deaf(self, why: str) -> None:
        if self.deaf is None:
            self.log.warn("fleet notifications lost ({why}); listening again with backoff",
                          why=why)
        self.deaf = why

    def _resynced(self, found: tuple[list[tuple[str, str, Any]], list[tuple[Any, ...]]],
                  generation: int) -> None:
        """The fleet as the tables say: shown; what is no longer there forgotten, unless
        it was told after the tables were read."""
        self._first_read = False
        instances, nodes = found
        self._nodes_read(nodes)
        there = set()
        for instance_id, node, told in instances:
            there.add(instance_id)
            if told is None:
                continue
            try:
                self._apply(node, told)
            except (ValueError, KeyError, TypeError) as e:
                self.log.warn("instance {id} of node {node} cannot be shown here: {why}",
                              id=instance_id, node=node, why=str(e)[:200])
        for instance_id in [i for i in self.registry.remote if i not in there
                            and self.fresh.get(i, 0) <= generation]:
            self._forget(instance_id)
        self._carry_out()

    def _not_read(self, failure: Any) -> None:
        if not failure.check(pg.DatabaseDownError):
            self.log.failure("reading the fleet", failure)
        else:
            self.log.warn("the fleet could not be read ({why}); trying again at the next "
                          "heartbeat", why=pg.one_line(failure.value))
        self._reread = True

    # -- nodes ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        try:
            self._beat_once()
        except Exception:  # the heartbeat must go on: a node that stops it looks dead
            self.log.failure("fleet heartbeat")

    def _beat_once(self) -> None:
        self.store.heartbeat(self.heartbeat)
        if self.problem:
            return  # the outbox's retries and the listener's bring the rest back
        self.store.db.run(read_nodes).addCallbacks(self._nodes_read, lambda _: None)
        if self._reread:
            self._read_fleet()
        self._carry_out()  # the commands table is the truth, notifications a shortcut
        now = self.reactor.seconds()
        if now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            self.store.db.run(prune, self.node, self.retention).addErrback(lambda _: None)

    def _nodes_read(self, rows: list[tuple[Any, ...]]) -> None:
        for node_id, alias, version, heartbeat, age in rows:
            node = self.nodes.get(node_id)
            if node is None:
                node = self.nodes[node_id] = Node(node_id)
            node.alias, node.version, node.heartbeat, node.age = alias, version, heartbeat, age
            online = node_id == self.node or age <= MISSED_BEATS * heartbeat
            if online != node.online:
                node.online = online
                self._node_turned(node)

    def _node_turned(self, node: Node) -> None:
        if node.online:
            self.log.info("node {node} is back", node=node.label())
        else:
            self.log.warn("node {node} is offline: no heartbeat for {age:.0f} s; its "
                          "instances are shown as it last told them (stale)",
                          node=node.label(), age=node.age)
        for instance in list(self.registry.remote.values()):
            if instance.node == node.id and instance.stale == node.online:
                instance.stale = not node.online
                self.registry.remote_changed(instance, False)

    def _alive(self, node_id: str) -> None:
        """A node that signs a notification is alive, whatever its last heartbeat said:
        its instances are fresh again now, not at this master's next look."""
        node = self.nodes.get(node_id)
        if node is not None and not node.online:
            node.online, node.age = True, 0.0
            self._node_turned(node)

    def _online(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node.online if node is not None else True

    def node_named(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none yet"
            raise InstanceError("NODE_NOT_FOUND", 404, f"no node {node_id!r} in the fleet "
                                                      f"(nodes: {known})") from None

    # -- commands: asking ------------------------------------------------------------

    async def command(self, node_id: str, op: str, args: dict[str, Any]) -> Instance | None:
        """Have ``node_id`` carry out ``op``: -> the instance as it is after it (None for
        a delete), or the InstanceError it answered, or a 503/504 naming what failed --
        within about FLEET_COMMAND_WAIT."""
        node = self.node_named(node_id)
        if self.problem:
            raise InstanceError("FLEET_UNAVAILABLE", 503,
                                f"the fleet database is unreachable ({self.problem}): "
                                f"node {node.label()} cannot be asked until it is back")
        command_id = secrets.token_hex(16)
        waiter: Deferred[dict[str, Any]] = Deferred()
        self.waiting[command_id] = waiter
        try:
            try:
                await self._within(self.store.db.run(
                    insert_command, command_id, node_id, op, json.dumps(args), self.node,
                    self.store.sign(json.dumps({"k": "command", "node": node_id})),
                    self.reactor.seconds() + self.command_wait, self.reactor.seconds))
            except (pg.DatabaseDownError, TimeoutError, CancelledError) as e:
                raise InstanceError("FLEET_UNAVAILABLE", 503,
                                    f"the fleet database did not take the command in time "
                                    f"({pg.one_line(e) or 'no answer'}): node {node.label()} "
                                    "was most likely not asked; look before asking again")\
                    from None
            if not node.online:
                raise InstanceError("NODE_OFFLINE", 504,
                                    f"node {node.label()} is offline (no heartbeat for "
                                    f"{node.age:.0f} s): the command is queued and is carried "
                                    "out when the node is back")
            if not self._polling.running:
                self._polling.start(POLL, now=False)
            try:
                result = await self._within(waiter)
            except (CancelledError, TimeoutError):
                result = await self._withdraw(command_id, node)
        finally:
            self.waiting.pop(command_id, None)
            if not self.waiting and self._polling.running:
                self._polling.stop()
        return await self._outcome(node_id, op, args, result)

    def _within(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(self.command_wait, self.reactor)

    async def _withdraw(self, command_id: str, node: Node) -> dict[str, Any]:
        """No outcome in time: withdraw the command if the node has not taken it; -> the
        outcome if it came meanwhile, or the 504 that says which."""
        late = f"node {node.label()} did not answer within {self.command_wait:g} s: "
        try:
            if await self._within(self.store.db.run(cancel_command, command_id)):
                raise InstanceError("NODE_TIMEOUT", 504,
                                    late + "the command was withdrawn, nothing was done")
            found = await self._within(self.store.db.run(read_commands, [command_id]))
        except (pg.DatabaseDownError, TimeoutError, CancelledError):
            raise InstanceError("NODE_TIMEOUT", 504, late + "the command could not be "
                                "withdrawn (the database did not answer); it may still be "
                                "carried out") from None
        for _, state, result in found:
            if state in DONE and isinstance(result, dict):
                return result
        raise InstanceError("NODE_TIMEOUT", 504, late + "it is carrying the command out; "
                                                       "its outcome will show in the events")

    async def _outcome(self, node_id: str, op: str, args: dict[str, Any],
                       result: dict[str, Any]) -> Instance | None:
        if not result.get("ok"):
            raise InstanceError(str(result.get("code") or "INTERNAL"),
                                int(result.get("status") or 500),
                                str(result.get("message") or "the node failed"))
        if op == "delete":
            self._forget(args["id"])
            return None
        told = result.get("snapshot")
        instance_id = told.get("id") if isinstance(told, dict) else None
        try:
            instance = self._apply(node_id, told)
            if instance is None and instance_id and instance_id not in self.gone:
                found = await self.store.db.run(read_live, instance_id)  # its URL, new here
                instance = self._apply(*found) if found else None
        except (ValueError, KeyError, TypeError, pg.DatabaseDownError):
            instance = None
        if instance is None and instance_id in self.gone:
            raise InstanceError("INSTANCE_NOT_FOUND", 404,
                                f"instance {instance_id} was deleted meanwhile")
        if instance is None:
            raise InstanceError("INTERNAL", 500, f"node {node_id} answered with an instance "
                                                 "this master cannot read")
        return instance

    def _result_heard(self, command_id: str, result: Any) -> None:
        waiter = self.waiting.get(command_id)
        if waiter is None or waiter.called:
            return
        if isinstance(result, dict):
            waiter.callback(result)
        else:
            self._poll()

    def _poll(self) -> None:
        """Look at the rows of the commands waited for (one look at a time): the
        notification of an outcome may have been missed."""
        if self._looking or not self.waiting or self.store.db is None:
            return
        self._looking = True

        def read(found: list[tuple[str, str, Any]]) -> None:
            for command_id, state, result in found:
                waiter = self.waiting.get(command_id)
                if waiter is None or waiter.called or state not in DONE:
                    continue
                waiter.callback(result if isinstance(result, dict) else {
                    "ok": False, "code": "NODE_TIMEOUT", "status": 504,
                    "message": f"the command was {state}"})

        def done(_: Any) -> None:
            self._looking = False

        d = self.store.db.run(read_commands, sorted(self.waiting))
        d.addCallback(read).addErrback(lambda _: None).addBoth(done)

    # -- commands: carrying out ------------------------------------------------------

    def _carry_out(self) -> None:
        """Take what is queued for this node, oldest first, and carry it out: up to
        AT_ONCE commands at a time (each instance's own lock keeps one instance's in
        order).  Not while the database is away: an outcome could not be told."""
        if self._stopped or self.problem:
            return
        if self._working:
            self._more_work = True
            return
        self._working = True
        Deferred.fromCoroutine(self._take()).addErrback(
            lambda f: self.log.failure("carrying out fleet commands", f))

    async def _take(self) -> None:
        try:
            while not self._stopped:
                self._more_work = False
                free = AT_ONCE - len(self.in_progress)
                if free <= 0:
                    return  # the first to finish looks again
                try:
                    claimed = await self.store.db.run(claim_next, self.node, self.claim, free)
                except pg.DatabaseDownError:
                    # the next heartbeat looks again, at the whole fleet: a claim whose
                    # commit was lost with the connection is queued again there
                    self._reread = True
                    return
                self._full = len(claimed) == free
                for command_id, op, args, asker in claimed:  # started in their order
                    self.in_progress.add(command_id)
                    Deferred.fromCoroutine(self._carry(command_id, op, args, asker)).addErrback(
                        lambda f: self.log.failure("carrying out a fleet command", f))
                if not self._full and not self._more_work:
                    return
        finally:
            self._working = False

    async def _carry(self, command_id: str, op: str, args: Any, asker: str) -> None:
        try:
            result = await self._execute(op, args)
            self.log.info("fleet command {op} from node {asker}: {outcome}", op=op,
                          asker=asker, outcome="done" if result["ok"] else
                          result.get("message"))
            self._told_outcome(command_id, result)
        finally:
            self.in_progress.discard(command_id)
            if self._full:  # more may wait than were taken
                self._carry_out()

    def _told_outcome(self, command_id: str, result: dict[str, Any]) -> None:
        """The outcome goes to the command's row, and to its asker by a notification --
        which carries a success's snapshot (without its URL) but never a refusal's
        words, which may quote the URL: those are read from the row."""
        told = result.get("snapshot")
        notice = ({"k": "result", "c": command_id, "r": {**result,
                                                          "snapshot": self.public(told)}}
                  if told else {"k": "result", "c": command_id})
        self.store.outbox.put(("result", command_id), (
            "result", command_id, "done" if result["ok"] else "failed", json.dumps(result),
            self._notice(notice, {"k": "result", "c": command_id})))

    async def _execute(self, op: str, args: Any) -> dict[str, Any]:
        registry = self.registry
        try:
            if not isinstance(args, dict):
                raise InstanceError("INVALID_REQUEST", 400, "a fleet command without its "
                                                            "arguments")
            if op == "create":
                instance = await registry.create(
                    args["url"], args.get("alias"), args.get("tags"),
                    bool(args.get("restart")), args.get("peer"))
            elif op == "control":
                instance = await registry.control(
                    registry.get_local(args["id"]), url=args.get("url"),
                    action=args.get("action"), **args.get("meta", {}))
            elif op == "delete":
                await registry.delete(registry.get_local(args["id"]))
                return {"ok": True}
            else:
                raise InstanceError("INVALID_REQUEST", 400, f"unknown fleet command {op!r}")
        except InstanceError as e:
            return {"ok": False, "code": e.code, "status": e.status, "message": e.message}
        except Exception:
            self.log.failure("fleet command {op} failed", op=op)
            return {"ok": False, "code": "INTERNAL", "status": 500,
                    "message": f"internal error on node {self.node}; see its log"}
        return {"ok": True, "snapshot": self._numbered(instance)}

    # -- traffic -------------------------------------------------------------------

    async def traffic(self, instance: Instance, window: float) -> list[dict[str, Any]]:
        since = self.reactor.seconds() - min(window, self.retention)
        return await self.store.db.run(read_traffic, instance.id, since)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a field that is not a string")
    return value


# -- statements, run in the database's worker thread --------------------------------

def read_live(conn: Any, instance_id: str) -> tuple[str, dict[str, Any]] | None:
    found = pg.rows(conn, "SELECT node, live FROM instances WHERE id = %s AND live IS NOT "
                          "NULL", (instance_id,))
    return (found[0][0], found[0][1]) if found else None


def read_nodes(conn: Any) -> list[tuple[Any, ...]]:
    return pg.rows(conn, "SELECT id, alias, version, heartbeat, "
                         "EXTRACT(EPOCH FROM now() - heartbeat_at)::float FROM nodes")


def read_fleet(conn: Any, me: str, secret: bytes, claim: str, first: bool,
               in_progress: list[str]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every other node's instances and every node.  Commands of this node's left
    ``running``: by an earlier run (on this run's first look) they are marked interrupted
    (carried out at most once); by this run but not in progress here (its claim committed
    though it never heard so) they are queued again."""
    if first:
        interrupted = pg.rows(
            conn, "UPDATE commands SET state = 'interrupted', done_at = now(), result = %s "
                  "WHERE node = %s AND state = 'running' AND claim IS DISTINCT FROM %s "
                  "RETURNING id",
            (json.dumps({"ok": False, "code": "INTERRUPTED", "status": 504,
                         "message": f"node {me} restarted while carrying the command out; "
                                    "it is not run again"}), me, claim))
        for (command_id,) in interrupted:
            pg.rows(conn, "SELECT pg_notify(%s, %s)",
                    (CHANNEL, signed(secret, json.dumps({"k": "result", "c": command_id}))))
    pg.rows(conn, "UPDATE commands SET state = 'queued', claim = NULL WHERE node = %s AND "
                  "state = 'running' AND claim = %s AND NOT (id = ANY(%s))",
            (me, claim, in_progress))
    instances = pg.rows(conn, "SELECT id, node, live FROM instances WHERE node <> %s", (me,))
    return instances, read_nodes(conn)


def insert_command(conn: Any, command_id: str, node: str, op: str, args: str, asker: str,
                   notice: str, deadline: float, clock: Any) -> None:
    """Queue a command -- unless its asker has given up waiting by the time this runs
    (the database's thread had others before it)."""
    if clock() > deadline:
        raise pg.DatabaseDownError("the database did not take it in time")
    pg.rows(conn, "INSERT INTO commands (id, node, op, args, requested_by) VALUES "
                  "(%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (command_id, node, op, args, asker))
    pg.rows(conn, "SELECT pg_notify(%s, %s)", (CHANNEL, notice))


def claim_next(conn: Any, node: str, claim: str, count: int) -> list[tuple[str, str, Any, str]]:
    """The oldest ``count`` commands queued for ``node``, now claimed, oldest first; those
    queued for longer than COMMAND_TTL are expired first (a node back after days does not
    replay them)."""
    pg.rows(conn, "UPDATE commands SET state = 'expired', done_at = now() WHERE node = %s "
                  "AND state = 'queued' AND requested_at < now() - %s * interval '1 second'",
            (node, COMMAND_TTL))
    found = pg.rows(
        conn, "UPDATE commands SET state = 'running', claim = %s WHERE id IN (SELECT id FROM "
              "commands WHERE node = %s AND state = 'queued' ORDER BY seq LIMIT %s FOR UPDATE "
              "SKIP LOCKED) RETURNING id, op, args, requested_by, seq", (claim, node, count))
    return [tuple(row[:4]) for row in sorted(found, key=lambda row: row[4])]  # type: ignore[misc]


def read_commands(conn: Any, command_ids: list[str]) -> list[tuple[str, str, Any]]:
    return [tuple(row) for row in pg.rows(  # type: ignore[misc]
        conn, "SELECT id, state, result FROM commands WHERE id = ANY(%s)", (command_ids,))]


def cancel_command(conn: Any, command_id: str) -> bool:
    return bool(pg.rows(conn, "UPDATE commands SET state = 'cancelled', done_at = now() "
                              "WHERE id = %s AND state = 'queued' RETURNING id", (command_id,)))


def read_traffic(conn: Any, instance_id: str, since: float) -> list[dict[str, Any]]:
    return [row[0] for row in pg.rows(
        conn, "SELECT sample FROM traffic WHERE instance_id = %s AND at >= %s ORDER BY at",
        (instance_id, since))]


def prune(conn: Any, node: str, retention: float) -> None:
    """Traffic samples older than the history kept, and this node's finished commands
    older than COMMAND_TTL."""
    pg.rows(conn, "DELETE FROM traffic WHERE at < EXTRACT(EPOCH FROM now()) - %s",
            (retention,))
    pg.rows(conn, "DELETE FROM commands WHERE node = %s AND state <> 'queued' AND "
                  "state <> 'running' AND requested_at < now() - %s * interval '1 second'",
            (node, COMMAND_TTL))
