"""The master's instances: what each one is, and starting, stopping, restarting them.

Operations on one instance are serialised (a DeferredLock each), and every state
reported to the API is what the child process said or did, not a guess.
"""

from __future__ import annotations

import secrets
import signal
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.error import AlreadyCalled
from twisted.internet.task import LoopingCall

from nodepass import logs
from nodepass.backoff import backoff
from nodepass.master.events import EventHub
from nodepass.master.store import Store, StoredInstance
from nodepass.master.supervisor import ChildProcess, Spawner, describe_exit, spawn_child
from nodepass.tunables import Tunables
from nodepass.url import ClientConfig, MasterConfig, ServerConfig, URLError, format_url, parse

READY_TIMEOUT = 5.0
KILL_GRACE = 2.0
COUNTERS = ("tcp_in", "tcp_out", "udp_in", "udp_out")
HISTORY_SAMPLES = 720  # one hour at the default REPORT_INTERVAL of 5 s
HEALTHY_FACTOR = 10  # running 10 cooldowns (50 s by default) resets the backoff
PEER_FIELDS = ("sid", "type", "alias")  # NodePass's meta.peer


class InstanceError(Exception):
    """A request the registry refuses: ``code`` and ``status`` for the API."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Instance:
    id: str
    config: ServerConfig | ClientConfig
    created_at: float
    status: str = "stopped"
    error: str | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    restarted_at: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    child: ChildProcess | None = None
    lock: DeferredLock = field(default_factory=DeferredLock)
    exited: Deferred[None] | None = None
    ready: Deferred[None] | None = None
    last_fatal: str | None = None
    stopping: bool = False
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    auto_restart: bool = False
    restarts: int = 0
    desired: str = "running"
    failures: int = 0
    restart_call: Any = None
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))
    last_sample: tuple[float, dict[str, int]] | None = None
    peer: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PEER_FIELDS, ""))

    @property
    def url(self) -> str:
        return format_url(self.config)

    @property
    def type(self) -> str:
        return self.config.scheme


def inherit(config: ServerConfig | ClientConfig, given: set[str],
            master: MasterConfig) -> ServerConfig | ClientConfig:
    """Fill what the URL did not set from the master: ``log``, and for servers ``tls``
    (with ``crt``/``key`` when tls=2), as the NodePass master does."""
    values: dict[str, Any] = {}
    if "log" not in given:
        values["log"] = master.log
    if isinstance(config, ServerConfig) and "tls" not in given:
        values.update(tls=master.tls, crt=master.crt, key=master.key)
    return replace(config, **values)


def given_parameters(url: str) -> set[str]:
    _, _, query = url.partition("?")
    return {item.partition("=")[0] for item in query.split("&") if item}


class Registry:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, master: MasterConfig, tunables: Tunables,
                 environ: Mapping[str, str], store: Store, hub: EventHub,
                 spawn: Spawner = spawn_child) -> None:
        self.reactor = reactor
        self.spawn = spawn
        self.master = master
        self.tunables = tunables
        self.environ = {k: v for k, v in environ.items() if k != "NODEPASS_API_KEY"}
        self.store = store
        self.hub = hub
        self.instances: dict[str, Instance] = {}
        self._issued: set[str] = store.issued()
        self.started_at = reactor.seconds()
        self.master_id = store.setting("mid") or self._new_master_id()
        self.alias = store.setting("alias") or ""
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
        try:
            return self.instances[instance_id]
        except KeyError:
            raise InstanceError("INSTANCE_NOT_FOUND", 404,
                                f"no instance with id {instance_id!r}") from None

    def _changed(self, kind: str, instance: Instance) -> None:
        self.hub.publish(kind, instance)

    def _save(self, instance: Instance) -> None:
        """Commit what must survive a restart (before the API confirms a change)."""
        self.store.save(StoredInstance(
            id=instance.id, url=instance.url, created_at=instance.created_at,
            desired=instance.desired, alias=instance.alias, tags=dict(instance.tags),
            restart=instance.auto_restart, restarts=instance.restarts,
            counters=self.counters(instance), peer=dict(instance.peer)))

    # -- start of the master -----------------------------------------------

    def restore(self) -> list[Instance]:
        """Bring back the stored instances; start those that were meant to run."""
        to_start = []
        for stored in self.store.load():
            try:
                config = self.parse_instance_url(stored.url)
            except InstanceError as e:
                self.log.error("stored instance {id} has an unusable URL, left out: {why}",
                               id=stored.id, why=e.message)
                continue
            instance = Instance(stored.id, config, stored.created_at, alias=stored.alias,
                                tags=stored.tags, auto_restart=stored.restart,
                                restarts=stored.restarts, desired=stored.desired)
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

    # -- creation ----------------------------------------------------------

    def parse_instance_url(self, text: str) -> ServerConfig | ClientConfig:
        try:
            config = parse(text)
        except URLError as e:
            raise InstanceError("INVALID_URL", 400, str(e)) from None
        if isinstance(config, MasterConfig):
            raise InstanceError("INVALID_URL", 400,
                                "scheme: a master cannot run another master (allowed: server, "
                                "client)")
        return inherit(config, given_parameters(text), self.master)

    async def create(self, url: str, alias: str | None = None,
                     tags: dict[str, str] | None = None, restart: bool = False,
                     peer: dict[str, str] | None = None) -> Instance:
        config = self.parse_instance_url(url)
        instance = Instance(self.new_id(), config, self.reactor.seconds(), alias=alias or None,
                            tags=dict(tags or {}), auto_restart=restart)
        instance.peer.update(peer or {})
        self._save(instance)
        self.instances[instance.id] = instance
        self.log.info("instance {id} created: {url}", id=instance.id, url=instance.url)
        self._changed("create", instance)
        await self.start(instance)
        return instance

    def update(self, instance: Instance, alias: Any = None, tags: Any = None,
               restart: Any = None, peer: Any = None) -> None:
        """Change metadata or the restart flag; None leaves a field as it is (and a peer
        field left out of ``peer`` keeps its value)."""
        if alias is not None:
            instance.alias = alias or None
        if tags is not None:
            instance.tags = dict(tags)
        if peer is not None:
            instance.peer.update(peer)
        if restart is not None:
            instance.auto_restart = restart
            if not restart:
                self._cancel_auto_restart(instance)
        self._save(instance)
        self._changed("update", instance)

    def vet_url(self, instance: Instance, url: str) -> ServerConfig | ClientConfig:
        """The config a new URL for ``instance`` gives, or the InstanceError it earns."""
        config = self.parse_instance_url(url)
        if format_url(config) == instance.url:
            raise InstanceError("CONFLICT", 409, f"instance {instance.id} already runs this URL "
                                                 f"({instance.url})")
        return config

    async def replace_url(self, instance: Instance, url: str) -> None:
        """Run ``instance`` with another URL under the same id: checked first (a bad URL
        leaves it as it is), then stopped, changed, saved and started."""
        config = self.vet_url(instance, url)

        async def swap() -> None:
            await self._stop(instance)
            instance.config = config
            instance.desired = "running"
            self._save(instance)
            self.log.info("instance {id} URL replaced: {url}", id=instance.id, url=instance.url)
            await self._start(instance)

        self._cancel_auto_restart(instance)
        await instance.lock.run(lambda: Deferred.fromCoroutine(swap()))

    def reset(self, instance: Instance) -> None:
        """Zero the traffic counters, durably, without touching the process."""
        for name in COUNTERS:
            instance.base[name] = -int(instance.report.get(name) or 0)
        instance.last_sample = None
        self._save(instance)
        self.log.info("instance {id}: traffic counters reset", id=instance.id)
        self._changed("update", instance)

    # -- lifecycle ---------------------------------------------------------

    async def start(self, instance: Instance) -> None:
        await instance.lock.run(self._start, instance)

    async def stop(self, instance: Instance, keep_desired: bool = False) -> None:
        if not keep_desired:
            instance.desired = "stopped"
            self._cancel_auto_restart(instance)
            self._save(instance)
        await instance.lock.run(self._stop, instance)

    async def restart(self, instance: Instance) -> None:
        async def both() -> None:
            await self._stop(instance)
            await self._start(instance)
            instance.restarted_at = instance.started_at

        self._cancel_auto_restart(instance)
        await instance.lock.run(lambda: Deferred.fromCoroutine(both()))

    async def delete(self, instance: Instance) -> None:
        async def gone() -> None:
            await self._stop(instance)
            self.store.delete(instance.id)
            self.instances.pop(instance.id, None)
            self.log.info("instance {id} deleted", id=instance.id)
            self._changed("delete", instance)

        self._cancel_auto_restart(instance)
        instance.desired = "stopped"
        await instance.lock.run(lambda: Deferred.fromCoroutine(gone()))

    def _cancel_auto_restart(self, instance: Instance) -> None:
        if instance.restart_call is not None and instance.restart_call.active():
            instance.restart_call.cancel()
        instance.restart_call = None

    def _start(self, instance: Instance) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start_now(instance))

    async def _start_now(self, instance: Instance) -> None:
        if instance.child is not None and instance.child.running:
            return
        if instance.desired != "running":
            instance.desired = "running"
            self._save(instance)
        instance.error = None
        instance.last_fatal = None
        instance.report = {}
        instance.stopping = False
        instance.ready = Deferred()
        instance.exited = Deferred()
        child = ChildProcess(instance.id, lambda e: self._event(instance, e),
                             lambda code, sig, tail: self._exited(instance, code, sig, tail),
                             lambda level, text, line: self.hub.publish(
                                 "log", instance, level=level, message=text, line=line))
        instance.child = child
        try:
            self.spawn(self.reactor, instance.url, self.environ, child)
        except OSError as e:
            instance.status, instance.error = "error", f"cannot start: {e}"
            instance.child = None
            self._changed("update", instance)
            return
        instance.started_at = self.reactor.seconds()
        timer = self.reactor.callLater(READY_TIMEOUT, _fire, instance.ready)
        await instance.ready
        if timer.active():
            timer.cancel()
        if child.running:
            instance.status = "running"
            self.log.info("instance {id} running", id=instance.id)
        self._changed("update", instance)

    def _stop(self, instance: Instance) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop_now(instance))

    async def _stop_now(self, instance: Instance) -> None:
        child = instance.child
        if child is None or not child.running:
            instance.status, instance.error = "stopped", None
            return
        instance.stopping = True
        child.signal(signal.SIGTERM)
        grace = self.tunables.shutdown_timeout + KILL_GRACE
        killer = self.reactor.callLater(grace, child.signal, signal.SIGKILL)
        assert instance.exited is not None
        await instance.exited
        if killer.active():
            killer.cancel()
        instance.status = "stopped"
        instance.error = None
        instance.stopped_at = self.reactor.seconds()
        self.log.info("instance {id} stopped", id=instance.id)
        self._changed("update", instance)

    # -- what the child says -----------------------------------------------

    def _event(self, instance: Instance, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ready" and instance.ready is not None:
            _fire(instance.ready)
        elif kind == "report":
            instance.report = {k: v for k, v in event.items() if k != "type"}
        elif kind == "fatal":
            message = event.get("message")
            instance.last_fatal = str(message)[:500] if message is not None else None

    def _exited(self, instance: Instance, code: int | None, sig: int | None,
                stderr_tail: list[str]) -> None:
        for name in COUNTERS:
            value = instance.report.get(name)
            if isinstance(value, int):
                instance.base[name] += value
        instance.report = {}
        instance.child = None
        if not instance.stopping:
            reason = instance.last_fatal or (stderr_tail[-1] if stderr_tail else None)
            instance.status = "error"
            instance.error = describe_exit(code, sig) + (f": {reason}" if reason else "")
            instance.stopped_at = self.reactor.seconds()
            self.log.error("instance {id} {error}", id=instance.id, error=instance.error)
            self._schedule_auto_restart(instance)
            self._changed("update", instance)
        if instance.ready is not None:
            _fire(instance.ready)
        if instance.exited is not None:
            _fire(instance.exited)

    def _schedule_auto_restart(self, instance: Instance) -> None:
        """restart=true: try again after SERVICE_COOLDOWN, doubling while it keeps failing,
        capped at 12 cooldowns; a run of 10 cooldowns counts as healthy and resets it."""
        if not instance.auto_restart or instance.desired != "running":
            return
        cooldown = self.tunables.service_cooldown
        ran = self.reactor.seconds() - (instance.started_at or self.reactor.seconds())
        if ran >= HEALTHY_FACTOR * cooldown:
            instance.failures = 0
        instance.failures += 1
        delay = backoff(cooldown)(instance.failures)
        self.log.warn("instance {id} will be restarted in {delay:g}s (attempt {n})",
                      id=instance.id, delay=round(delay, 3), n=instance.failures)
        instance.restart_call = self.reactor.callLater(delay, self._auto_restart, instance)

    def _auto_restart(self, instance: Instance) -> None:
        instance.restart_call = None
        if instance.id not in self.instances or instance.desired != "running":
            return
        instance.restarts += 1
        self._save(instance)
        Deferred.fromCoroutine(self.start(instance))

    # -- every REPORT_INTERVAL ---------------------------------------------

    def tick(self) -> None:
        """Sample traffic rates, persist counters, tell subscribers how instances are."""
        now = self.reactor.seconds()
        counters = {}
        for instance in self.instances.values():
            current = self.counters(instance)
            counters[instance.id] = current
            self._sample(instance, now, current)
            if instance.status == "running":
                self._changed("update", instance)
        self.store.save_counters(counters)

    def _sample(self, instance: Instance, now: float, current: dict[str, int]) -> None:
        previous = instance.last_sample
        instance.last_sample = (now, current)
        if previous is None or now <= previous[0]:
            return
        elapsed = now - previous[0]
        sample: dict[str, Any] = {"time": iso(now), "timestamp": round(now, 3)}
        for name in COUNTERS:
            sample[f"{name}_rate"] = round(max(0, current[name] - previous[1][name]) / elapsed,
                                           1)
        running = instance.status == "running"
        sample["connections"] = int(instance.report.get("connections") or 0) if running else 0
        sample["ping"] = instance.report.get("ping_ms") if running else None
        instance.history.append(sample)

    def traffic(self, instance: Instance, window: float) -> list[dict[str, Any]]:
        since = self.reactor.seconds() - window
        return [s for s in instance.history if s["timestamp"] >= since]

    # -- views -------------------------------------------------------------

    def counters(self, instance: Instance) -> dict[str, int]:
        return {name: instance.base[name] + int(instance.report.get(name) or 0)
                for name in COUNTERS}

    def describe(self, instance: Instance) -> dict[str, Any]:
        running = instance.status == "running"
        now = self.reactor.seconds()
        data: dict[str, Any] = {
            "id": instance.id,
            "type": instance.type,
            "url": instance.url,
            "status": instance.status,
            "created_at": iso(instance.created_at),
            "started_at": iso(instance.started_at),
            "stopped_at": iso(instance.stopped_at),
            "restarted_at": iso(instance.restarted_at),
            "uptime": int(now - instance.started_at) if running and instance.started_at else 0,
            "connections": int(instance.report.get("connections") or 0) if running else 0,
            "udp_sessions": int(instance.report.get("udp_sessions") or 0) if running else 0,
            "pool_size": int(instance.report.get("pool") or 0) if running else 0,
            "ping": instance.report.get("ping_ms") if running else None,
            "tunnel": instance.report.get("state") if running else None,
            "mode": (instance.report.get("mode") or None) if running else None,
            "refused": int(instance.report.get("refused") or 0) if running else 0,
            "pid": instance.child.pid if running and instance.child is not None else None,
            "error": instance.error,
            "alias": instance.alias,
            "tags": dict(instance.tags),
            "restart": instance.auto_restart,
            "restarts": instance.restarts,
            "peer": dict(instance.peer),
        }
        data.update(self.counters(instance))
        return data

    def count_by_status(self) -> dict[str, int]:
        counts = {"running": 0, "stopped": 0, "error": 0}
        for instance in self.instances.values():
            counts[instance.status] = counts.get(instance.status, 0) + 1
        return counts

    async def shutdown(self) -> None:
        """Stop every instance at once (SIGTERM, then SIGKILL after the grace); what
        they were meant to be doing is kept, so the next start brings them back."""
        if self._tick.running:
            self._tick.stop()
        self.tick()
        for instance in self.instances.values():
            self._cancel_auto_restart(instance)
        await gatherResults([Deferred.fromCoroutine(self.stop(instance, keep_desired=True))
                             for instance in list(self.instances.values())])
        for instance in self.instances.values():
            self._save(instance)


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        try:
            d.callback(None)
        except AlreadyCalled:
            pass
