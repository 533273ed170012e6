"""Backends for the benchmarks, run in their own process:

    python bench/backends.py ECHO_PORT SINK_PORT SOURCE_PORT

- echo: writes back what it reads; closes after the peer half-closes;
- sink: reads everything, answers the sha256 hex digest once the peer half-closes;
- source: on connect reads one line "<bytes>\\n", then sends that many bytes and closes.
"""

import hashlib
import sys

from twisted.internet import reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

BLOCK = bytes(range(256)) * 1024  # 256 KiB


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class Sink(Protocol):
    def connectionMade(self):
        self.digest = hashlib.sha256()

    def dataReceived(self, data):
        self.digest.update(data)

    def readConnectionLost(self):
        self.transport.write(self.digest.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class Source(Protocol):
    """Streams N bytes with a pull producer, so it never buffers more than a block."""

    def connectionMade(self):
        self.line = b""
        self.left = None

    def dataReceived(self, data):
        if self.left is not None:
            return
        self.line += data
        if b"\n" in self.line:
            self.left = int(self.line.split(b"\n", 1)[0])
            self.transport.registerProducer(self, False)

    def resumeProducing(self):
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        chunk = BLOCK[: min(len(BLOCK), self.left)]
        self.left -= len(chunk)
        self.transport.write(chunk)

    def stopProducing(self):
        self.left = 0


def main():
    echo, sink, source = (int(p) for p in sys.argv[1:4])
    for port, proto in ((echo, Echo), (sink, Sink), (source, Source)):
        reactor.listenTCP(port, Factory.forProtocol(proto), backlog=4096,
                          interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
