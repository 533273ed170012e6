"""Every REPORT_INTERVAL an instance logs (at debug) a snapshot of its state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService

from nodepass import logs
from nodepass.stats import Report

log = logs.logger("nodepass")


def log_report(report: Report) -> None:
    ping = "-" if report.ping_ms is None else f"{report.ping_ms:g}ms"
    log.debug(
        "report: {state} pool={pool} connections={connections} ping={ping} "
        "tcp_in={tcp_in} tcp_out={tcp_out} udp_in={udp_in} udp_out={udp_out} "
        "udp_sessions={udp_sessions} udp_dropped={udp_dropped} refused={refused} mode={mode} "
        "transport={transport}",
        ping=ping, report=report.as_dict(), **{k: v for k, v in report.as_dict().items()
                                               if k != "ping_ms"},
    )


def reporter(clock: Any, snapshot: Callable[[], Report], interval: float) -> TimerService:
    service = TimerService(interval, lambda: log_report(snapshot()))
    service.clock = clock
    return service
