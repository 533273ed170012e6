"""Who may try the tunnel key, and how often: the server's limits on key attempts.

Each attempt (a control connection's PAKE) costs the server a few milliseconds of
CPU and tests one guess of the key.  So attempts are paid for: each source (an IPv4
address, an IPv6 /64) has a bucket of attempts and a smaller bucket of *failed*
attempts, and all sources share one ceiling, so a flood of handshakes — from one
host or many — can neither guess quickly nor take the CPU the live tunnel needs.
A refused attempt costs nothing: the connection is closed before any work.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

# (burst, refill per second)
PER_SOURCE = (10, 1.0)  # attempts from one source
FAILURES = (5, 1 / 60)  # failed attempts from one source: then one a minute
OVERALL = (32, 16.0)  # attempts from everyone together
MAX_SOURCES = 4096  # sources remembered at once (the oldest idle ones are forgotten)


class Bucket:
    """A token bucket on a clock: ``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, clock: Any, burst: float, rate: float) -> None:
        self.clock, self.burst, self.rate = clock, burst, rate
        self.tokens = float(burst)
        self.stamp = clock.seconds()

    def level(self) -> float:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self) -> bool:
        if self.level() < 1:
            return False
        self.tokens -= 1
        return True

    @property
    def full(self) -> bool:
        return self.level() >= self.burst


@dataclass
class _Source:
    attempts: Bucket
    failures: Bucket


def source_of(host: str) -> str:
    """What one source is: an IPv4 address, or an IPv6 /64 (one host usually holds a
    whole /64, so per-address limits would not hold it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Attempts:
    """Admits key attempts within the limits above; remembers failures."""

    def __init__(self, clock: Any, per_source: tuple[float, float] = PER_SOURCE,
                 failures: tuple[float, float] = FAILURES,
                 overall: tuple[float, float] = OVERALL,
                 max_sources: int = MAX_SOURCES) -> None:
        self.clock = clock
        self.per_source, self.failures = per_source, failures
        self.overall = Bucket(clock, *overall)
        self.max_sources = max_sources
        self.sources: dict[str, _Source] = {}
        self.refused = 0

    def admit(self, host: str) -> str | None:
        """None when ``host`` may try the key now (the attempt is counted), else why not."""
        source = self._source(source_of(host))
        if source.failures.level() < 1:
            return self._refuse(f"{self.failures[0]:g} failed attempts from it; one more is "
                                f"allowed every {1 / self.failures[1]:g}s")
        if not source.attempts.take():
            return self._refuse(f"over {self.per_source[1]:g} attempts a second from it")
        if not self.overall.take():
            return self._refuse(f"over {self.overall.rate:g} attempts a second from everyone")
        return None

    def saturated(self, host: str) -> bool:
        """Would an attempt from ``host`` be refused now?  (Nothing is counted: a server
        under a flood turns such connections away as they are accepted.)"""
        source = self.sources.get(source_of(host))
        if source is not None and (source.failures.level() < 1
                                   or source.attempts.level() < 1):
            return True
        return self.overall.level() < 1

    def failed(self, host: str) -> None:
        """An attempt from ``host`` was wrong: it counts against the source."""
        self._source(source_of(host)).failures.take()

    def _refuse(self, why: str) -> str:
        self.refused += 1
        return why

    def _source(self, key: str) -> _Source:
        source = self.sources.pop(key, None)
        if source is None:
            source = _Source(Bucket(self.clock, *self.per_source),
                             Bucket(self.clock, *self.failures))
            self._forget()
        self.sources[key] = source  # most recent last
        return source

    def _forget(self) -> None:
        """Keep the table bounded: first the sources with nothing held against them, then
        the least recent."""
        if len(self.sources) < self.max_sources:
            return
        for key in [k for k, s in self.sources.items() if s.attempts.full and s.failures.full]:
            del self.sources[key]
        while len(self.sources) >= self.max_sources:
            del self.sources[next(iter(self.sources))]
