"""Instances and events as NodePass masters write them (../shared/NODEPASS-API.md).

Field names and types are Go's, every field always present and never null (panels
crash on a null ``alias`` or ``meta``).  ``config`` is the URL with every parameter
written out, the query sorted by name and durations in Go's form, as NodePass writes
it; it parses back to the same instance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from nodepass.master.instances import PEER_FIELDS, Instance
from nodepass.master.registry import Registry
from nodepass.tunables import Tunables, go_duration
from nodepass.url import ClientConfig, ServerConfig, format_url

KEY_RECORD_ID = "********"
EVENT_NAME = "instance"
RETRY_MS = 3000
_ZERO_COUNTS = {"mode": 0, "ping": 0, "pool": 0, "tcps": 0, "udps": 0,
                "tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}
# A reported mode as NodePass numbers it, per scheme (mode=0 resolved).
_MODE_NUMBERS = {("server", "reverse"): 1, ("server", "forward"): 2,
                 ("client", "single-end"): 1, ("client", "reverse"): 2,
                 ("client", "forward"): 2}


def short_id(instance_id: str) -> str:
    """``ins_a1b2c3d4`` -> ``a1b2c3d4``: NodePass ids are 8 hex digits."""
    return instance_id.removeprefix("ins_")


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def config_url(config: ServerConfig | ClientConfig, tunables: Tunables) -> str:
    """NodePass's ``config``: every parameter with the value in force."""
    values: dict[str, Any] = {
        "log": config.log, "mode": config.mode, "rate": config.rate, "slot": config.slot,
        "read": go_duration(config.read), "proxy": config.proxy, "dial": config.dial,
        "notcp": config.notcp, "noudp": config.noudp, "dns": go_duration(config.dns),
        "block": config.block or "0",
    }
    if isinstance(config, ServerConfig):
        values.update(tls=config.tls, max=config.max or tunables.max_pool_capacity,
                      type=config.type)
        if config.tls == 2:
            values.update(crt=config.crt, key=config.key)
    else:
        values["min"] = config.min or tunables.min_pool_capacity
        optional = {"max": config.max, "sni": config.sni, "ca": config.ca}
        values.update({k: v for k, v in optional.items() if v is not None})
    head = format_url(config).partition("?")[0]
    query = "&".join(f"{name}={quote(str(values[name]), safe='/-._~:')}"
                     for name in sorted(values))
    return f"{head}?{query}"


def run_mode(instance: Instance) -> int:
    """The mode in force as NodePass numbers it: what the running instance reported
    (mode=0 resolved), else what its URL asks for."""
    if instance.status == "running":
        reported = instance.report.get("mode")
        number = _MODE_NUMBERS.get((instance.type, reported))
        if number is not None:
            return number
    return instance.config.mode


def np_instance(registry: Registry, instance: Instance) -> dict[str, Any]:
    running = instance.status == "running"
    report = instance.report if running else {}
    counters = instance.counters()
    ping = report.get("ping_ms")
    return {
        "id": short_id(instance.id),
        "alias": instance.alias or "",
        "type": instance.type,
        "status": instance.status,
        "url": instance.url,
        "config": config_url(instance.config, registry.tunables),
        "restart": instance.auto_restart,
        "meta": {"peer": {k: instance.peer.get(k, "") for k in PEER_FIELDS},
                 "tags": dict(instance.tags)},
        "mode": run_mode(instance),
        "ping": round(ping) if isinstance(ping, int | float) else 0,
        "pool": int(report.get("pool") or 0),
        "tcps": int(report.get("connections") or 0),
        "udps": int(report.get("udp_sessions") or 0),
        "tcprx": counters["tcp_in"],
        "tcptx": counters["tcp_out"],
        "udprx": counters["udp_in"],
        "udptx": counters["udp_out"],
        "node": instance.node,
        "stale": instance.stale,
    }


def key_record(registry: Registry, key: str | None) -> dict[str, Any]:
    """The API key as NodePass shows it: a pseudo-instance whose ``url`` is the key,
    ``config`` the master id and ``alias`` the master's alias."""
    return {"id": KEY_RECORD_ID, "alias": registry.alias, "type": "", "status": "",
            "url": key or "", "config": registry.master_id, "restart": False,
            "meta": {"peer": dict.fromkeys(PEER_FIELDS, ""), "tags": {}}, **_ZERO_COUNTS,
            "node": registry.node, "stale": False}


def event_chunk(event_id: int | None, data: Mapping[str, Any]) -> bytes:
    """One SSE event named ``instance``; every NodePass panel listens for that name."""
    body = json.dumps(data, separators=(",", ":"))
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {EVENT_NAME}\ndata: {body}\n\n".encode()


def event_data(registry: Registry, kind: str, record: dict[str, Any] | None,
               logs: str = "") -> dict[str, Any]:
    return {"type": kind, "time": rfc3339(registry.reactor.seconds()), "instance": record,
            "logs": logs}


def opening() -> bytes:
    return f"retry: {RETRY_MS}\n\n".encode()
