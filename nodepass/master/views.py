"""Instances as the seed dialect shows them (docs/api.md, the fields of an instance)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodepass.master.instances import Instance, iso


def describe(instance: Instance, now: float) -> dict[str, Any]:
    running = instance.running
    report = instance.report if running else {}
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
        "connections": int(report.get("connections") or 0),
        "udp_sessions": int(report.get("udp_sessions") or 0),
        "pool_size": int(report.get("pool") or 0),
        "ping": report.get("ping_ms"),
        "tunnel": report.get("state"),
        "mode": report.get("mode") or None,
        "transport": report.get("transport") or None,
        "refused": int(report.get("refused") or 0),
        "pid": instance.pid,
        "error": instance.error,
        "alias": instance.alias,
        "tags": dict(instance.tags),
        "restart": instance.auto_restart,
        "restarts": instance.restarts,
        "peer": dict(instance.peer),
        "node": instance.node,
        "stale": instance.stale,
    }
    data.update(instance.counters())
    return data


def count_by_status(instances: Iterable[Instance]) -> dict[str, int]:
    counts = {"running": 0, "stopped": 0, "error": 0}
    for instance in instances:
        counts[instance.status] = counts.get(instance.status, 0) + 1
    return counts
