"""The fast path: bytes moved kernel to kernel with splice(2), for plain TCP relays.

When both connections of a relay are plain TCP (``tls=0``) on Linux, each direction
gets a pipe (F_SETPIPE_SZ-sized) and bytes go socket → pipe → socket without ever
entering Python.  The reactor still drives it: each socket is one descriptor
registered for reading (fill its outgoing pipe) and writing (drain its incoming
pipe).  Backpressure is the pipe: a full pipe stops reading its source until the
destination drains it.  A source's EOF becomes ``shutdown(SHUT_WR)`` on the other
socket once the pipe is empty (half-close carried through).  Counters count what
each source gave.  Anything unexpected falls back to the ordinary Relay.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

from nodepass import logs

if TYPE_CHECKING:
    from nodepass.tunnel.relay import RelayProtocol

PIPE_SIZE = 1 << 20
_log = logs.logger("nodepass")
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def available() -> bool:
    return hasattr(os, "splice")


def plain_tcp(transport: Any) -> bool:
    """A transport whose socket we may take: TCP and not TLS.  The callers make sure
    nothing is left in its write buffer (they write synchronously, see send_now)."""
    return (available() and not getattr(transport, "TLS", True)
            and not getattr(transport, "tls_started", False) and hasattr(transport, "getHandle"))


def send_now(transport: Any, data: bytes) -> int:
    """Write ``data`` straight to the socket; how many bytes went (0 on any trouble)."""
    try:
        return transport.getHandle().send(data)
    except OSError:
        return 0


class _Direction:
    """One direction: source socket → pipe → destination socket."""

    def __init__(self, count: Callable[[int], None]) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe still works
        self.count = count
        self.buffered = 0
        self.eof = False
        self.done = False

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@implementer(IReadWriteDescriptor)
class _Socket:
    """One relayed socket as the reactor sees it while spliced."""

    def __init__(self, relay: SpliceRelay, sock: socket.socket, name: str) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.outgoing: _Direction  # what this socket reads, for the other
        self.incoming: _Direction  # what this socket writes, from the other
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"splice-{self.name}"

    def doRead(self) -> None:
        self.relay.fill(self)

    def doWrite(self) -> None:
        self.relay.drain(self)

    def connectionLost(self, reason: Any) -> None:
        self.relay.fail(reason.value if hasattr(reason, "value") else None)


class SpliceRelay:
    """The same contract as :class:`~nodepass.tunnel.relay.Relay`, on splice(2)."""

    def __init__(self, reactor: Any, a: RelayProtocol, b: RelayProtocol,
                 count_a: Callable[[int], None], count_b: Callable[[int], None],
                 on_end: Callable[[Any], None]) -> None:
        self.reactor = reactor
        self.a, self.b = a, b
        self._on_end: Callable[[Any], None] | None = on_end
        self._lost: set[int] = set()
        self.active = False
        sa = _Socket(self, a.transport.getHandle(), "a")
        sb = _Socket(self, b.transport.getHandle(), "b")
        sa.outgoing = sb.incoming = _Direction(count_a)
        sb.outgoing = sa.incoming = _Direction(count_b)
        self.sockets = (sa, sb)

    def other(self, side: _Socket) -> _Socket:
        return self.sockets[1] if side is self.sockets[0] else self.sockets[0]

    def start(self, b_eof: bool = False) -> None:
        for protocol in (self.a, self.b):
            protocol.join(self)
            protocol.transport.stopReading()
            protocol.transport.stopWriting()
        self.active = True
        sa, sb = self.sockets
        if b_eof:
            sb.outgoing.eof = True
            self._finish_direction(sb.outgoing, sa)
        for side in self.sockets:
            if not side.outgoing.eof:
                self._want_read(side, True)

    # -- the reactor's calls -------------------------------------------------

    def fill(self, src: _Socket) -> None:
        pipe = src.outgoing
        while self.active and pipe.buffered < PIPE_SIZE:
            try:
                n = os.splice(src.fd, pipe.write_fd, PIPE_SIZE - pipe.buffered, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.fail(e)
                return
            if n == 0:
                pipe.eof = True
                self._want_read(src, False)
                break
            pipe.buffered += n
            pipe.count(n)
        if not self.active:
            return
        if pipe.buffered >= PIPE_SIZE:
            self._want_read(src, False)  # backpressure: the pipe is full
        self.drain(self.other(src))

    def drain(self, dst: _Socket) -> None:
        pipe = dst.incoming
        while self.active and pipe.buffered:
            try:
                n = os.splice(pipe.read_fd, dst.fd, pipe.buffered, flags=_FLAGS)
            except BlockingIOError:
                self._want_write(dst, True)
                return
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    self.fail(e)
                    return
                self._want_write(dst, True)
                return
            pipe.buffered -= n
        if not self.active:
            return
        self._want_write(dst, False)
        src = self.other(dst)
        if pipe.eof:
            self._finish_direction(pipe, dst)
        elif not src.reading:
            self._want_read(src, True)

    # -- bookkeeping -------------------------------------------------------

    def _finish_direction(self, pipe: _Direction, dst: _Socket) -> None:
        if pipe.done or pipe.buffered:
            return
        pipe.done = True
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if all(s.outgoing.done for s in self.sockets):
            self.close()

    def _want_read(self, side: _Socket, on: bool) -> None:
        if on != side.reading:
            (self.reactor.addReader if on else self.reactor.removeReader)(side)
        side.reading = on

    def _want_write(self, side: _Socket, on: bool) -> None:
        if on != side.writing:
            (self.reactor.addWriter if on else self.reactor.removeWriter)(side)
        side.writing = on

    def _detach(self) -> None:
        if not self.active:
            return
        self.active = False
        for side in self.sockets:
            self._want_read(side, False)
            self._want_write(side, False)
        for direction in {id(s.outgoing): s.outgoing for s in self.sockets}.values():
            direction.close()

    def close(self) -> None:
        """Both directions are done: hand the sockets back to Twisted to close."""
        self._detach()
        self.a.transport.loseConnection()
        self.b.transport.loseConnection()

    def fail(self, error: BaseException | None = None) -> None:
        """A socket error (reset, broken pipe): end both connections now."""
        _log.debug("spliced relay ended by {error}", error=error)
        self.abort()

    def abort(self) -> None:
        self._detach()
        self.a.transport.abortConnection()
        self.b.transport.abortConnection()

    # -- the protocols' calls (Twisted is not reading while we are) -----------

    def lost(self, side: RelayProtocol) -> None:
        self._lost.add(id(side))
        if len(self._lost) == 1:
            if self.active:
                self.abort()  # Twisted closed one of our sockets under us
            else:
                self.other_protocol(side).transport.loseConnection()
        if len(self._lost) == 2 and self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    def other_protocol(self, side: RelayProtocol) -> RelayProtocol:
        return self.b if side is self.a else self.a
