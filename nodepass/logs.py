"""Logging: levels from the URL, one line per event, UTC timestamps.

Every nodepass module logs through a :class:`twisted.logger.Logger` made by
:func:`logger`; those events pass :data:`gate` (the URL's ``log`` level) before
they reach the global publisher, so the level filters under the ``nodepass``
command and under twistd alike.  The ``nodepass`` command also formats lines
itself (:func:`line_observer`)::

    2025-04-13 10:25:15.123  INFO  tunnel listening on 0.0.0.0:10101
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any
from weakref import WeakSet

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS: dict[str, LogLevel | None] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
    "none": None,
}

_LABELS = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "FATAL",
}


class LevelGate:
    """A log predicate passing events at or above a level; ``none`` passes nothing."""

    def __init__(self, level: str = "info") -> None:
        self.minimum: LogLevel | None = LEVELS[level]

    def set_level(self, level: str) -> None:
        self.minimum = LEVELS[level]

    def passes(self, level: LogLevel) -> bool:
        return self.minimum is not None and level >= self.minimum

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        if self.minimum is None or level < self.minimum:
            return PredicateResult.no
        return PredicateResult.maybe


def _escape(code: int) -> str:
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(code, f"\\x{code:02x}")


# Control characters (C0, DEL, C1) as visible escapes: a peer's address, name or
# request line cannot rewrite a log line (\r), forge one (\n) or drive a terminal (ESC).
_CONTROLS = {code: _escape(code) for code in (*range(0x20), *range(0x7F, 0xA0))}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``)."""
    return text.translate(_CONTROLS)


@implementer(ILogObserver)
class _EscapingFields:
    """Escapes control characters in an event's string fields (``log_*`` keys aside)
    before it is published, so every observer — ours, twistd's log file — gets them
    escaped."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        for name, value in event.items():
            if type(value) is str and not name.startswith("log_"):
                event[name] = value.translate(_CONTROLS)
        self._observer(event)


class Scope:
    """One instance among several in a process (a host's, see nodepass/master/host.py):
    its own log level and log sink.  The host's reactor runs each piece of an instance's
    code through :meth:`run`; once the scope has ended, nothing more of it runs."""

    def __init__(self) -> None:
        self.gate = LevelGate()
        self.sink: ILogObserver | None = None
        self.ended = False
        self.descriptors: WeakSet[Any] = WeakSet()  # every one it ever watched (a host's)

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.ended:
            return None
        return self.enter(f, *args, **kwargs)

    def enter(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``f`` in this scope, ended or not (to close what it left)."""
        token = current_scope.set(self)
        try:
            return f(*args, **kwargs)
        finally:
            current_scope.reset(token)


current_scope: ContextVar[Scope | None] = ContextVar("nodepass_scope", default=None)


def outside_scopes(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``f`` as the process's own, whatever instance's code called it."""
    token = current_scope.set(None)
    try:
        return f(*args, **kwargs)
    finally:
        current_scope.reset(token)


class _CurrentGate:
    """The level gate in force: the current instance's in a host, else the process's."""

    def __init__(self) -> None:
        self.process = LevelGate()

    def _gate(self) -> LevelGate:
        scope = current_scope.get()
        return self.process if scope is None else scope.gate

    @property
    def minimum(self) -> LogLevel | None:
        return self._gate().minimum

    @minimum.setter
    def minimum(self, level: LogLevel | None) -> None:
        self._gate().minimum = level

    def set_level(self, level: str) -> None:
        self._gate().set_level(level)

    def passes(self, level: LogLevel) -> bool:
        return self._gate().passes(level)

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        return self._gate()(event)


gate = _CurrentGate()
_observer = FilteringLogObserver(_EscapingFields(globalLogPublisher), [gate])


def logger(namespace: str | None = None) -> Logger:
    """A Logger whose events pass the process's level gate."""
    return Logger(namespace=namespace, observer=_observer)


def format_line(event: dict[str, Any]) -> str:
    """``YYYY-MM-DD hh:mm:ss.mmm  LEVEL  [instance] message`` in UTC, one line."""
    when = datetime.fromtimestamp(event.get("log_time", 0), UTC)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    label = level_label(event)
    text = message_text(event)
    instance = event.get("instance_id")
    if instance:
        text = f"[{instance}] {text}"
    return f"{stamp}  {label:<5}  {text}"


def line_observer(stream: IO[str]) -> ILogObserver:
    """An observer writing :func:`format_line` lines to ``stream``, flushed per line."""

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        stream.write(format_line(event) + "\n")
        stream.flush()

    return observe


def quiet_twisted(event: dict[str, Any]) -> PredicateResult:
    """Twisted's own chatter (factory starting, retry scheduling) below warn is dropped:
    nodepass logs those events itself, in its own words."""
    namespace = event.get("log_namespace", "")
    own = namespace.startswith("nodepass")
    if not own and event.get("log_level", LogLevel.info) < LogLevel.warn:
        return PredicateResult.no
    return PredicateResult.maybe


def start_logging(level: str, stream: IO[str], sink: ILogObserver | None = None) -> None:
    """Begin process-wide logging for the ``nodepass`` command: lines to ``stream``, or,
    when the process reports to a master, each event to ``sink`` instead."""
    gate.set_level(level)
    observer = sink if sink is not None else line_observer(stream)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [gate, quiet_twisted])],
        redirectStandardIO=False,
    )


def scoped_observer(stream: IO[str]) -> ILogObserver:
    """For a process whose instances each log to their own sink (a host): an event goes
    to the sink of the scope it was emitted in, past that scope's level; what is
    emitted outside every scope, to ``stream`` as lines."""
    lines = line_observer(stream)

    @implementer(ILogObserver)
    def to_scope(event: dict[str, Any]) -> None:
        scope = current_scope.get()
        if scope is None:
            lines(event)
        elif scope.sink is not None and not scope.ended:
            scope.sink(event)

    return FilteringLogObserver(to_scope, [gate, quiet_twisted])


def start_scoped_logging(stream: IO[str]) -> None:
    """Begin logging to :func:`scoped_observer` (in a host)."""
    globalLogBeginner.beginLoggingTo([scoped_observer(stream)], redirectStandardIO=False)


def message_text(event: dict[str, Any]) -> str:
    """An event's message on one line, with its failure's reason (no stamp, no level)."""
    text = formatEvent(event).replace("\n", " | ")
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()}"
    return escape_controls(text)


def level_label(event: dict[str, Any]) -> str:
    return _LABELS.get(event.get("log_level", LogLevel.info), "INFO")


class Throttle:
    """Lets one event per ``period`` seconds through and counts the ones held back,
    so a flood (wrong keys, refused connections) cannot fill the disk."""

    def __init__(self, clock: Any, period: float = 10.0) -> None:
        self._clock = clock
        self._period = period
        self._next = float("-inf")
        self._held = 0

    def allow(self) -> int | None:
        """None while throttled; otherwise how many were held back since the last one."""
        now = self._clock.seconds()
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self._period
        return held

    def warn(self, log: Logger, message: str, **fields: Any) -> None:
        """Log ``message`` at warn level unless throttled; say how many were held back."""
        held = self.allow()
        if held is not None:
            more = f" ({held} more since the last report)" if held else ""
            log.warn(message + "{more}", more=more, **fields)
