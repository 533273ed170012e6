"""Dialing the target: one address or several, rotated, with failover.

New connections start at the next target in turn.  A target that refuses (or
times out) is skipped by later connections for ``retry_after`` seconds and the
same connection tries the next one; when every target is down, each is tried
anyway (the earliest to come back first), so a recovered target is found again.
``dial=IP`` binds every outgoing socket to that source address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.endpoints import describe_failure, dial_endpoint
from nodepass.names import NameCache
from nodepass.tunables import Tunables
from nodepass.url import DEFAULT_DNS_TTL, Address, ClientConfig, ServerConfig


class TargetsUnreachableError(ConnectionError):
    """No target accepted the connection; ``str()`` names each one's reason."""


class TargetDialer:
    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, targets: Sequence[Address], source: str = "auto",
                 retry_after: float = 5.0, names: NameCache | None = None,
                 endpoint_for: Callable[[Address], IStreamClientEndpoint] | None = None
                 ) -> None:
        self.reactor = reactor
        self.targets = tuple(targets)
        self.source = None if source == "auto" else source
        self.retry_after = retry_after
        self.names = names if names is not None else NameCache(reactor, DEFAULT_DNS_TTL)
        bind = None if self.source is None else (self.source, 0)
        self._endpoint_for = endpoint_for or (
            lambda address: dial_endpoint(reactor, address, bind_address=bind))
        self._down_until = {t: 0.0 for t in self.targets}
        self._next = 0
        self._throttle = logs.Throttle(reactor)

    @classmethod
    def for_config(cls, reactor: Any, config: ServerConfig | ClientConfig,
                   tunables: Tunables) -> TargetDialer:
        """The dialer of an instance's targets: ``dial=``, ``dns=`` and SERVICE_COOLDOWN."""
        return cls(reactor, config.targets, config.dial, tunables.service_cooldown,
                   NameCache(reactor, config.dns))

    def order(self) -> list[Address]:
        """This connection's order: from the next in turn, the targets up, then the
        ones down by when they may be back."""
        start = self._next
        self._next = (self._next + 1) % len(self.targets)
        turn = self.targets[start:] + self.targets[:start]
        now = self.reactor.seconds()
        up = [t for t in turn if self._down_until[t] <= now]
        down = sorted((t for t in turn if self._down_until[t] > now),
                      key=self._down_until.__getitem__)
        return up + down

    def connect(self, factory: Any) -> Deferred[Any]:
        """Connect ``factory`` to the first target that accepts; cancellable."""
        return ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        reasons = []
        for target in self.order():
            try:
                protocol = await self._dial(target, factory)
            except CancelledError:
                raise
            except Exception as e:  # any failure means: try the next one
                if len(self.targets) == 1:
                    raise
                why = describe_failure(Failure(e))
                reasons.append(f"{target}: {why}")
                self._mark_down(target, why)
                continue
            self._down_until[target] = 0.0
            return protocol
        raise TargetsUnreachableError("; ".join(reasons))

    async def _dial(self, target: Address, factory: Any) -> Any:
        """Each address of ``target`` in turn (a name through the cache of ``dns=``)."""
        addresses = await self.names.resolve(target.host)
        failure: Exception | None = None
        for ip in addresses:
            try:
                return await self._endpoint_for(Address(ip, target.port)).connect(factory)
            except CancelledError:
                raise
            except Exception as e:
                failure = e
        self.names.forget(target.host)
        assert failure is not None
        raise failure

    def _mark_down(self, target: Address, why: str) -> None:
        if len(self.targets) > 1:
            if self._down_until[target] <= self.reactor.seconds():
                self._throttle.warn(self.log, "target {target} failed ({why}): trying the "
                                    "others, and it again in {t:g}s", target=target, why=why,
                                    t=self.retry_after)
            self._down_until[target] = self.reactor.seconds() + self.retry_after

    def udp_target(self) -> Address:
        """The target for a new UDP session: the next one in turn that is not down."""
        return self.order()[0]
