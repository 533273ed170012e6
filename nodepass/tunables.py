"""Environment tunables, read once at start into a frozen :class:`Tunables`.

Names and defaults are NodePass's.  Each may also be spelled with the ``NP_``
prefix of later NodePass versions.  A bad value is an error naming the variable
and what is allowed; it is never replaced by the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class TunableError(ValueError):
    """An environment variable nodepass refuses; ``str()`` is one line for the user."""


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration (``500ms``, ``5s``, ``1h30m``, ``1.5s``, ``0``) in seconds."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            raise ValueError(text)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(text)
    return total


def format_duration(seconds: float) -> str:
    if not seconds:
        return "0"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000, 3):g}ms"


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` writes it (``5m0s``, ``1h0m0s``,
    ``1.5s``, ``500ms``, ``0s``): NodePass panels read and write this form."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return f"{_decimal(ns / size)}{unit}"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{text}{_decimal(rest / 1e9)}s"


def _decimal(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class _Spec:
    reader: Callable[[str], Any]
    allowed: str
    check: Callable[[Any], bool]


_INT = "a whole number"


def _whole(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(text)
    return int(text)

_DUR = "a duration like 500ms, 5s, 1h30m"

_SPECS: dict[str, _Spec] = {
    "semaphore_limit": _Spec(_whole, f"{_INT} >= 1", lambda v: v >= 1),
    "min_pool_capacity": _Spec(_whole, f"{_INT} >= 1", lambda v: v >= 1),
    "max_pool_capacity": _Spec(_whole, f"{_INT} >= 1", lambda v: v >= 1),
    "min_pool_interval": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "max_pool_interval": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "udp_data_buf_size": _Spec(_whole, f"{_INT} from 1 to 65535", lambda v: 1 <= v <= 65535),
    "udp_read_timeout": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "udp_answer_timeout": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "udp_max_sessions": _Spec(_whole, f"{_INT} >= 0 (0: half the slot limit)",
                              lambda v: v >= 0),
    "udp_max_per_source": _Spec(_whole, f"{_INT} >= 1", lambda v: v >= 1),
    "report_interval": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "reload_interval": _Spec(parse_duration, f"{_DUR}, > 0", lambda v: v > 0),
    "service_cooldown": _Spec(parse_duration, f"{_DUR}, >= 0", lambda v: v >= 0),
    "shutdown_timeout": _Spec(parse_duration, f"{_DUR}, >= 0", lambda v: v >= 0),
    "fleet_heartbeat": _Spec(parse_duration, f"{_DUR}, from 100ms to 1h",
                             lambda v: 0.1 <= v <= 3600),
    "fleet_command_wait": _Spec(parse_duration, f"{_DUR}, from 1s to 10m",
                                lambda v: 1 <= v <= 600),
}


@dataclass(frozen=True)
class Tunables:
    """Every tunable, typed; durations are in seconds."""

    semaphore_limit: int = 1024
    min_pool_capacity: int = 16
    max_pool_capacity: int = 1024
    min_pool_interval: float = 1.0
    max_pool_interval: float = 5.0
    udp_data_buf_size: int = 8192
    udp_read_timeout: float = 5.0
    # A session whose target never answered ends after this (UDP_READ_TIMEOUT once it has).
    udp_answer_timeout: float = 2.0
    udp_max_sessions: int = 0  # 0: half the slot limit in force (all of it with notcp=1)
    udp_max_per_source: int = 32  # sessions at once from one source IP address
    report_interval: float = 5.0
    reload_interval: float = 3600.0
    service_cooldown: float = 5.0
    shutdown_timeout: float = 5.0
    # A fleet master (docs/fleet.md) says it is alive this often; silent for three, it is
    # offline.  A command for another node's instance waits this long for its outcome.
    fleet_heartbeat: float = 5.0
    fleet_command_wait: float = 10.0

    def __post_init__(self) -> None:
        if self.min_pool_capacity > self.max_pool_capacity:
            raise TunableError(
                f"MIN_POOL_CAPACITY ({self.min_pool_capacity}) is greater than "
                f"MAX_POOL_CAPACITY ({self.max_pool_capacity}); allowed: min <= max"
            )
        if self.min_pool_interval > self.max_pool_interval:
            raise TunableError(
                f"MIN_POOL_INTERVAL ({format_duration(self.min_pool_interval)}) is greater than "
                f"MAX_POOL_INTERVAL ({format_duration(self.max_pool_interval)}); "
                "allowed: min <= max"
            )


def environment_names() -> list[str]:
    """The variable names, in upper case, as a user sets them."""
    return [f.name.upper() for f in fields(Tunables)]


def _lookup(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    plain, prefixed = environ.get(name), environ.get("NP_" + name)
    if plain is not None and prefixed is not None and plain != prefixed:
        raise TunableError(
            f"{name}={plain!r} and NP_{name}={prefixed!r} disagree; set one of them"
        )
    if plain is not None:
        return name, plain
    if prefixed is not None:
        return "NP_" + name, prefixed
    return None


def from_environ(environ: Mapping[str, str]) -> Tunables:
    """Read every tunable from ``environ``; unset ones take NodePass's defaults."""
    values: dict[str, Any] = {}
    for field_name, spec in _SPECS.items():
        found = _lookup(environ, field_name.upper())
        if found is None:
            continue
        shown, text = found
        try:
            value = spec.reader(text.strip())
        except ValueError:
            raise TunableError(f"{shown}={text!r} is not {spec.allowed}") from None
        if not spec.check(value):
            raise TunableError(f"{shown}={text!r} is out of range (allowed: {spec.allowed})")
        values[field_name] = value
    return Tunables(**values)
