"""``GET /v1/metrics``: the Prometheus text exposition of the master and its instances."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodepass import __version__
from nodepass.master.instances import COUNTERS
from nodepass.master.registry import Registry

STATUSES = ("running", "stopped", "error")


class _Collector:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        registry = self.registry
        labels = ["id", "type", "alias"]
        traffic = CounterMetricFamily("nodepass_instance_bytes",
                                      "Bytes carried, by protocol and direction",
                                      labels=[*labels, "protocol", "direction"])
        connections = GaugeMetricFamily("nodepass_instance_connections",
                                        "Active relayed connections", labels=labels)
        udp_sessions = GaugeMetricFamily("nodepass_instance_udp_sessions",
                                         "Active UDP sessions", labels=labels)
        pool = GaugeMetricFamily("nodepass_instance_pool_size", "Idle pooled connections",
                                 labels=labels)
        ping = GaugeMetricFamily("nodepass_instance_ping_milliseconds",
                                 "Last tunnel heartbeat round trip", labels=labels)
        status = GaugeMetricFamily("nodepass_instance_status",
                                   "1 for the instance's current status",
                                   labels=[*labels, "status"])
        restarts = CounterMetricFamily("nodepass_instance_restarts",
                                       "Automatic restarts", labels=labels)
        refused = CounterMetricFamily("nodepass_instance_refused",
                                      "Connections and UDP sessions refused by the slot limit "
                                      "(or notcp/noudp) since the instance started",
                                      labels=labels)
        for instance in registry.instances.values():
            data = registry.describe(instance)
            values = [instance.id, instance.type, instance.alias or ""]
            for name in COUNTERS:
                protocol, direction = name.split("_")
                traffic.add_metric([*values, protocol, direction], data[name])
            connections.add_metric(values, data["connections"])
            udp_sessions.add_metric(values, data["udp_sessions"])
            pool.add_metric(values, data["pool_size"])
            if data["ping"] is not None:
                ping.add_metric(values, data["ping"])
            for name in STATUSES:
                status.add_metric([*values, name], 1 if data["status"] == name else 0)
            restarts.add_metric(values, data["restarts"])
            refused.add_metric(values, data["refused"])
        yield from (traffic, connections, udp_sessions, pool, ping, status, restarts, refused)

        uptime = GaugeMetricFamily("nodepass_master_uptime_seconds", "Seconds since start")
        uptime.add_metric([], registry.reactor.seconds() - registry.started_at)
        yield uptime
        counts = GaugeMetricFamily("nodepass_master_instances", "Instances by status",
                                   labels=["status"])
        for name, count in registry.count_by_status().items():
            counts.add_metric([name], count)
        yield counts
        info = GaugeMetricFamily("nodepass_master_info", "The master's version",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def exposition(registry: Registry) -> bytes:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_Collector(registry))
    return generate_latest(collectors)
