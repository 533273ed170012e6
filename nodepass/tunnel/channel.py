"""What every connection of the data path shares: addresses as text, socket tuning,
and a quiet factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.protocol import Factory, Protocol

from nodepass.url import Address


def _text(address: Any, otherwise: str) -> str:
    host = getattr(address, "host", None)
    return str(Address(host, address.port)) if host is not None else otherwise


def peer_of(transport: Any) -> str:
    """The address at the other end of a connection, as ``host:port``."""
    peer = transport.getPeer()
    return _text(peer, str(peer))


def host_of(transport: Any) -> str:
    """The local address a user reached (for LAUNCH and the PROXY header)."""
    return _text(transport.getHost(), "")


READ_SIZE = 256 * 1024


def tune(transport: Any, keepalive: bool = True) -> None:
    """Low latency, large reads, and (for tunnel connections, which may sit idle in a
    pool) keepalive so a vanished peer is noticed."""
    # Twisted reads (and pauses producers) by bufferSize, 64 KiB by default: larger
    # reads mean fewer trips through the reactor per megabyte.
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE
    for setter in ("setTcpNoDelay", "setTcpKeepAlive") if keepalive else ("setTcpNoDelay",):
        method = getattr(transport, setter, None)
        if method is not None:
            try:
                method(True)
            except OSError:
                pass


def nothing_waits(transport: Any) -> bool:
    """A live TCP transport with nothing in Twisted's write buffer: what is written now
    may go to the socket at once."""
    return (transport.connected and not transport.disconnecting
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer))


def send_through(transport: Any, data: bytes) -> None:
    """Write ``data`` (bytes for the socket as they are) to a TCP transport: straight to
    the socket when nothing waits before it, which spares a reactor turn per chunk
    (Twisted writes on the next "writable" event); what does not fit is buffered, with
    the usual producer pausing."""
    if nothing_waits(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or broken: the next doWrite or doRead finds out
        if sent == len(data):
            if transport.producer is not None and not transport.streamingProducer:
                transport.startWriting()  # a pull producer is asked for more by doWrite
            return
        data = data[sent:]
    abstract.FileDescriptor.write(transport, data)


def write_through(transport: Any, data: bytes) -> None:
    """A relay's write: through :func:`send_through` on a plain TCP transport, as usual on
    anything else (TLS encrypts first and sends through it itself)."""
    if type(transport) in _PLAIN_TCP:
        send_through(transport, data)
    else:
        transport.write(data)


_PLAIN_TCP = (tcp.Server, tcp.Client)


class QuietFactory(Factory):
    """Builds ``protocol_class(*args)`` for each connection, without log noise."""

    noisy = False

    def __init__(self, protocol_class: Callable[..., Protocol], *args: Any) -> None:
        self.protocol_class = protocol_class
        self.args = args

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.protocol_class(*self.args)
        protocol.factory = self
        return protocol
