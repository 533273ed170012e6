"""Many masters, one state: the fleet on PostgreSQL (docs/fleet.md).

Each master is a node.  It says it is alive every FLEET_HEARTBEAT (a row in
``nodes``); one silent for three heartbeats is offline, and its instances are shown
as last told, marked ``stale``.  What its own instances look like goes to the
database (``instances.live``) with a notification in the same transaction, so every
other master keeps a mirror of them (``Registry.remote``), tells its subscribers, and
reads the tables again whenever it may have missed a notification (at start and after
its listening connection came back).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import LoopingCall

from nodepass import logs
from nodepass.master import pg
from nodepass.master.instances import Instance, InstanceError, from_snapshot, snapshot
from nodepass.master.pglisten import Listener
from nodepass.master.pgstore import CHANNEL, NOTICE_LIMIT, PgStore

if TYPE_CHECKING:
    from nodepass.master.registry import Registry

MISSED_BEATS = 3
LOG_TEXT = 2000  # characters of a log line carried to other masters
POLL = 1.0  # seconds between looks at a command's row while waiting for its outcome
DONE = ("done", "failed", "interrupted", "cancelled")


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
        self.heartbeat = registry.tunables.fleet_heartbeat
        self.command_wait = registry.tunables.fleet_command_wait
        self.nodes: dict[str, Node] = {}
        self.order = [registry.started_at, 0]  # what each snapshot of ours is numbered by
        self.seen: dict[str, list[float]] = {}  # the newest number applied, per instance
        self.waiting: dict[str, Deferred[dict[str, Any]]] = {}
        self.claim = secrets.token_hex(8)  # this run's, on the commands it claims
        self.listener: Listener | None = None
        self.deaf: str | None = "not listening yet"
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self._working = False
        self._more_work = False
        self._first_up = True

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.store.start(self.reactor)
        assert self.store.db is not None
        self.listener = Listener(self.reactor, self.store.db, CHANNEL, self._heard,
                                 self._listening, self._deaf)
        self.listener.start()
        self._beat.start(self.heartbeat, now=True)

    def stop(self) -> None:
        if self._beat.running:
            self._beat.stop()
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
                "pending_writes": len(self.store.outbox.pending),
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
        self.store.outbox.put(("live", instance.id),
                              ("live", instance.id, kind, self._numbered(instance)))

    def _numbered(self, instance: Instance) -> dict[str, Any]:
        """Its snapshot, numbered so that a master never takes an older one for newer."""
        self.order[1] += 1
        told = snapshot(instance)
        told["q"] = list(self.order)
        return told

    def local_log(self, instance: Instance, level: str, text: str, line: str) -> None:
        notice = json.dumps({"k": "log", "n": self.node, "i": instance.id, "l": level,
                             "m": text[:LOG_TEXT], "line": line[:LOG_TEXT]})
        self.store.outbox.put(("log", self.store.outbox.seq + 1), ("log", notice))

    def local_sample(self, instance: Instance, sample: dict[str, Any]) -> None:
        at = sample["timestamp"]
        self.store.outbox.put(("traffic", instance.id, at),
                              ("traffic", instance.id, at, json.dumps(sample)))

    # -- what the others tell ------------------------------------------------------

    def _heard(self, payload: str) -> None:
        message = json.loads(payload)
        kind = message.get("k")
        if kind == "command":
            if message.get("node") == self.node:
                self._carry_out()
            return
        if kind == "result":
            self._result_heard(message)
            return
        if message.get("n") == self.node:
            return  # our own, told to our subscribers already
        if kind in ("create", "update"):
            if "s" in message:
                self._apply(message["n"], message["s"])
            else:  # too big for a notification: read it
                self.store.db.run(read_live, message["i"]).addCallback(
                    lambda found: found and self._apply(*found))
        elif kind == "delete":
            self._forget(message["i"])
        elif kind == "log":
            instance = self.registry.remote.get(message["i"])
            if instance is not None:
                self.registry.remote_logged(instance, message["l"], message["m"],
                                            message.get("line", ""))

    def _apply(self, node: str, told: dict[str, Any]) -> Instance | None:
        """Another node's instance as it told it (newer than what we had, or ignored)."""
        if node == self.node:
            return None
        instance_id = told["id"]
        order = told.get("q") or [0, 0]
        if order <= self.seen.get(instance_id, [-1, -1]):
            return self.registry.remote.get(instance_id)
        known = self.registry.remote.get(instance_id)
        try:
            instance = from_snapshot(told, node, known)
        except (ValueError, KeyError, TypeError) as e:
            self.log.warn("instance {id} of node {node} cannot be shown here: {why}",
                          id=instance_id, node=node, why=str(e))
            return None
        self.seen[instance_id] = order
        instance.stale = not self._online(node)
        self.registry.remote_changed(instance, known is None)
        return instance

    def _forget(self, instance_id: str) -> None:
        self.seen.pop(instance_id, None)
        self.registry.remote_gone(instance_id)

    def _listening(self) -> None:
        """The notification connection is (again) up: read what may have been missed."""
        self.deaf = None
        first, self._first_up = self._first_up, False
        d = self.store.db.run(read_fleet, self.node, self.claim if first else None)
        d.addCallbacks(self._resynced, self._not_read)

    def _deaf(self, why: str) -> None:
        if self.deaf is None:
            self.log.warn("fleet notifications lost ({why}); listening again with backoff",
                          why=why)
        self.deaf = why

    def _resynced(self, found: tuple[list[tuple[str, str, Any]], list[tuple[Any, ...]]]
                  ) -> None:
        instances, nodes = found
        self._nodes_read(nodes)
        there = set()
        for instance_id, node, told in instances:
            there.add(instance_id)
            if told is not None:
                self._apply(node, told)
        for instance_id in [i for i in self.registry.remote if i not in there]:
            self._forget(instance_id)
        self._carry_out()

    def _not_read(self, failure: Any) -> None:
        self.log.warn("the fleet could not be read ({why}); trying again at the next "
                      "heartbeat", why=pg.one_line(failure.value))
        self._first_up = self._first_up  # unchanged: still to be read
        self._retry_read = True

    # -- nodes ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        self.store.heartbeat(self.heartbeat)
        d = self.store.db.run(read_nodes)
        d.addCallbacks(self._nodes_read, lambda _: None)
        if getattr(self, "_retry_read", False) and self.deaf is None:
            self._retry_read = False
            self._listening()

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
        a delete), or the InstanceError it answered, or a 503/504 naming what failed."""
        node = self.node_named(node_id)
        if self.problem:
            raise InstanceError("FLEET_UNAVAILABLE", 503,
                                f"the fleet database is unreachable ({self.problem}): "
                                f"node {node.label()} cannot be asked until it is back")
        command_id = secrets.token_hex(16)
        waiter: Deferred[dict[str, Any]] = Deferred()
        self.waiting[command_id] = waiter
        poll = LoopingCall(self._poll, command_id)
        poll.clock = self.reactor
        try:
            try:
                await self.store.db.run(insert_command, command_id, node_id, op,
                                        json.dumps(args), self.node)
            except pg.DatabaseDownError as e:
                raise InstanceError("FLEET_UNAVAILABLE", 503,
                                    f"the fleet database is unreachable ({e}): node "
                                    f"{node.label()} cannot be asked until it is back") from None
            if not node.online:
                raise InstanceError("NODE_OFFLINE", 504,
                                    f"node {node.label()} is offline (no heartbeat for "
                                    f"{node.age:.0f} s): the command is queued and is carried "
                                    "out when the node is back")
            poll.start(POLL, now=False)
            try:
                result = await waiter.addTimeout(self.command_wait, self.reactor)
            except (CancelledError, TimeoutError):
                cancelled = await self.store.db.run(cancel_command, command_id)
                raise InstanceError(
                    "NODE_TIMEOUT", 504,
                    f"node {node.label()} did not answer within "
                    f"{self.command_wait:g} s: " + (
                        "the command was withdrawn, nothing was done" if cancelled else
                        "it is carrying the command out; its outcome will show in the "
                        "events")) from None
        finally:
            self.waiting.pop(command_id, None)
            if poll.running:
                poll.stop()
        return self._outcome(node_id, op, args, result)

    def _outcome(self, node_id: str, op: str, args: dict[str, Any],
                 result: dict[str, Any]) -> Instance | None:
        if not result.get("ok"):
            raise InstanceError(str(result.get("code") or "INTERNAL"),
                                int(result.get("status") or 500),
                                str(result.get("message") or "the node failed"))
        if op == "delete":
            self._forget(args["id"])
            return None
        instance = self._apply(node_id, result["snapshot"])
        if instance is None:
            raise InstanceError("INTERNAL", 500, f"node {node_id} answered with an instance "
                                                 "this master cannot read")
        return instance

    def _result_heard(self, message: dict[str, Any]) -> None:
        waiter = self.waiting.get(message.get("c", ""))
        if waiter is None or waiter.called:
            return
        if "r" in message:
            waiter.callback(message["r"])
        else:
            self._poll(message["c"])

    def _poll(self, command_id: str) -> None:
        def read(found: tuple[str, Any] | None) -> None:
            waiter = self.waiting.get(command_id)
            if found is None or waiter is None or waiter.called:
                return
            state, result = found
            if state in DONE:
                waiter.callback(result or {"ok": False, "code": "NODE_TIMEOUT",
                                           "status": 504, "message": f"command {state}"})

        self.store.db.run(read_command, command_id).addCallbacks(read, lambda _: None)

    # -- commands: carrying out ------------------------------------------------------

    def _carry_out(self) -> None:
        """Run what is queued for this node, oldest first, one at a time."""
        if self._working:
            self._more_work = True
            return
        self._working = True
        Deferred.fromCoroutine(self._work()).addErrback(
            lambda f: self.log.failure("carrying out fleet commands", f))

    async def _work(self) -> None:
        try:
            while True:
                self._more_work = False
                try:
                    claimed = await self.store.db.run(claim_next, self.node, self.claim)
                except pg.DatabaseDownError:
                    return  # the listener's return brings us back
                if claimed is None:
                    if not self._more_work:
                        return
                    continue
                command_id, op, args, asker = claimed
                result = await self._execute(op, args)
                self.log.info("fleet command {op} from node {asker}: {outcome}", op=op,
                              asker=asker, outcome="done" if result["ok"] else
                              result.get("message"))
                notice = {"k": "result", "c": command_id, "r": result}
                text = json.dumps(notice)
                if len(text.encode()) > NOTICE_LIMIT:
                    text = json.dumps({"k": "result", "c": command_id})
                self.store.outbox.put(("result", command_id),
                                      ("result", command_id,
                                       "done" if result["ok"] else "failed",
                                       json.dumps(result), text))
        finally:
            self._working = False

    async def _execute(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        registry = self.registry
        try:
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
        since = self.reactor.seconds() - window
        return await self.store.db.run(read_traffic, instance.id, since)


# -- statements, run in the database's worker thread --------------------------------

def read_live(conn: Any, instance_id: str) -> tuple[str, dict[str, Any]] | None:
    found = pg.rows(conn, "SELECT node, live FROM instances WHERE id = %s AND live IS NOT "
                          "NULL", (instance_id,))
    return (found[0][0], found[0][1]) if found else None


def read_nodes(conn: Any) -> list[tuple[Any, ...]]:
    return pg.rows(conn, "SELECT id, alias, version, heartbeat, "
                         "EXTRACT(EPOCH FROM now() - heartbeat_at)::float FROM nodes")


def read_fleet(conn: Any, me: str, claim: str | None
               ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every other node's instances and every node; on this run's first read, the
    commands an earlier run of this node claimed and never finished are marked
    interrupted (carried out at most once)."""
    if claim is not None:
        interrupted = pg.rows(
            conn, "UPDATE commands SET state = 'interrupted', done_at = now(), result = %s "
                  "WHERE node = %s AND state = 'running' AND claim IS DISTINCT FROM %s "
                  "RETURNING id",
            (json.dumps({"ok": False, "code": "INTERRUPTED", "status": 504,
                         "message": f"node {me} restarted while carrying the command out; "
                                    "it is not run again"}), me, claim))
        for (command_id,) in interrupted:
            pg.rows(conn, "SELECT pg_notify(%s, %s)",
                    (CHANNEL, json.dumps({"k": "result", "c": command_id})))
    instances = pg.rows(conn, "SELECT id, node, live FROM instances WHERE node <> %s", (me,))
    return instances, read_nodes(conn)


def insert_command(conn: Any, command_id: str, node: str, op: str, args: str,
                   asker: str) -> None:
    pg.rows(conn, "INSERT INTO commands (id, node, op, args, requested_by) VALUES "
                  "(%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (command_id, node, op, args, asker))
    pg.rows(conn, "SELECT pg_notify(%s, %s)",
            (CHANNEL, json.dumps({"k": "command", "node": node})))


def claim_next(conn: Any, node: str, claim: str) -> tuple[str, str, Any, str] | None:
    found = pg.rows(
        conn, "UPDATE commands SET state = 'running', claim = %s WHERE id = (SELECT id FROM "
              "commands WHERE node = %s AND state = 'queued' ORDER BY seq LIMIT 1 FOR UPDATE "
              "SKIP LOCKED) RETURNING id, op, args, requested_by", (claim, node))
    return tuple(found[0]) if found else None  # type: ignore[return-value]


def read_command(conn: Any, command_id: str) -> tuple[str, Any] | None:
    found = pg.rows(conn, "SELECT state, result FROM commands WHERE id = %s", (command_id,))
    return (found[0][0], found[0][1]) if found else None


def cancel_command(conn: Any, command_id: str) -> bool:
    return bool(pg.rows(conn, "UPDATE commands SET state = 'cancelled', done_at = now() "
                              "WHERE id = %s AND state = 'queued' RETURNING id", (command_id,)))


def read_traffic(conn: Any, instance_id: str, since: float) -> list[dict[str, Any]]:
    return [row[0] for row in pg.rows(
        conn, "SELECT sample FROM traffic WHERE instance_id = %s AND at >= %s ORDER BY at",
        (instance_id, since))]
