"""The master's instances together: ids, what the API asks of them, what is kept in the
state database, and what every REPORT_INTERVAL brings.  Each instance's process is the
lifecycle's, its restarts the restart policy's, its traffic over time the history's."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.task import LoopingCall

from nodepass import __version__, logs
from nodepass.master.events import EventHub
from nodepass.master.history import TrafficHistory
from nodepass.master.instances import (
    COUNTERS,
    PEER_FIELDS,
    Instance,
    InstanceError,
    gone,
    parse_instance_url,
)
from nodepass.master.lifecycle import Lifecycle
from nodepass.master.restarts import RestartPolicy
from nodepass.master.store import Store, StoredInstance
from nodepass.master.supervisor import Spawner, spawn_child
from nodepass.master.views import count_by_status, describe
from nodepass.tunables import Tunables
from nodepass.url import ClientConfig, MasterConfig, ServerConfig, format_url, redacted

RECENT_LOGS = 200
DURABLE_WAIT = 5.0  # log lines kept per instance, for the dashboard and GET .../logs


_MASTERS_OWN = ("NODEPASS_API_KEY", "NODEPASS_URL", "NODEPASS_DATABASE_URL")


def children_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Children get neither the master's key nor its own URL (they get theirs on stdin),
    nor the fleet database's settings and password (libpq's PG* variables)."""
    return {k: v for k, v in environ.items()
            if k not in _MASTERS_OWN and not k.startswith("PG")}


class Registry:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, master: MasterConfig, tunables: Tunables,
                 environ: Mapping[str, str], store: Store, hub: EventHub,
                 spawn: Spawner = spawn_child) -> None:
        self.reactor = reactor
        self.master = master
        self.tunables = tunables
        self.store = store
        self.hub = hub
        self.instances: dict[str, Instance] = {}  # this master's own
        self.remote: dict[str, Instance] = {}  # other nodes' (fleet.py keeps them)
        self.fleet: Any = None  # fleet.Fleet, when the state is in PostgreSQL
        self._issued: set[str] = store.issued()
        self.started_at = reactor.seconds()
        self.master_id = store.setting("mid") or self._new_master_id()
        self.node = self.master_id  # what the fleet calls this master
        self.alias = store.setting("alias") or ""
        self.history = TrafficHistory(reactor)
        self.recent_logs: dict[str, deque[dict[str, Any]]] = {}  # the last lines, each
        self._saved_counters: dict[str, dict[str, int]] = {}  # as tick() last stored them
        self.restarts = RestartPolicy(reactor, tunables.service_cooldown, self._restart_again,
                                      self._still_wanted)
        environ = children_environ(environ)
        self.lifecycle = Lifecycle(reactor, tunables, environ, spawn, self._changed,
                                   self._save, self.restarts.exited, self._logged)
        self._tick = LoopingCall(self.tick)
        self._tick.clock = reactor

    # -- identity ----------------------------------------------------------

    def new_id(self) -> str:
        while True:
            candidate = "ins_" + secrets.token_hex(4)
            if candidate not in self._issued:
                self._issued.add(candidate)
                return candidate

    def _new_master_id(self) -> str:
        """16 hex digits, made once and kept in the state (NodePass's ``mid``)."""
        master_id = secrets.token_hex(8)
        self.store.set_setting("mid", master_id)
        return master_id

    def set_alias(self, alias: str) -> None:
        """The master's own name, shown to panels."""
        self.alias = alias
        self.store.set_setting("alias", alias)

    def get(self, instance_id: str) -> Instance:
        """One of this master's instances, or another node's."""
        found = self.instances.get(instance_id) or self.remote.get(instance_id)
        if found is None:
            raise InstanceError("INSTANCE_NOT_FOUND", 404,
                                f"no instance with id {instance_id!r}")
        return found

    def get_local(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise InstanceError("INSTANCE_NOT_FOUND", 404,
                                f"no instance with id {instance_id!r} on node {self.node}") \
                from None

    def all(self, node: str | None = None) -> list[Instance]:
        """Every instance of the fleet (only this master's without one), or one node's."""
        if node is not None:
            source = self.instances if node == self.node else self.remote
            return [i for i in source.values() if i.node == node]
        if not self.remote:
            return list(self.instances.values())
        return sorted((*self.instances.values(), *self.remote.values()),
                      key=lambda i: (i.created_at, i.id))

    def is_local(self, instance: Instance) -> bool:
        return instance.node == self.node

    # -- what is kept and told -------------------------------------------------

    def _changed(self, kind: str, instance: Instance) -> None:
        self.hub.publish(kind, instance)
        if self.fleet is not None:
            self.fleet.local_changed(kind, instance)

    def _logged(self, instance: Instance, level: str, text: str, line: str) -> None:
        self.remote_logged(instance, level, text, line)
        if self.fleet is not None:
            self.fleet.local_log(instance, level, text, line)

    # -- what other nodes tell (fleet.py) --------------------------------------

    def remote_changed(self, instance: Instance, new: bool) -> None:
        self.remote[instance.id] = instance
        self._issued.add(instance.id)
        self.hub.publish("create" if new else "update", instance)

    def remote_gone(self, instance_id: str) -> None:
        instance = self.remote.pop(instance_id, None)
        if instance is not None:
            self.recent_logs.pop(instance_id, None)
            self.hub.publish("delete", instance)

    def remote_logged(self, instance: Instance, level: str, text: str, line: str) -> None:
        kept = self.recent_logs.setdefault(instance.id, deque(maxlen=RECENT_LOGS))
        kept.append({"time": self.reactor.seconds(), "level": level, "message": text})
        self.hub.publish("log", instance, level=level, message=text, line=line)

    def logs(self, instance: Instance, limit: int) -> list[dict[str, Any]]:
        """The instance's last ``limit`` log lines (of RECENT_LOGS kept), oldest first."""
        kept = self.recent_logs.get(instance.id, ())
        return list(kept)[-limit:] if limit else []

    def _save(self, instance: Instance) -> None:
        """Commit what must survive a restart (before the API confirms a change)."""
        if instance.deleted:
            return
        self.store.save(StoredInstance(
            id=instance.id, url=instance.url, created_at=instance.created_at,
            desired=instance.desired, alias=instance.alias, tags=dict(instance.tags),
            restart=instance.auto_restart, restarts=instance.restarts,
            counters=instance.counters(), peer=dict(instance.peer)))

    def restore(self) -> list[Instance]:
        """Bring back the stored instances; start those that were meant to run."""
        to_start = []
        for stored in self.store.load():
            try:
                config = parse_instance_url(stored.url, self.master)
            except InstanceError as e:
                self.log.error("stored instance {id} has an unusable URL, left out: {why}",
                               id=stored.id, why=e.message)
                continue
            instance = Instance(stored.id, config, stored.created_at, alias=stored.alias,
                                tags=stored.tags, auto_restart=stored.restart,
                                restarts=stored.restarts, desired=stored.desired,
                                node=self.node)
            instance.base.update({k: int(stored.counters.get(k, 0)) for k in COUNTERS})
            instance.peer.update({k: str(stored.peer.get(k, "")) for k in PEER_FIELDS})
            self.instances[instance.id] = instance
            if stored.desired == "running":
                to_start.append(instance)
        if self.instances:
            self.log.info("restored {n} instances from the state database",
                          n=len(self.instances))
        self._tick.start(self.tunables.report_interval, now=False)
        for instance in to_start:
            Deferred.fromCoroutine(self.start(instance))
        return to_start

    # -- what the API asks ---------------------------------------------------

    def parse_instance_url(self, text: str) -> ServerConfig | ClientConfig:
        return parse_instance_url(text, self.master)

    async def create(self, url: str, alias: str | None = None,
                     tags: dict[str, str] | None = None, restart: bool = False,
                     peer: dict[str, str] | None = None, node: str | None = None) -> Instance:
        """A new instance, on this master or (``node``) on another of the fleet."""
        if node is not None and node != self.node:
            parse_instance_url(url, self.master, files=False)  # refused here if it is bad
            fleet = self._fleet_for(node)
            return await fleet.command(node, "create", {  # type: ignore[no-any-return]
                "url": url, "alias": alias, "tags": tags, "restart": restart, "peer": peer})
        config = self.parse_instance_url(url)
        self._writable("create an instance")
        instance = Instance(self.new_id(), config, self.reactor.seconds(), alias=alias or None,
                            tags=dict(tags or {}), auto_restart=restart, node=self.node)
        instance.peer.update(peer or {})
        self._save(instance)
        self.instances[instance.id] = instance
        self.log.info("instance {id} created: {url}", id=instance.id,
                      url=redacted(instance.url))
        self._changed("create", instance)
        await self.start(instance)
        await self._durable()
        return instance

    async def _durable(self) -> None:
        """Wait for what was just written to be committed (at once with SQLite; with a
        fleet database at most DURABLE_WAIT: the answer goes, the write goes on)."""
        try:
            await self.store.durable().addTimeout(DURABLE_WAIT, self.reactor)
        except (CancelledError, TimeoutError):
            self.log.warn("the fleet database has not confirmed a write within {s} s; "
                          "answering, the write goes on", s=DURABLE_WAIT)

    def _fleet_for(self, node: str) -> Any:
        if self.fleet is None:
            raise InstanceError("NODE_NOT_FOUND", 404,
                                f"no node {node!r}: this master is not in a fleet (its node "
                                f"is {self.node}; see docs/fleet.md)")
        return self.fleet

    def _writable(self, what: str) -> None:
        """Creating and deleting need the fleet's database: an id and a row the other
        masters must see (control of an existing instance is written when it is back)."""
        why = self.fleet.problem if self.fleet is not None else None
        if why:
            raise InstanceError("FLEET_UNAVAILABLE", 503,
                                f"cannot {what} while the fleet database is unreachable "
                                f"({why}); this master's instances keep running")

    async def control(self, instance: Instance, url: str | None = None,
                      action: str | None = None, alias: Any = None, tags: Any = None,
                      restart: Any = None, peer: Any = None) -> Instance:
        """What a PUT or PATCH asks: metadata, then a new URL or an action (start, stop,
        restart, reset), on whichever node runs ``instance``; -> it, as it is after."""
        meta = {"alias": alias, "tags": tags, "restart": restart, "peer": peer}
        if not self.is_local(instance):
            given = {k: v for k, v in meta.items() if v is not None}
            return await self._fleet_for(instance.node).command(  # type: ignore[no-any-return]
                instance.node, "control",
                {"id": instance.id, "url": url, "action": action, "meta": given})
        if url is not None:
            self.vet_url(instance, url)  # a bad URL changes nothing at all
        if any(v is not None for v in meta.values()):
            self.update(instance, **meta)
        if url is not None:
            await self.replace_url(instance, url)
        elif action == "reset":
            self.reset(instance)
        elif action is not None:
            await getattr(self, action)(instance)
        await self._durable()
        return instance

    def update(self, instance: Instance, alias: Any = None, tags: Any = None,
               restart: Any = None, peer: Any = None) -> None:
        """Change metadata or the restart flag; None leaves a field as it is (and a peer
        field left out of ``peer`` keeps its value)."""
        if instance.deleted:
            raise gone(instance)
        if alias is not None:
            instance.alias = alias or None
        if tags is not None:
            instance.tags = dict(tags)
        if peer is not None:
            instance.peer.update(peer)
        if restart is not None:
            instance.auto_restart = restart
            if not restart:
                self.restarts.cancel(instance)
        self._save(instance)
        self._changed("update", instance)

    def vet_url(self, instance: Instance, url: str) -> ServerConfig | ClientConfig:
        """The config a new URL for ``instance`` gives, or the InstanceError it earns."""
        config = self.parse_instance_url(url)
        if format_url(config) == instance.url:
            raise InstanceError("CONFLICT", 409, f"instance {instance.id} already runs this URL "
                                                 f"({redacted(instance.url)})")
        return config

    async def replace_url(self, instance: Instance, url: str) -> None:
        """Run ``instance`` with another URL under the same id: checked first (a bad URL
        leaves it as it is), then stopped, changed, saved and started."""
        config = self.vet_url(instance, url)

        async def swap() -> None:
            if instance.deleted:
                raise gone(instance)
            await self.lifecycle.stop_now(instance)
            instance.config = config
            instance.desired = "running"
            self._save(instance)
            self.log.info("instance {id} URL replaced: {url}", id=instance.id,
                          url=redacted(instance.url))
            await self.lifecycle.start_now(instance)

        self.restarts.cancel(instance)
        await self.lifecycle.exclusively(instance, swap)

    def reset(self, instance: Instance) -> None:
        """Zero the traffic counters, durably, without touching the process."""
        if instance.deleted:
            raise gone(instance)
        instance.reset_counters()
        self.history.restart_from_here(instance)
        self._save(instance)
        self.log.info("instance {id}: traffic counters reset", id=instance.id)
        self._changed("update", instance)

    async def start(self, instance: Instance) -> None:
        await self.lifecycle.start(instance)

    async def stop(self, instance: Instance, keep_desired: bool = False) -> None:
        if not keep_desired:
            instance.desired = "stopped"
            self.restarts.cancel(instance)
            self._save(instance)
        await self.lifecycle.stop(instance)

    async def restart(self, instance: Instance) -> None:
        self.restarts.cancel(instance)
        await self.lifecycle.restart(instance)

    async def delete(self, instance: Instance) -> None:
        if not self.is_local(instance):
            await self._fleet_for(instance.node).command(instance.node, "delete",
                                                         {"id": instance.id})
            return
        self._writable("delete an instance")
        if instance.deleted:
            raise gone(instance)
        instance.deleted = True  # what waits for its turn on it will not bring it back

        async def remove() -> None:
            await self.lifecycle.stop_now(instance)
            self.store.delete(instance.id)
            self.instances.pop(instance.id, None)
            self._saved_counters.pop(instance.id, None)
            self.history.forget(instance)
            self.recent_logs.pop(instance.id, None)
            self.log.info("instance {id} deleted", id=instance.id)
            self._changed("delete", instance)

        self.restarts.cancel(instance)
        instance.desired = "stopped"
        await self.lifecycle.exclusively(instance, remove)
        await self._durable()

    def _still_wanted(self, instance: Instance) -> bool:
        return instance.id in self.instances and instance.desired == "running"

    def _restart_again(self, instance: Instance) -> None:
        instance.restarts += 1
        self._save(instance)
        Deferred.fromCoroutine(self.start(instance))

    # -- every REPORT_INTERVAL ---------------------------------------------

    def tick(self) -> None:
        """Sample traffic rates, persist counters (those that moved), tell subscribers how
        instances are."""
        now = self.reactor.seconds()
        counters = {}
        for instance in self.instances.values():
            current = instance.counters()
            if self._saved_counters.get(instance.id) != current:
                counters[instance.id] = self._saved_counters[instance.id] = current
            sample = self.history.sample(instance, now, current)
            if sample is not None and self.fleet is not None:
                self.fleet.local_sample(instance, sample)
            if instance.running:
                self._changed("update", instance)
        self.store.save_counters(counters)

    # -- views -------------------------------------------------------------

    async def traffic(self, instance: Instance, window: float) -> list[dict[str, Any]]:
        """Its samples over the last ``window`` seconds: from the fleet's database, where
        every master's samples are (this master's own from memory while it is away)."""
        if self.fleet is not None:
            try:
                return await self.fleet.traffic(instance, window)  # type: ignore[no-any-return]
            except Exception as e:
                if not self.is_local(instance):
                    raise InstanceError("FLEET_UNAVAILABLE", 503,
                                        f"the fleet database is unreachable ({e}): another "
                                        "node's traffic cannot be read") from None
        return self.history.window(instance, window)

    def describe(self, instance: Instance) -> dict[str, Any]:
        return describe(instance, self.reactor.seconds())

    def count_by_status(self) -> dict[str, int]:
        """This master's own instances (each master counts what it runs)."""
        return count_by_status(self.instances.values())

    def store_status(self) -> dict[str, Any]:
        """Where the state is kept and whether it can be written now (/info)."""
        if self.fleet is not None:
            return self.fleet.describe()  # type: ignore[no-any-return]
        return {"store": self.store.kind if self.master.persist else "memory",
                "node": self.node, "status": "ok"}

    def nodes(self) -> list[dict[str, Any]]:
        if self.fleet is not None:
            return [n.describe(self.node) for n in self.fleet.sorted_nodes()]
        return [{"id": self.node, "alias": self.alias, "version": __version__,
                 "online": True, "self": True, "last_heartbeat": 0.0, "heartbeat": None}]

    async def shutdown(self) -> None:
        """Stop every instance at once (SIGTERM, then SIGKILL after the grace); what
        they were meant to be doing is kept, so the next start brings them back."""
        if self._tick.running:
            self._tick.stop()
        self.tick()
        for instance in self.instances.values():
            self.restarts.cancel(instance)
        await gatherResults([Deferred.fromCoroutine(self.stop(instance, keep_desired=True))
                             for instance in list(self.instances.values())])
        for instance in self.instances.values():
            self._save(instance)
