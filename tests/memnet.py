"""A network in memory that is also a reactor, so real service trees run on it.

:class:`MemoryNetwork` is a MemoryReactorClock whose ``listenTCP``, ``connectTCP``
and ``listenUDP`` are live: endpoints, ListenerService, ClientService and the
target dialer work on it unchanged, and nothing touches a socket.  Time moves only
when the test advances it; bytes move when the test pumps (``flush``).

Its TCP keeps what the tunnel relies on: each direction is independent
(``loseWriteConnection`` is a half-close the peer hears as ``readConnectionLost``
when it can), a close is heard after what was written before it, an abort is a
reset both ends hear at once, a peer that stops reading (``pauseProducing``) makes
the writer's buffer grow until its registered producer is paused (and resumed when
it drains), and writing to a peer that is gone resets the writer.  No TLS: that is
for the tests on real sockets.
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    UserError,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorUDP,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

CHUNK = 64 * 1024  # delivered to a protocol per dataReceived
HIGH_WATER = 128 * 1024  # a writer's buffer above this pauses its producer
LOW_WATER = 32 * 1024  # ... and below this resumes it
ANY = ("0.0.0.0", "::", "")


class MemoryTransport:
    """One end of a TCP connection in memory."""

    TLS = False
    bufferSize = CHUNK

    def __init__(self, net: MemoryNetwork, protocol: Any, host: tuple[str, int],
                 peer: tuple[str, int]) -> None:
        self.net = net
        self.protocol = protocol
        self.host, self.peer_address = host, peer
        self.peer: MemoryTransport | None = None
        self.outgoing = bytearray()
        self.reading = True  # pauseProducing stops deliveries to our protocol
        self.closing = False  # loseConnection: close once flushed
        self.write_shut = False  # loseWriteConnection: EOF once flushed
        self.eof_sent = False
        self.eof_received = False
        self.lost = False
        self.partitioned = False  # the link is down: nothing crosses, not even a reset
        self.disconnecting = False
        self.producer: Any = None
        self.streaming = False
        self._producer_paused = False

    # -- ITransport --------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost or self.closing or self.write_shut or not data:
            return
        self.outgoing += data
        self.net.active.add(self)
        if self.producer is not None and self.streaming and not self._producer_paused \
                and len(self.outgoing) > HIGH_WATER:
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.closing = self.disconnecting = True
        self.net.active.add(self)

    def abortConnection(self) -> None:
        """A reset: both ends lose the connection now (unless the link is down: then only
        this end); what was buffered is dropped."""
        peer = self.peer
        self._lose(ConnectionLost("aborted"))
        if peer is not None and not self.partitioned:
            peer._lose(ConnectionLost("connection reset by peer"))

    def loseWriteConnection(self) -> None:
        self.write_shut = True
        self.net.active.add(self)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", *self.peer_address)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", *self.host)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def startTLS(self, options: Any) -> None:
        raise NotImplementedError("no TLS on the memory network: test TLS on real sockets")

    # -- IPushProducer (our reading) and IConsumer (our writing) -------------

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True
        if self.peer is not None:
            self.net.active.add(self.peer)  # what it held for us may move again

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- the network's work --------------------------------------------------

    def pump(self) -> bool:
        """Deliver some of what we wrote, or our EOF, or close; whether anything moved."""
        if self.lost:
            return False
        peer = self.peer
        if self.partitioned:
            return False
        if self.outgoing:
            if peer is None or peer.lost:
                self._lose(ConnectionLost("connection reset by peer"))
                return True
            if peer.closing:  # it stopped reading when it closed: the bytes are lost
                self.outgoing.clear()
                self._drained()
                return True
            if not peer.reading:
                return False
            chunk = bytes(self.outgoing[:CHUNK])
            del self.outgoing[:CHUNK]
            self._drained()
            peer.protocol.dataReceived(chunk)
            return True
        if (self.closing or self.write_shut) and not self.eof_sent:
            self.eof_sent = True
            if peer is not None and not peer.lost:
                peer._eof()
            moved = True
        else:
            moved = False
        if self.closing and not self.lost:
            self._lose(ConnectionDone())
            return True
        return moved

    def _drained(self) -> None:
        if self._producer_paused and len(self.outgoing) <= LOW_WATER:
            self._producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def _eof(self) -> None:
        """The peer's stream ended: a protocol that can be half-closed hears it and
        decides when to close (as on a real socket); any other is closed."""
        self.eof_received = True
        if self.closing:
            self._lose(ConnectionDone())
        elif IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self._lose(ConnectionDone())

    def _lose(self, reason: Exception) -> None:
        if self.lost:
            return
        self.lost = self.disconnecting = True
        self.outgoing.clear()
        self.net.transports.discard(self)
        if self.peer is not None and not self.peer.lost:
            self.net.active.add(self.peer)  # its writes now meet a reset
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason))


class MemoryPort:
    def __init__(self, net: MemoryNetwork, host: str, port: int, factory: Any) -> None:
        self.net, self.host, self.port, self.factory = net, host, port, factory

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)

    def stopListening(self) -> None:
        self.net.listeners.pop((self.host, self.port), None)
        self.factory.doStop()

    def startListening(self) -> None:
        pass


class MemoryConnector:
    def __init__(self, net: MemoryNetwork, host: str, port: int, factory: Any,
                 source: str) -> None:
        self.net, self.host, self.port, self.factory, self.source = (net, host, port, factory,
                                                                    source)
        self.state = "connecting"
        self.transport: MemoryTransport | None = None

    def attempt(self) -> None:
        if self.state != "connecting":
            return
        self.state = "connected"
        listener = self.net.find(self.host, self.port)
        if listener is None:
            self.state = "failed"
            self.factory.clientConnectionFailed(self, Failure(ConnectionRefusedError()))
            return
        client_address = (self.source, self.net.ephemeral())
        server_address = (self.host, self.port)
        server = listener.factory.buildProtocol(IPv4Address("TCP", *client_address))
        if server is None:
            self.factory.clientConnectionFailed(self, Failure(ConnectionRefusedError()))
            return
        client = self.factory.buildProtocol(IPv4Address("TCP", *server_address))
        server_end = MemoryTransport(self.net, server, server_address, client_address)
        client_end = MemoryTransport(self.net, client, client_address, server_address)
        server_end.peer, client_end.peer = client_end, server_end
        self.transport = client_end
        self.net.transports.update((server_end, client_end))
        server.makeConnection(server_end)
        client.makeConnection(client_end)

    def stopConnecting(self) -> None:
        if self.state == "connecting":
            self.state = "cancelled"
            self.factory.clientConnectionFailed(self, Failure(UserError()))

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
        else:
            self.stopConnecting()

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)


class MemoryUdpPort:
    """A UDP socket in memory; ``connect`` makes writes go to one address."""

    maxPacketSize = 8192

    def __init__(self, net: MemoryNetwork, host: str, port: int, protocol: Any) -> None:
        self.net, self.host, self.port, self.protocol = net, host, port, protocol
        self.connected_to: tuple[str, int] | None = None
        self.open = True

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        destination = addr or self.connected_to
        assert destination is not None, "write on an unconnected UDP port needs an address"
        source = (_reachable(self.host), self.port)
        self.net.datagrams.append((destination, data, source))

    def connect(self, host: str, port: int) -> None:
        self.connected_to = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.host, self.port)

    def stopListening(self) -> None:
        self.open = False
        self.net.udp_ports.pop((self.host, self.port), None)
        self.protocol.doStop()

    def loseConnection(self) -> None:
        self.stopListening()


@implementer(IHostnameResolver)
class MemoryNames:
    """Names the memory network knows (``names["svc.test"] = ["127.0.0.1"]``); any other
    has no address.  Each lookup is counted."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        self.lookups.append(hostName)
        receiver.resolutionBegan(None)
        for ip in self.names.get(hostName, []):
            receiver.addressResolved(IPv4Address(transportSemantics, ip, portNumber))
        receiver.resolutionComplete()
        return receiver


@implementer(IReactorTCP, IReactorUDP, IReactorPluggableNameResolver)
class MemoryNetwork(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.names = MemoryNames()
        self.nameResolver = self.names
        self.listeners: dict[tuple[str, int], MemoryPort] = {}
        self.udp_ports: dict[tuple[str, int], MemoryUdpPort] = {}
        self.transports: set[MemoryTransport] = set()
        self.active: set[MemoryTransport] = set()  # those that may have something to move
        self.datagrams: deque[tuple[tuple[str, int], bytes, tuple[str, int]]] = deque()
        self._next_port = 30000

    def ephemeral(self) -> int:
        self._next_port += 1
        return self._next_port

    def _free(self, host: str, port: int, table: dict[tuple[str, int], Any]) -> int:
        if port == 0:
            port = self.ephemeral()
        if (host, port) in table or any((other, port) in table for other in ANY) or (
                host in ANY and any(p == port for _, p in table)):
            raise CannotListenError(host, port, OSError(errno.EADDRINUSE,
                                                        "Address already in use"))
        return port

    def find(self, host: str, port: int) -> MemoryPort | None:
        return self.listeners.get((host, port)) or next(
            (self.listeners[(a, port)] for a in ANY if (a, port) in self.listeners), None)

    # -- IReactorTCP / IReactorUDP -----------------------------------------------

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> MemoryPort:
        host = interface or "0.0.0.0"
        port = self._free(host, port, self.listeners)
        listening = MemoryPort(self, host, port, factory)
        self.listeners[(host, port)] = listening
        factory.doStart()
        return listening

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> MemoryConnector:
        source = bindAddress[0] if bindAddress else "127.0.0.1"
        connector = MemoryConnector(self, host, port, factory, source)
        factory.doStart()
        factory.startedConnecting(connector)
        self.callLater(0, connector.attempt)
        return connector

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> MemoryUdpPort:
        host = interface or "0.0.0.0"
        port = self._free(host, port, self.udp_ports)
        udp = MemoryUdpPort(self, host, port, protocol)
        self.udp_ports[(host, port)] = udp
        protocol.makeConnection(udp)
        return udp

    # -- faults -----------------------------------------------------------------

    def partition(self, transport: MemoryTransport) -> None:
        """The path of ``transport``'s connection goes down both ways: bytes, closes and
        resets wait forever, as a dead link looks to both ends."""
        transport.partitioned = True
        if transport.peer is not None:
            transport.peer.partitioned = True

    # -- moving time and bytes -------------------------------------------------

    def flush(self, limit: int = 100_000) -> None:
        """Deliver bytes and datagrams and run what is due now, until nothing moves."""
        for _ in range(limit):
            self.advance(0)
            moved = False
            for transport in list(self.active):
                if transport.pump():
                    moved = True
                else:
                    self.active.discard(transport)
            while self.datagrams:
                moved = True
                destination, data, source = self.datagrams.popleft()
                udp = self.udp_ports.get(destination) or next(
                    (self.udp_ports[(a, destination[1])] for a in ANY
                     if (a, destination[1]) in self.udp_ports), None)
                if udp is not None and udp.open:
                    udp.protocol.datagramReceived(data, source)
                else:
                    self._unreachable(destination, source)
            if not moved and not any(c.getTime() <= self.seconds() for c in self.calls):
                return
        raise AssertionError(f"the memory network did not settle in {limit} rounds")

    def _unreachable(self, destination: tuple[str, int], source: tuple[str, int]) -> None:
        """Nobody at ``destination``: as the kernel does with ICMP port unreachable, a
        sender whose socket is connected there hears ``connectionRefused``."""
        sender = self.udp_ports.get(source) or next(
            (p for p in self.udp_ports.values() if p.port == source[1]), None)
        if sender is not None and sender.open and sender.connected_to == destination:
            sender.protocol.connectionRefused()

    def run(self, seconds: float, step: float = 0.1) -> None:
        """Let ``seconds`` pass in steps, flushing after each."""
        self.flush()
        elapsed = 0.0
        while elapsed < seconds - 1e-9:
            delta = min(step, seconds - elapsed)
            self.advance(delta)
            elapsed += delta
            self.flush()


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ANY else host
