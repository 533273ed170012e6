"""UDP through the tunnel, as sessions.

The first datagram from a new source address opens a session: one pooled data
connection, launched with LAUNCH(UDP).  From then on it carries DATAGRAM frames
(one datagram each, boundaries and order kept) both ways, any number of them,
until UDP_READ_TIMEOUT passes with no datagram either way or the connection
closes.  A datagram over UDP_DATA_BUF_SIZE is dropped and counted; so is one that
arrives while the tunnel connection is backed up (UDP may lose, it may not
queue without bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nodepass.tunnel.limits import IdleWatch

MAX_DATAGRAM = 65535
PENDING_LIMIT = 64  # datagrams kept while a session's far side is not there yet


class UdpCounters:
    """Datagram drops, shared by the sessions of one end."""

    def __init__(self) -> None:
        self.oversize = 0
        self.overload = 0


@implementer(IPushProducer)
class UdpSession:
    """One UDP peer's session: its datagrams go to the far side through ``send``
    (``to_tunnel``), the far side's come back through ``from_tunnel`` to ``deliver``.

    The far side is a launched tunnel connection (which registers the session as
    its transport's producer), or in single-end mode the target's socket.  As a
    push producer it hears when the far side's buffer is full: datagrams for it are
    then dropped (counted), never queued.
    """

    def __init__(self, clock: Any, send: Callable[[bytes], None],
                 deliver: Callable[[bytes], None], idle_timeout: float, max_size: int,
                 count_in: Callable[[int], None], count_out: Callable[[int], None],
                 drops: UdpCounters, on_end: Callable[[UdpSession], None],
                 rate_in: Any = None, rate_out: Any = None,
                 answer_timeout: float | None = None) -> None:
        self.clock = clock
        self.send = send
        self.deliver = deliver
        self.idle_timeout = idle_timeout
        self.max_size = max_size
        self.count_in, self.count_out = count_in, count_out
        self.drops = drops
        self.on_end = on_end
        self.rate_in, self.rate_out = rate_in, rate_out  # token buckets for rate=
        self.paused = False
        self.ended = False
        # Until datagrams have gone both ways the session is unanswered, and ends after
        # ``answer_timeout``: a flood to a silent target cannot hold sessions for long.
        self.directions = 0  # bits: 1 to the tunnel, 2 from it; 3 once answered
        first = min(answer_timeout or idle_timeout, idle_timeout)
        self.watch = IdleWatch(clock, first, self.close)

    # IPushProducer: the far side's write buffer is full / has room
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def to_tunnel(self, payload: bytes) -> bool:
        """A datagram from this end's peer, for the far side; False when it was dropped."""
        if self.ended:
            return False
        if len(payload) > self.max_size:
            self.drops.oversize += 1
            return False
        if self.paused or (self.rate_in is not None
                           and not self.rate_in.try_take(len(payload))):
            self.drops.overload += 1
            return False
        self.count_in(len(payload))
        self.send(payload)
        self.touch()
        if self.directions != 3:
            self._flowed(1)
        return True

    def from_tunnel(self, payload: bytes) -> None:
        """A datagram from the far side, for this end's peer."""
        if len(payload) > self.max_size:
            self.drops.oversize += 1  # the other end's limit is larger than ours
            return
        if self.rate_out is not None and not self.rate_out.try_take(len(payload)):
            self.drops.overload += 1
            return
        self.count_out(len(payload))
        self.deliver(payload)
        self.touch()
        if self.directions != 3:
            self._flowed(2)

    def _flowed(self, direction: int) -> None:
        self.directions |= direction
        if self.directions == 3:
            self.watch.timeout = self.idle_timeout  # answered: the full idle timeout

    def touch(self) -> None:
        self.watch.touch()

    def close(self) -> None:
        """End the session: its timer stops, ``on_end`` is called (idempotent)."""
        if self.ended:
            return
        self.ended = True
        self.watch.cancel()
        self.on_end(self)


class LocalUdp(DatagramProtocol):
    """The UDP socket one session sends to its target from, connected to the target;
    what the target answers goes to ``received``.

    The target may be a host name: datagrams for it wait (up to PENDING_LIMIT, then
    dropped) while the name resolves and the socket opens.
    """

    def __init__(self) -> None:
        self.received: Callable[[bytes], Any] | None = None
        self.gone: Callable[[str], Any] | None = None  # the target refused, the socket went
        self.pending: list[bytes] | None = []  # None once open
        self.port: Any = None

    def open(self, reactor: Any, ip: str, port: int, source: str | None) -> None:
        """Bind (to ``source`` if given) and connect to ``ip``:``port``; may raise OSError."""
        interface = source or ("::" if ":" in ip else "")
        self.port = reactor.listenUDP(0, self, interface=interface)
        self.transport.connect(ip, port)
        pending, self.pending = self.pending or [], None
        for payload in pending:
            self.send(payload)

    def send(self, payload: bytes) -> None:
        """A datagram for the target."""
        if self.pending is not None:
            if len(self.pending) < PENDING_LIMIT:
                self.pending.append(payload)
            return
        if self.transport is None:
            return  # the socket went (its session is ending): as a lost datagram
        try:
            self.transport.write(payload)
        except OSError:
            pass  # as a lost datagram: UDP goes on

    def close(self) -> None:
        self.pending = None
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()

    def startProtocol(self) -> None:
        self.transport.maxPacketSize = MAX_DATAGRAM + 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.received is not None:
            self.received(data)

    def connectionRefused(self) -> None:
        """ICMP port unreachable: nothing listens at the target, the session ends."""
        self._went("refused the datagrams (ICMP port unreachable)")

    def stopProtocol(self) -> None:
        # Not closed by us: the reactor dropped the socket (epoll reports a pending ICMP
        # error as a hang-up on Linux).
        if self.port is not None:
            self.port = None
            self._went("closed the socket (ICMP port unreachable)")

    def _went(self, why: str) -> None:
        gone, self.gone = self.gone, None
        if gone is not None:
            gone(why)
