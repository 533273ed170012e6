"""An instance's structured channel to the master that started it.

The master passes one end of a Unix socket pair as a file descriptor and names it
in ``NODEPASS_STATUS_FD``.  The instance writes one JSON object per line:

- ``{"type": "ready"}`` once it listens (server) or has started dialing (client);
- ``{"type": "report", "state": ..., "pool": ..., "connections": ..., "ping_ms": ...,
  "tcp_in": ..., "tcp_out": ..., "udp_in": ..., "udp_out": ...}`` every REPORT_INTERVAL;
- ``{"type": "fatal", "message": ...}`` when it cannot go on;
- ``{"type": "log", "level": "INFO", "text": ..., "line": ...}`` for each log event (the
  master re-emits it with the instance id; ``line`` is it as the instance would print
  it).  A line the socket has no room for is dropped and counted, never waited for.

When the master goes away (the socket closes), the instance stops: no orphans.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.stats import Report

ENV = "NODEPASS_STATUS_FD"
MAX_RECORD = 4096  # the master reads lines up to this length
TEXT_LIMIT = 1800  # of a log record's text and line, so that both fit


class _Channel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_RECORD

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost

    def lineReceived(self, line: bytes) -> None:
        pass  # the master sends nothing yet

    def connectionLost(self, reason: Failure) -> None:
        self.on_lost()


class StatusChannel(Service):
    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, fd: int, snapshot: Callable[[], Report],
                 interval: float, on_master_gone: Callable[[], None]) -> None:
        self.reactor = reactor
        self.fd = fd
        self.snapshot = snapshot
        self.interval = interval
        self.on_master_gone = on_master_gone
        self.protocol: _Channel | None = None
        self._loop = LoopingCall(self.report)
        self._loop.clock = reactor
        self._first: Any = None
        self._stopping = False
        self.dropped_logs = 0
        self._unsent = b""

    def startService(self) -> None:
        super().startService()
        # The reactor only reads (to notice the master going away); events are
        # written straight to the descriptor, so a fatal one is out before exit.
        self.protocol = _Channel(self._lost)
        factory = Factory.forProtocol(lambda: self.protocol)
        self.reactor.adoptStreamConnection(self.fd, socket.AF_UNIX, factory)
        # Reports fall on whole multiples of the interval on the clock: the instances
        # of one host report in one wake-up of its reactor, not each in its own.
        delay = self.interval - self.reactor.seconds() % self.interval
        self._first = self.reactor.callLater(delay, self._loop.start, self.interval)

    def send(self, **event: Any) -> bool:
        """Write one record now; False when it was dropped.  What the socket takes only
        in part is finished before the next record (at most one record waits)."""
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_RECORD:
            return False
        if self._unsent:
            self._unsent = self._write(self._unsent)
            if self._unsent:
                return False  # the master is not reading: dropped, not queued
        self._unsent = self._write(line)
        return True

    def _write(self, data: bytes) -> bytes:
        """What of ``data`` the socket did not take."""
        if self.fd < 0:
            return b""  # closed: its number may be another socket's by now
        try:
            return data[os.write(self.fd, data):]
        except BlockingIOError:
            return data
        except OSError:
            return b""  # the master is gone; _lost stops us

    def log_record(self, event: dict[str, Any]) -> None:
        """A log observer: each event, as a structured record."""
        if self.dropped_logs:
            dropped, self.dropped_logs = self.dropped_logs, 0
            self.send(type="log", level="WARN", text=f"{dropped} log lines were dropped "
                      "(the master was not reading)", line="")
        if not self.send(type="log", level=logs.level_label(event),
                         text=logs.message_text(event)[:TEXT_LIMIT],
                         line=logs.format_line(event)[:TEXT_LIMIT]):
            self.dropped_logs += 1

    def ready(self) -> None:
        self.send(type="ready")

    def fatal(self, message: str) -> None:
        self.send(type="fatal", message=message)

    def report(self) -> None:
        self.send(type="report", **self.snapshot().as_dict())

    def _lost(self) -> None:
        if not self._stopping:
            self.log.warn("the master is gone: stopping")
            self.on_master_gone()

    def stopService(self) -> None:
        self._stopping = True
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        if self._loop.running:
            self._loop.stop()
        try:
            self.report()
        finally:  # (the master waits for this end of file to hear how the instance ended)
            if self.protocol is not None and self.protocol.transport is not None:
                self.protocol.transport.loseConnection()
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
