"""Instance processes: ``python -m nodepass URL`` children of the master.

Each child gets one end of a Unix socket pair as fd 3 (``NODEPASS_STATUS_FD``)
and sends its state, its counters and its log events there as JSON records; the
master re-emits the log events with the instance id.  What the child prints
outside its log (a Python crash on stderr, say) is relayed too, stderr at error
level.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import LogLevel
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.statuschannel import ENV, MAX_RECORD

_LEVELS = {"DEBUG": LogLevel.debug, "INFO": LogLevel.info, "WARN": LogLevel.warn,
           "ERROR": LogLevel.error, "FATAL": LogLevel.critical}


class StatusReceiver(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_RECORD

    def __init__(self, child: ChildProcess) -> None:
        self.child = child

    def lineReceived(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return
        if event["type"] == "log":
            self.child.log_record(event)
        else:
            self.child.on_event(event)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.child.channel_closed()


class ChildProcess(ProcessProtocol):
    """One running instance process."""

    log = logs.logger("nodepass.master")

    def __init__(self, instance_id: str, on_event: Callable[[dict[str, Any]], None],
                 on_exit: Callable[[int | None, int | None, list[str]], None],
                 on_log: Callable[[str, str, str], None] | None = None) -> None:
        self.instance_id = instance_id
        self.on_event = on_event
        self.on_exit = on_exit
        self.on_log = on_log
        self._partial = {1: b"", 2: b""}
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.running = False
        self.host_lost = False  # it ended because its host (process) did
        self.alone = False  # it asks for a host of its own
        self._exit: tuple[int | None, int | None] | None = None
        self._channel_open = True

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    def connectionMade(self) -> None:
        self.running = True

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._partial:
            return
        buffered = self._partial[fd] + data
        *lines, rest = buffered.split(b"\n")
        self._partial[fd] = rest[-8192:]
        for raw in lines:
            self._relay_line(fd, raw.decode("utf-8", "replace"))

    def _relay_line(self, fd: int, line: str) -> None:
        """What the child printed outside its log (its logs come as records): stderr
        (a Python crash, say) at error level, stdout at info."""
        if fd == 2:
            self.stderr_tail.append(line)
        self._relay(LogLevel.error if fd == 2 else LogLevel.info, line, line)

    def log_record(self, record: dict[str, Any]) -> None:
        """One of the child's log events, as it sent it on the status channel."""
        text, line = record.get("text"), record.get("line")
        if isinstance(text, str) and isinstance(line, str):
            self._relay(_LEVELS.get(str(record.get("level")), LogLevel.info), text, line)

    def _relay(self, level: LogLevel, text: str, line: str) -> None:
        self.log.emit(level, "{text}", text=text, instance_id=self.instance_id)
        if self.on_log is not None:
            self.on_log("fatal" if level is LogLevel.critical else level.name, text, line)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self._exit = (getattr(reason.value, "exitCode", None),
                      getattr(reason.value, "signal", None))
        self._maybe_ended()

    def channel_closed(self) -> None:
        self._channel_open = False
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        # Both the exit and the end of the status channel: then every event the
        # child sent (its fatal reason, say) has been read.
        if self._exit is not None and not self._channel_open:
            code, sig = self._exit
            self._exit = None
            self.on_exit(code, sig, list(self.stderr_tail))

    def signal(self, sig: int) -> None:
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(sig)
            except ProcessExitedAlready:
                pass


Spawner = Callable[[Any, str, Mapping[str, str], "ChildProcess"], Any]


def spawn_child(reactor: Any, url: str, environ: Mapping[str, str],
                child: ChildProcess) -> ChildProcess:
    """Start ``python -m nodepass -`` with its status channel on fd 3 and its URL on
    standard input: an argument would show the tunnel key to every user of the machine
    (``ps``, ``/proc/PID/cmdline``)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(environ)
    env[ENV] = "3"
    try:
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "nodepass", "-"], env=env,
            childFDs={0: "w", 1: "r", 2: "r", 3: child_end.fileno()},
        )
    finally:
        child_end.close()
    process.writeToChild(0, url.encode() + b"\n")
    process.closeChildFD(0)
    adopt(reactor, parent_end, StatusReceiver(child))
    parent_end.close()
    return child


def adopt(reactor: Any, sock: socket.socket, protocol: Any) -> Any:
    """Run ``protocol`` on the connected Unix socket ``sock`` (the reactor takes a
    duplicate of its descriptor: the caller closes ``sock``); returns ``protocol``."""
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX,
                                  Factory.forProtocol(lambda: protocol))
    return protocol


def describe_exit(code: int | None, sig: int | None) -> str:
    if sig is not None:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {code}"
