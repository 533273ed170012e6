"""What the master knows of each instance: its URL, intent, metadata, the last report
of its process, and the cumulative counters.  Behaviour lives elsewhere: lifecycle.py
(its process), restarts.py (its restart policy), history.py (its traffic history),
views.py (the seed dialect's view of it), registry.py (all of them together)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock

from nodepass.url import (
    ClientConfig,
    MasterConfig,
    ServerConfig,
    URLError,
    format_url,
    given_parameters,
    parse,
)

COUNTERS = ("tcp_in", "tcp_out", "udp_in", "udp_out")
PEER_FIELDS = ("sid", "type", "alias")  # NodePass's meta.peer


class InstanceError(Exception):
    """A request the registry refuses: ``code`` and ``status`` for the API."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message


@lru_cache(maxsize=8192)  # (a list of 500 instances formats ~2,000 of them, the same each time)
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
    report: dict[str, Any] = field(default_factory=dict)  # its process's last report
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    peer: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PEER_FIELDS, ""))
    auto_restart: bool = False
    restarts: int = 0
    desired: str = "running"  # what it is meant to be doing: running or stopped
    # the lifecycle's: its process, and one operation at a time on it
    child: Any = None
    lock: DeferredLock = field(default_factory=DeferredLock)
    exited: Deferred[None] | None = None
    ready: Deferred[None] | None = None
    last_fatal: str | None = None
    stopping: bool = False
    # the restart policy's; host_lost: its last end was its host's (a crash domain's)
    failures: int = 0
    restart_call: Any = None
    host_lost: bool = False
    host_losses: int = 0  # since its last healthy run: from QUARANTINE on, a host of its own
    # the fleet's: the node (master id) that runs it; for another node's instance, its
    # process id as last told and whether that node has stopped telling (offline)
    node: str = ""
    seen_pid: int | None = None
    stale: bool = False
    deleted: bool = False  # being deleted: nothing may start or change it again
    # its URL as last formatted, and for which config (configs are frozen)
    _url: tuple[Any, str] | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        if self._url is None or self._url[0] is not self.config:
            self._url = (self.config, format_url(self.config))
        return self._url[1]

    @property
    def pid(self) -> int | None:
        if not self.running:
            return None
        return self.child.pid if self.child is not None else self.seen_pid

    @property
    def type(self) -> str:
        return self.config.scheme

    @property
    def running(self) -> bool:
        return self.status == "running"

    def counters(self) -> dict[str, int]:
        """Cumulative bytes: what earlier processes counted, plus the current one's."""
        return {name: self.base[name] + int(self.report.get(name) or 0) for name in COUNTERS}

    def reset_counters(self) -> None:
        """Zero: the current process's count so far is taken off from here on."""
        for name in COUNTERS:
            self.base[name] = -int(self.report.get(name) or 0)


_SNAPSHOT_TIMES = ("created_at", "started_at", "stopped_at", "restarted_at")


def snapshot(instance: Instance) -> dict[str, Any]:
    """What another master needs to show ``instance`` as this one does (fleet.py)."""
    return {
        "id": instance.id, "url": instance.url, "status": instance.status,
        "error": instance.error, "desired": instance.desired, "alias": instance.alias,
        "tags": instance.tags, "peer": instance.peer, "restart": instance.auto_restart,
        "restarts": instance.restarts, "counters": instance.counters(), "pid": instance.pid,
        "report": {k: v for k, v in instance.report.items() if k not in COUNTERS},
        **{name: getattr(instance, name) for name in _SNAPSHOT_TIMES},
    }


def from_snapshot(data: dict[str, Any], node: str, known: Instance | None = None
                  ) -> Instance:
    """Another node's instance as it told it; ``known`` (the last one) lends its parsed
    URL when that has not changed.  Raises ValueError (URLError) for a URL this nodepass
    cannot read."""
    if known is not None and known.url == data["url"]:
        config = known.config
    else:
        config = parse(data["url"], files=False)  # its files are its node's
        if isinstance(config, MasterConfig):
            raise ValueError("a master URL")
    instance = Instance(
        data["id"], config, float(data["created_at"]), status=str(data["status"]),
        error=data.get("error"), alias=data.get("alias"), tags=dict(data.get("tags") or {}),
        auto_restart=bool(data.get("restart")), restarts=int(data.get("restarts") or 0),
        desired=str(data.get("desired") or "stopped"), node=node,
        seen_pid=data.get("pid"), report=dict(data.get("report") or {}))
    instance.started_at, instance.stopped_at, instance.restarted_at = (
        data.get(name) for name in _SNAPSHOT_TIMES[1:])
    instance.base.update({k: int((data.get("counters") or {}).get(k, 0)) for k in COUNTERS})
    instance.peer.update({k: str((data.get("peer") or {}).get(k, "")) for k in PEER_FIELDS})
    return instance


def gone(instance: Instance) -> InstanceError:
    return InstanceError("INSTANCE_NOT_FOUND", 404, f"instance {instance.id} was deleted")


def parse_instance_url(text: str, master: MasterConfig, files: bool = True
                       ) -> ServerConfig | ClientConfig:
    """A server or client URL, with what it leaves out inherited from the master
    (``files=False``: for another node, whose files are not looked for here)."""
    try:
        config = parse(text, files)
    except URLError as e:
        raise InstanceError("INVALID_URL", 400, str(e)) from None
    if isinstance(config, MasterConfig):
        raise InstanceError("INVALID_URL", 400,
                            "scheme: a master cannot run another master (allowed: server, "
                            "client)")
    return inherit(config, given_parameters(text), master)


def inherit(config: ServerConfig | ClientConfig, given: frozenset[str],
            master: MasterConfig) -> ServerConfig | ClientConfig:
    """Fill what the URL did not set from the master: ``log``, and for servers ``tls``
    (with ``crt``/``key`` when tls=2), as the NodePass master does."""
    values: dict[str, Any] = {}
    if "log" not in given:
        values["log"] = master.log
    if isinstance(config, ServerConfig) and "tls" not in given:
        values.update(tls=master.tls, crt=master.crt, key=master.key)
    return replace(config, **values)
