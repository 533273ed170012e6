"""Target host names, resolved and kept for ``dns=`` seconds (NodePass's DNS cache).

IP literals are their own answer.  A name is looked up through the reactor's
resolver; its addresses are kept for the TTL (``dns=0``: looked up for every
connection); lookups of one name that overlap share one query; a failed lookup
is not kept.  When every cached address of a name refuses, the dialer forgets
the name, so the next connection looks it up afresh.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.endpoints import is_ip


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, host: str) -> None:
        self.host = host
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self) -> None:
        if self.found:
            self.done.callback(self.found)
        else:
            self.done.errback(Failure(DNSLookupError(f"{self.host} has no address")))


class NameCache:
    """Addresses of target names, each kept for ``ttl`` seconds."""

    def __init__(self, clock: Any, ttl: float,
                 resolver: IHostnameResolver | None = None) -> None:
        self.clock = clock
        self.ttl = ttl
        self._resolver = resolver  # None: the reactor's, looked up when first needed
        self._kept: dict[str, tuple[float, list[str]]] = {}
        self._asking: dict[str, list[Deferred[list[str]]]] = {}

    def resolve(self, host: str) -> Deferred[list[str]]:
        """The addresses of ``host`` (an IP literal is its own), from the cache while fresh."""
        if is_ip(host):
            return succeed([host])
        kept = self._kept.get(host)
        if kept is not None and kept[0] > self.clock.seconds():
            return succeed(list(kept[1]))
        self._kept.pop(host, None)
        waiting: Deferred[list[str]] = Deferred()
        if host in self._asking:
            self._asking[host].append(waiting)
            return waiting
        self._asking[host] = [waiting]
        receiver = _Collect(host)
        resolver = self._resolver if self._resolver is not None else self.clock.nameResolver
        resolver.resolveHostName(receiver, host.encode("idna").decode())
        receiver.done.addBoth(self._answered, host)
        return waiting

    def _answered(self, result: list[str] | Failure, host: str) -> None:
        if not isinstance(result, Failure) and self.ttl > 0:
            self._kept[host] = (self.clock.seconds() + self.ttl, list(result))
        for waiting in self._asking.pop(host, []):
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(list(result))

    def forget(self, host: str) -> None:
        """Drop what is kept for ``host``: its addresses stopped answering."""
        self._kept.pop(host, None)
