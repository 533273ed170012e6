"""Counters an instance reports: traffic per protocol and direction, and gauges."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Traffic:
    """Cumulative bytes.  ``in``: read from this end's target-side connections
    (users at the server, the local service at the client); ``out``: written to them."""

    tcp_in: int = 0
    tcp_out: int = 0
    udp_in: int = 0
    udp_out: int = 0

    def add_tcp_in(self, n: int) -> None:
        self.tcp_in += n

    def add_tcp_out(self, n: int) -> None:
        self.tcp_out += n

    def add_udp_in(self, n: int) -> None:
        self.udp_in += n

    def add_udp_out(self, n: int) -> None:
        self.udp_out += n


@dataclass(frozen=True)
class Report:
    """One REPORT_INTERVAL snapshot of an instance."""

    state: str
    pool: int
    connections: int
    ping_ms: float | None
    tcp_in: int
    tcp_out: int
    udp_in: int
    udp_out: int
    udp_sessions: int = 0
    udp_dropped: int = 0
    refused: int = 0  # connections and UDP sessions refused by the slot limit (or notcp/noudp)
    mode: str = ""  # reverse, forward or single-end
    transport: str = ""  # the pool's: tcp, quic, websocket or http2 (none in single-end)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def snapshot(unconnected: str, pool: int, control: Any, flows: Any, mode: str,
             transport: str = "") -> Report:
    """A report from an instance's :class:`~nodepass.tunnel.flows.Flows`: ``connected``
    with the ping while ``control`` (its session's ControlSession) is up, else
    ``unconnected`` (waiting, connecting, forwarding)."""
    traffic = flows.traffic
    state, ping = ("connected", control.rtt_ms) if control is not None else (unconnected, None)
    return Report(state, pool, len(flows.relays), ping, traffic.tcp_in, traffic.tcp_out,
                  traffic.udp_in, traffic.udp_out, len(flows.udp_sessions), flows.udp_dropped(),
                  flows.refused, mode, transport)
