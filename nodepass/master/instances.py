"""The master's instances: what each one is, and starting, stopping, restarting them.

Operations on one instance are serialised (a DeferredLock each), and every state
reported to the API is what the child process said or did, not a guess.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.error import AlreadyCalled

from nodepass import logs
from nodepass.master.supervisor import ChildProcess, describe_exit, spawn_child
from nodepass.tunables import Tunables
from nodepass.url import ClientConfig, MasterConfig, ServerConfig, URLError, format_url, parse

READY_TIMEOUT = 5.0
KILL_GRACE = 2.0
COUNTERS = ("tcp_in", "tcp_out", "udp_in", "udp_out")


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
                 environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.master = master
        self.tunables = tunables
        self.environ = {k: v for k, v in environ.items() if k != "NODEPASS_API_KEY"}
        self.instances: dict[str, Instance] = {}
        self._issued: set[str] = set()
        self.listeners: list[Callable[[str, Instance], None]] = []

    # -- identity ----------------------------------------------------------

    def new_id(self) -> str:
        while True:
            candidate = "ins_" + secrets.token_hex(4)
            if candidate not in self._issued:
                self._issued.add(candidate)
                return candidate

    def get(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise InstanceError("INSTANCE_NOT_FOUND", 404,
                                f"no instance with id {instance_id!r}") from None

    def _changed(self, kind: str, instance: Instance) -> None:
        for listener in self.listeners:
            listener(kind, instance)

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

    async def create(self, url: str) -> Instance:
        config = self.parse_instance_url(url)
        instance = Instance(self.new_id(), config, self.reactor.seconds())
        self.instances[instance.id] = instance
        self.log.info("instance {id} created: {url}", id=instance.id, url=instance.url)
        self._changed("create", instance)
        await self.start(instance)
        return instance

    # -- lifecycle ---------------------------------------------------------

    async def start(self, instance: Instance) -> None:
        await instance.lock.run(self._start, instance)

    async def stop(self, instance: Instance) -> None:
        await instance.lock.run(self._stop, instance)

    async def restart(self, instance: Instance) -> None:
        async def both() -> None:
            await self._stop(instance)
            await self._start(instance)
            instance.restarted_at = instance.started_at

        await instance.lock.run(lambda: Deferred.fromCoroutine(both()))

    async def delete(self, instance: Instance) -> None:
        async def gone() -> None:
            await self._stop(instance)
            self.instances.pop(instance.id, None)
            self.log.info("instance {id} deleted", id=instance.id)
            self._changed("delete", instance)

        await instance.lock.run(lambda: Deferred.fromCoroutine(gone()))

    def _start(self, instance: Instance) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start_now(instance))

    async def _start_now(self, instance: Instance) -> None:
        if instance.child is not None and instance.child.running:
            return
        instance.error = None
        instance.last_fatal = None
        instance.report = {}
        instance.stopping = False
        instance.ready = Deferred()
        instance.exited = Deferred()
        child = ChildProcess(instance.id, lambda e: self._event(instance, e),
                             lambda code, sig, tail: self._exited(instance, code, sig, tail))
        instance.child = child
        try:
            spawn_child(self.reactor, instance.url, self.environ, child)
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
            self._changed("update", instance)
        if instance.ready is not None:
            _fire(instance.ready)
        if instance.exited is not None:
            _fire(instance.exited)

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
            "pid": instance.child.pid if running and instance.child is not None else None,
            "error": instance.error,
        }
        data.update(self.counters(instance))
        return data

    async def shutdown(self) -> None:
        """Stop every instance at once (SIGTERM, then SIGKILL after the grace)."""
        await gatherResults([Deferred.fromCoroutine(self.stop(instance))
                             for instance in list(self.instances.values())])


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        try:
            d.callback(None)
        except AlreadyCalled:
            pass
