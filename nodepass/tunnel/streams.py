"""What the multiplexed pool transports share (HTTP/2, ``type=3``; QUIC, ``type=1``):
a stream as the transport a tunnel connection sees, and a client's pool of streams
over one connection per session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure


class CarriedStream:
    """One stream of a multiplexed connection, as a TCP-like transport: ``carrier``
    sends, ends and resets it, and learns when its reader took what arrived
    (``acknowledge``), which is what lets the peer send more."""

    bufferSize = 256 * 1024

    def __init__(self, carrier: Any, stream_id: int) -> None:
        self.carrier = carrier
        self.stream_id = stream_id
        self.connected = True
        self.disconnecting = False
        self.write_closed = False
        self.producer: Any = None
        self.paused = False  # our reader paused: what arrives is not acknowledged
        self.unacknowledged = 0
        self.inner: Any = None

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def abortConnection(self) -> None:
        self.carrier.reset(self)

    # IConsumer: the relay's valve produces for this stream
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer: this stream's reading
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.carrier.acknowledge(self)

    def stopProducing(self) -> None:
        self.loseConnection()

    def loseConnection(self) -> None:
        raise NotImplementedError


class MultiplexedPool:
    """A client session's data connections as streams of one connection: connected
    with the first dial, again after a loss.  Subclasses say how to connect
    (:meth:`_connect`, which ends in :meth:`_up` or :meth:`_failed`)."""

    name = ""
    stream_errors: tuple[type[Exception], ...] = ()

    def __init__(self, make_inner: Callable[[], Any]) -> None:
        self.make_inner = make_inner
        self.carrier: Any = None
        self.connecting = False
        self.waiting: list[Deferred[Any]] = []
        self.closed = False

    def dial(self) -> Deferred[Any]:
        """A new data connection: its tunnel connection, once its handshake ended."""
        if self.carrier is not None and not self.carrier.lost:
            return self._open(self.carrier)
        waiting: Deferred[Any] = Deferred()
        self.waiting.append(waiting)
        if not self.connecting:
            self.connecting = True
            self._connect()
        return waiting

    def _connect(self) -> None:
        raise NotImplementedError

    def _up(self, carrier: Any) -> None:
        self.connecting = False
        self.carrier = carrier
        waiting, self.waiting = self.waiting, []
        if self.closed:
            carrier.close_when_idle()
            for d in waiting:
                d.errback(Failure(ConnectionError("the tunnel session ended")))
            return
        for d in waiting:
            self._open(carrier).chainDeferred(d)

    def _open(self, carrier: Any) -> Deferred[Any]:
        """A stream's tunnel connection, ready; or why no stream could be opened (the
        server's stream limit reached, the connection closing)."""
        try:
            return carrier.open_stream().ready
        except self.stream_errors as e:
            return fail(ConnectionError(f"no {self.name} stream: {e}"))

    def _failed(self, reason: Failure) -> None:
        self.connecting = False
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.errback(reason)

    def close(self) -> None:
        """The session ended: its idle streams were closed by the pool and those still
        in their handshake end now (their dials fail at once, not when the carrier's
        timers give up); relays on streams go on, as on TCP, and the connection closes
        after the last one."""
        self.closed = True
        carrier = self.carrier
        if carrier is None or carrier.lost:
            return
        for stream in list(carrier.streams.values()):
            ready = getattr(stream.inner, "ready", None)
            if ready is not None and not ready.called:
                stream.abortConnection()
        carrier.close_when_idle()
