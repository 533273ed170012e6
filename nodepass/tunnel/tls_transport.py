"""TLS on a tunnel connection with the standard library's ``ssl`` module.

Twisted's ``startTLS`` puts pyOpenSSL's memory BIO between the socket and the
protocol: every record crosses Python twice, through cffi and several layers of
Python (TLSMemoryBIOProtocol, its producer membrane), and each idle connection keeps
tens of KiB of buffers.  Here the TCP transport itself speaks TLS, with ``ssl``'s
C-level SSLObject and two MemoryBIOs: one ``recv_into`` a shared buffer per
readiness event, the records decrypted into another shared buffer, one
``dataReceived``; a write is encrypted at once and its records go to the socket
straight away when nothing waits before them (no reactor turn for a small frame).
OpenSSL releases its buffers when a connection is idle (``ssl`` sets
SSL_MODE_RELEASE_BUFFERS), so a pooled TLS connection costs a few KiB.

TLS's own half-close carries a stream's end: ``loseWriteConnection`` sends a
close_notify (one SSL_shutdown; the peer may go on sending), and a close_notify
received is an end of stream (``readConnectionLost``).  A TCP end without one is a
truncation: the connection is lost.

The transport keeps its Twisted class and gains these methods: ``start_tls``
re-classes a live ``tcp.Server`` or ``tcp.Client`` (the same object, socket, reactor
registration, buffers and producers) to a subclass with :class:`TLSMixin` first.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure

from nodepass.tunnel.channel import send_through

_RECORD_OUT = 16384  # the most plaintext one TLS record carries
_RECORD_IN = _RECORD_OUT + 22  # and that record on the wire (header, type, tag)

# One reactor thread: a read fills these, and what is delivered is copied out first.
_received = bytearray(1 << 18)
_plain = bytearray((1 << 18) + (1 << 15))


def _scratch(size: int) -> tuple[memoryview, memoryview]:
    global _received, _plain
    if len(_received) < size:
        _received = bytearray(size)
        _plain = bytearray(size + (1 << 15))
    return memoryview(_received), memoryview(_plain)


class TLSMixin:
    """What a ``tcp.Connection`` does differently once TLS started on it."""

    tls_started = True  # (Twisted's own ``TLS`` flag stays False: its startTLS is not used)
    socket: Any
    protocol: Any
    bufferSize: int
    dataBuffer: bytes
    offset: int
    _tempDataLen: int
    disconnecting: bool
    disconnected: bool
    connected: bool

    def _start(self, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
               describe: Callable[[ssl.SSLError], str]) -> None:
        self._incoming = incoming
        self._outgoing = outgoing
        self._tls = tls
        self._handshaking = True
        self._held: list[bytes] = []  # written before the handshake ended
        self._then_lose: Callable[[], None] | None = None  # asked before it ended, too
        self._closed_tls = False  # our close_notify went
        self.tls_problem: str | None = None  # why the handshake failed, for the log
        self._describe = describe
        self._handshake()

    # -- reading ----------------------------------------------------------

    def doRead(self) -> Any:
        received, _ = _scratch(self.bufferSize)
        try:
            count = self.socket.recv_into(received, self.bufferSize)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not count:
            self._incoming.write_eof()  # without a close_notify first: truncated
            return self._handshake() if self._handshaking else self._decrypt(received[:0])
        return self._decrypt(received[:count])

    def _decrypt(self, ciphertext: memoryview) -> Any:
        """Feed ``ciphertext`` to OpenSSL a record's size at a time (a memory BIO keeps
        the largest size it ever held), and deliver what it decrypts in one call.  More
        is fed only once OpenSSL holds nothing unread, so the usual read ends without
        the cost of an SSLWantReadError."""
        _, plain = _scratch(self.bufferSize)
        got, result, start, size = 0, None, 0, len(ciphertext)
        tls, incoming = self._tls, self._incoming
        while result is None:
            if not incoming.pending and not tls.pending():
                if start < size:
                    incoming.write(ciphertext[start:start + _RECORD_IN])
                    start += _RECORD_IN
                elif not incoming.eof:
                    break
            if self._handshaking:
                result = self._handshake()
                if self._handshaking or result is not None:
                    continue
            try:
                count = tls.read(len(plain) - got, plain[got:])
            except ssl.SSLWantReadError:
                if start >= size and not incoming.eof:
                    break
                continue
            except ssl.SSLZeroReturnError:
                result = main.CONNECTION_DONE
                break
            except (ssl.SSLError, ValueError):
                result = main.CONNECTION_LOST  # truncated (a TCP end, no close_notify)
                break
            if not count:
                result = main.CONNECTION_DONE
                break
            got += count
            if got == len(plain):
                self._deliver(plain[:got])
                got = 0
                if self.disconnected:
                    return None
        if got and not self.disconnected:
            self._deliver(plain[:got])
        return result

    def take_read(self, data: bytes) -> bool:
        """Bytes read before TLS started that belong to it (a ClientHello a sniffing
        protocol saw first); False when they end the connection (it is aborted)."""
        if self._decrypt(memoryview(data)) is None:
            return True
        self.abortConnection()  # type: ignore[attr-defined]
        return False

    def _deliver(self, data: memoryview) -> None:
        self.protocol.dataReceived(bytes(data))

    # -- writing ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data or self.disconnected or self._closed_tls:
            return
        if self._handshaking:
            self._held.append(bytes(data))
            return
        tls, outgoing = self._tls, self._outgoing
        if len(data) <= _RECORD_OUT:
            tls.write(data)
            self._send(outgoing.read())
            return
        view, pieces = memoryview(data), []
        for start in range(0, len(view), _RECORD_OUT):  # a record at a time: see _decrypt
            tls.write(view[start:start + _RECORD_OUT])
            pieces.append(outgoing.read())
        self._send(b"".join(pieces))

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def _send_records(self) -> None:
        self._send(self._outgoing.read())

    def _send(self, records: bytes) -> None:
        if records and not self.disconnected:
            send_through(self, records)

    # -- the handshake ----------------------------------------------------

    def _handshake(self) -> Any:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return None
        except ssl.SSLEOFError:
            return main.CONNECTION_LOST  # the peer closed: its own reason, if any, is logged there
        except (ssl.SSLError, ValueError) as e:
            self.tls_problem = self._describe(e) if isinstance(e, ssl.SSLError) else str(e)
            self._flush_alert()
            return main.CONNECTION_LOST
        self._handshaking = False
        self._send_records()
        held, self._held = self._held, []
        if held:
            self.write(b"".join(held))
        then_lose, self._then_lose = self._then_lose, None
        if then_lose is not None:
            then_lose()
        return None

    def _flush_alert(self) -> None:
        records = self._outgoing.read()
        if records:
            try:
                self.socket.send(records)
            except OSError:
                pass

    # -- closing ----------------------------------------------------------

    def loseWriteConnection(self) -> None:
        if self._handshaking:  # what was written waits for the handshake: so does this
            self._then_lose = self._then_lose or super().loseWriteConnection  # type: ignore[misc]
            return
        super().loseWriteConnection()  # type: ignore[misc]

    def loseConnection(self, *args: Any) -> None:
        if self._handshaking:
            self._then_lose = super().loseConnection  # type: ignore[misc]
            return
        super().loseConnection(*args)  # type: ignore[misc]

    def _close_notify(self) -> None:
        """Our close_notify (once); reading goes on until the peer's."""
        if self._closed_tls or self._handshaking:
            return
        self._closed_tls = True
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: the peer's close_notify has not come (yet)
        self._flush_alert()

    def _closeWriteConnection(self) -> None:
        self._close_notify()
        protocol = IHalfCloseableProtocol(self.protocol, None)
        if protocol is not None:
            try:
                protocol.writeConnectionLost()
            except BaseException:
                self.connectionLost(Failure())  # type: ignore[attr-defined]

    def _closeSocket(self, orderly: bool) -> None:
        if orderly:
            self._close_notify()
        super()._closeSocket(orderly)  # type: ignore[misc]

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # type: ignore[misc]
        # OpenSSL's memory goes now: the protocol (a state machine, full of cycles) may
        # keep this transport until the garbage collector's next full pass, and that
        # pass is driven by counts of Python objects, blind to OpenSSL's kilobytes.
        self._tls = self._incoming = self._outgoing = None  # type: ignore[assignment]
        self._held = []

    def tls_session(self) -> ssl.SSLSession | None:
        """This connection's TLS session (a client resumes it on its next connection)."""
        return None if self._handshaking or self._tls is None else self._tls.session

    def tls_resumed(self) -> bool:
        return not self._handshaking and self._tls is not None and self._tls.session_reused

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), once the handshake ended."""
        if self._handshaking or self._tls is None:
            return None
        return self._tls.getpeercert(binary_form=True)

    def tls_verified(self) -> bool:
        """The handshake ended with the peer's chain verified and its name checked
        (tls=2's context: OpenSSL refuses the handshake otherwise)."""
        if self._handshaking or self._tls is None:
            return False
        context = self._tls.context
        return (context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
                and bool(self._tls.server_hostname))

    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls.context if self._tls is not None else None


class CarriedTLS:
    """For a transport carried inside a TCP connection (a WebSocket, an HTTP/2 stream):
    the TLS it has is that connection's, started before it (``tcp_connection``)."""

    tcp_connection: Any

    @property
    def carrier_tls(self) -> bool:
        return bool(getattr(self.tcp_connection, "tls_started", False))

    def peer_certificate(self) -> bytes | None:
        return self.tcp_connection.peer_certificate() if self.carrier_tls else None

    @property
    def carrier_verified(self) -> bool:
        """The TLS under this transport verified its peer's certificate and name."""
        return self.carrier_tls and self.tcp_connection.tls_verified()

    def tls_session(self) -> ssl.SSLSession | None:
        return self.tcp_connection.tls_session() if self.carrier_tls else None

    def tls_context(self) -> ssl.SSLContext | None:
        return self.tcp_connection.tls_context() if self.carrier_tls else None

    def tls_resumed(self) -> bool:
        return self.carrier_tls and self.tcp_connection.tls_resumed()


_classes: dict[type, type] = {}


def _tls_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(f"TLS{base.__name__}", (TLSMixin, base), {})
    return cls


def supported(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and not isinstance(transport, TLSMixin)


def start_tls(transport: Any, context: ssl.SSLContext, server_side: bool,
              server_hostname: str | None = None,
              describe: Callable[[ssl.SSLError], str] = str,
              session: ssl.SSLSession | None = None) -> None:
    """From now on ``transport`` (a live TCP connection) speaks TLS: what it already
    buffered goes first, in the clear; the handshake starts now (a client resumes
    ``session`` when the server still takes it)."""
    if not supported(transport):
        raise TypeError(f"cannot start TLS on {transport!r}")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    # (made before the transport changes class: if OpenSSL refuses, it stays plain TCP)
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname, session=session)
    transport.__class__ = _tls_class(type(transport))
    transport._start(tls, incoming, outgoing, describe)
