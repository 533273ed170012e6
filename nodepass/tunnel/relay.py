"""A full-duplex relay between two connections, with backpressure and half-close.

Each side's transport is registered as the streaming producer of the other's,
so when one side cannot write fast enough the other stops reading: a fast
sender facing a slow receiver never makes the daemon buffer without bound.  An
end-of-file on one side is carried through as a half-close of the other; the
relay ends when both directions are done or either connection is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass import logs
from nodepass.tunnel import splice
from nodepass.tunnel.channel import write_through
from nodepass.tunnel.firstbytes import FirstBytes
from nodepass.tunnel.limits import Pacer, TokenBucket, Valve


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """A connection that may be joined to a :class:`Relay`.

    Until it is joined, its events go to the ``before_relay_*`` hooks that
    subclasses override (the tunnel handshake, for instance).
    """

    relay: Any = None

    def join(self, relay: Any) -> None:
        """Its bytes belong to ``relay`` from now on."""
        self.relay = relay

    def take_held(self) -> tuple[bytes, bool]:
        """What it read before the relay joined it: (bytes, whether its stream ended)."""
        return b"", False

    def spliceable(self) -> bool:
        """May the relay move its bytes with splice(2)?  (Plain TCP, nothing buffered.)"""
        return splice.plain_tcp(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay_received(data)
        else:
            self.before_relay_data(data)

    # How this connection's byte stream is read and written while relayed; a TLS
    # tunnel connection frames it (see connection.Streaming) to carry half-close.

    def relay_received(self, data: bytes) -> None:
        assert self.relay is not None
        self.relay.carry(self, data)

    def send_stream(self, data: bytes) -> None:
        write_through(self.transport, data)

    def end_stream(self) -> None:
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.read_closed(self)
        else:
            self.before_relay_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if self.relay is not None:
            self.relay.lost(self)
        else:
            self.before_relay_lost(reason)

    def before_relay_data(self, data: bytes) -> None:
        self.transport.loseConnection()

    def before_relay_eof(self) -> None:
        self.transport.loseConnection()

    def before_relay_lost(self, reason: Failure) -> None:
        pass


class Relay:
    """Joins ``a`` and ``b``; counts bytes read from each; calls ``on_end`` once.

    Each side is read through a :class:`Valve`, registered as the producer of the
    other side's transport; with ``rate_a``/``rate_b`` (token buckets) the valve is
    also held while the bucket is in debt, which is how ``rate=`` paces a relay.
    """

    def __init__(
        self,
        a: RelayProtocol,
        b: RelayProtocol,
        count_a: Callable[[int], None],
        count_b: Callable[[int], None],
        on_end: Callable[[Relay], None],
        rate_a: TokenBucket | None = None,
        rate_b: TokenBucket | None = None,
        clock: Any = None,
        screen_a: FirstBytes | None = None,
        on_blocked: Callable[[str], None] | None = None,
    ) -> None:
        self.a, self.b = a, b
        # block=: what ``a`` (a user) sends first is held until it is judged
        self._screen = screen_a
        self._on_blocked = on_blocked
        self._count = {id(a): count_a, id(b): count_b}
        self._valves = {id(a): Valve(a.transport), id(b): Valve(b.transport)}
        self._pacers = {id(side): Pacer(clock, bucket, self._valves[id(side)])
                           for side, bucket in ((a, rate_a), (b, rate_b)) if bucket is not None}
        self._eof: set[int] = set()
        self._producing_for: set[int] = set()  # sides whose transport has a producer
        self._lost: set[int] = set()
        self._on_end: Callable[[Relay], None] | None = on_end

    def other(self, side: RelayProtocol) -> RelayProtocol:
        return self.b if side is self.a else self.a

    def start(self, b_pending: bytes = b"", b_eof: bool = False) -> None:
        """Join the two sides; what ``b`` read before (bytes, EOF) is delivered first."""
        self.a.join(self)
        self.b.join(self)
        self.a.transport.registerProducer(self._valves[id(self.b)], True)
        self.b.transport.registerProducer(self._valves[id(self.a)], True)
        self._producing_for = {id(self.a), id(self.b)}
        # Resume every side whose connection can still be read: an end of stream seen
        # before the join (b_eof) means there is nothing left to read on ``b``.
        readable = [self.a] if b_eof else [self.a, self.b]
        if b_pending:
            self.b.dataReceived(b_pending)
        if b_eof:
            self.read_closed(self.b)
        for side in readable:
            if self._on_end is not None and not self._lost:
                self._valves[id(side)].release("start")

    def carry(self, side: RelayProtocol, data: bytes) -> None:
        if self._screen is not None and side is self.a:
            data = self._screened(data)
            if not data:
                return
        self._count[id(side)](len(data))
        self.other(side).send_stream(data)
        if self._pacers and (pacer := self._pacers.get(id(side))) is not None:
            pacer.paid(len(data))

    def _screened(self, data: bytes) -> bytes:
        assert self._screen is not None
        refused, passed = self._screen.feed(data)
        if self._screen.decided:
            self._screen = None
        if refused is not None:
            if self._on_blocked is not None:
                self._on_blocked(refused)
            self.abort()
        return passed

    def read_closed(self, side: RelayProtocol) -> None:
        if self._screen is not None and side is self.a:
            held, self._screen = self._screen.release(), None
            if held:
                self.carry(side, held)
        self._eof.add(id(side))
        other = self.other(side)
        # ``side`` will produce nothing more; a paused producer would otherwise
        # be resumed instead of the half-close being carried out.
        self._unregister(other)
        if len(self._eof) == 2:
            self.close()
        else:
            other.end_stream()

    def lost(self, side: RelayProtocol) -> None:
        """One connection is gone: close the other once it has written what it holds.
        The relay ends when both are gone, so shutdown waits for that last flush."""
        self._lost.add(id(side))
        if len(self._lost) == 2:
            self._end()
            return
        self._unregister(self.a, self.b)
        self.other(side).transport.loseConnection()

    def close(self) -> None:
        """End both connections after what they have buffered is written."""
        self._unregister(self.a, self.b)
        self.a.transport.loseConnection()
        self.b.transport.loseConnection()

    def abort(self) -> None:
        """End both connections now (shutdown timeout)."""
        self.a.transport.abortConnection()
        self.b.transport.abortConnection()

    def _end(self) -> None:
        if self._on_end is None:
            return
        on_end, self._on_end = self._on_end, None
        for pacer in self._pacers.values():
            pacer.cancel()
        on_end(self)

    def _unregister(self, *sides: RelayProtocol) -> None:
        for side in sides:
            if id(side) in self._producing_for:
                self._producing_for.discard(id(side))
                side.transport.unregisterProducer()


class RelaySet:
    """The live relays of one end, and a way to wait for them at shutdown."""

    log = logs.logger("nodepass")

    def __init__(self) -> None:
        self._relays: set[Relay] = set()
        self._waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, relay: Relay) -> None:
        self._relays.add(relay)

    def discard(self, relay: Relay) -> None:
        self._relays.discard(relay)
        if not self._relays:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, clock: Any, timeout: float) -> Deferred[None]:
        """Fire once no relay is left; abort the rest after ``timeout`` seconds."""
        if not self._relays:
            return succeed(None)
        self.log.info("waiting up to {t:g}s for {n} live connections to finish",
                      t=timeout, n=len(self._relays))
        done: Deferred[None] = Deferred()
        self._waiters.append(done)

        def give_up() -> None:
            self.log.warn("shutdown timeout: closing {n} live connections", n=len(self._relays))
            for relay in list(self._relays):
                relay.abort()

        timer = clock.callLater(timeout, give_up)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return done
