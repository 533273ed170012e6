"""Real processes and sockets on 127.0.0.1 for integration tests; every wait is bounded."""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import DatagramProtocol, Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.procs import REPO, clean_env

WAIT = 20.0
FAST_ENV = {
    "REPORT_INTERVAL": "1s",
    "SERVICE_COOLDOWN": "200ms",
    "MIN_POOL_INTERVAL": "100ms",
    "MAX_POOL_INTERVAL": "1s",
    "MIN_POOL_CAPACITY": "8",
    "SHUTDOWN_TIMEOUT": "5s",
}


def closed_port(case: TestCase) -> int:
    """A TCP port on 127.0.0.1 where nothing accepts: bound and held by this test, never
    listened on, so a connection to it is refused and nobody else can take it meanwhile."""
    held = socket.socket()
    case.addCleanup(held.close)
    held.bind(("127.0.0.1", 0))
    return held.getsockname()[1]


def unreachable_udp_port(case: TestCase) -> int:
    """A UDP port on 127.0.0.1 that answers ICMP port unreachable: held by this test with a
    socket connected elsewhere, which the kernel does not deliver other senders' datagrams to."""
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    case.addCleanup(held.close)
    held.bind(("127.0.0.1", 0))
    held.connect(("127.0.0.1", 9))
    return held.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Daemon(ProcessProtocol):
    """A running nodepass: its output lines, waits on them, its exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._partial = b""
        self._waiters: list[tuple[re.Pattern[str], int, Deferred[str]]] = []
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            self.lines.append(raw.decode(errors="replace"))
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for entry in list(self._waiters):
            pattern, nth, d = entry
            hits = [line for line in self.lines if pattern.search(line)]
            if len(hits) >= nth:
                self._waiters.remove(entry)
                d.callback(hits[nth - 1])

    def wait_for(self, text: str, nth: int = 1, timeout: float = WAIT) -> Deferred[str]:
        """The ``nth`` line matching the regular expression ``text``."""
        d: Deferred[str] = Deferred()
        self._waiters.append((re.compile(text), nth, d))
        self._check()

        def explain(failure: Failure) -> Failure:
            tail = "\n  ".join(self.lines[-15:])
            raise AssertionError(f"{self.name}: no line /{text}/ (#{nth}) in {timeout}s:\n  {tail}")

        return d.addTimeout(timeout, reactor).addErrback(explain)

    async def listening_port(self, role: str, instance: str | None = None, udp: bool = False,
                   timeout: float = WAIT) -> int:
        """The port the OS gave this process's ``role`` listener (``tunnel``, ``target``,
        ``single-end``; ``udp`` for its UDP socket), read from the line announcing it; a
        master's child ``instance`` is named by its id."""
        what = "receiving UDP" if udp else "listening"
        prefix = rf"\[{re.escape(instance)}\] .*" if instance else ""
        line = await self.wait_for(rf"{prefix}\b{role} {what} on \S+:\d+$", timeout=timeout)
        return int(line.rsplit(":", 1)[1])

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines if re.search(text, line))

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.ended.callback(self.exit_code)

    @property
    def pid(self) -> int:
        return self.transport.pid

    def send_signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int | None:
        self.send_signal(sig)
        return await self.ended.addTimeout(timeout, reactor)


def spawn(case: TestCase, url: str | None, name: str | None = None, stdin: str = "",
          **env: str) -> Daemon:
    """Start ``nodepass URL`` as users do (``nodepass`` alone when ``url`` is None; its
    standard input says ``stdin``); it is killed at the end of the test."""
    daemon = Daemon(name or (url or "nodepass").split(":", 1)[0])
    environment = clean_env(**{**FAST_ENV, **env})
    process = reactor.spawnProcess(
        daemon, sys.executable, [sys.executable, "-m", "nodepass", *([url] if url else [])],
        env=environment, path=str(REPO))
    if stdin:
        process.writeToChild(0, stdin.encode())
    process.closeChildFD(0)

    async def cleanup() -> None:
        if daemon.running:
            daemon.send_signal(signal.SIGKILL)
            await daemon.ended

    case.addCleanup(lambda: ensureDeferred(cleanup()))
    return daemon


async def reverse_server(case: TestCase, key: str = "k", query: str = "",
                         **env: str) -> tuple[Daemon, int, int]:
    """A reverse-mode server on ports the OS chose: it, its tunnel port, its target port."""
    server = spawn(case, f"server://{key}@127.0.0.1:0/127.0.0.1:0{query}", **env)
    return server, await server.listening_port("tunnel"), await server.listening_port("target")


async def tunnel_pair(case: TestCase, target_port: int, key: str = "secret",
                      server_query: str = "", client_query: str = "",
                      client_target: str | None = None,
                      **env: str) -> tuple[Daemon, Daemon, int]:
    """A server and a client on fresh ports; returns them and the server's target port.
    ``client_target`` replaces 127.0.0.1:target_port (a list of targets, say)."""
    client_target = client_target or f"127.0.0.1:{target_port}"
    server, tunnel_port, exposed = await reverse_server(case, key, server_query, **env)
    client = spawn(case, f"client://{key}@127.0.0.1:{tunnel_port}/{client_target}"
                         f"{client_query}", **env)
    await client.wait_for("tunnel session open")
    await server.wait_for("tunnel session open")
    return server, client, exposed


# ---------------------------------------------------------------------------
# Backends


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes; on the peer's half-close, finishes writing and closes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class DigestAfterEOF(Protocol):
    """Replies with the sha256 of everything received, only once the peer half-closes."""

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.digest.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


async def listen(case: TestCase, factory: Factory) -> int:
    port = await TCP4ServerEndpoint(reactor, 0, backlog=4096, interface="127.0.0.1").listen(
        factory)
    case.addCleanup(port.stopListening)
    return port.getHost().port


async def http_backend(case: TestCase, path: bytes, body: bytes) -> int:
    """A web server on 127.0.0.1 serving ``body`` at ``/path``; returns its port."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    root = Resource()
    root.putChild(path, Data(body, "text/plain"))
    site = Site(root)
    site.noisy = False
    return await listen(case, site)


def need(tool: str, package: str) -> str:
    """The path of ``tool``, or skip the test saying how to get it."""
    import shutil

    from twisted.trial.unittest import SkipTest

    path = shutil.which(tool)
    if path is None:
        raise SkipTest(f"{tool} is not installed: apt-get install {package}")
    return path


async def echo_backend(case: TestCase) -> int:
    return await listen(case, Factory.forProtocol(Echo))


# ---------------------------------------------------------------------------
# Clients


def pattern_bytes(size: int, seed: int = 0, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """Deterministic, incompressible-looking data, generated lazily."""
    block = hashlib.sha256(str(seed).encode()).digest() * (chunk // 32)
    sent = 0
    counter = 0
    while sent < size:
        piece = block[: min(chunk, size - sent)]
        # vary each chunk so a reordering or a repeat would change the hash
        piece = counter.to_bytes(8, "big") + piece[8:] if len(piece) >= 8 else piece
        counter += 1
        sent += len(piece)
        yield piece


@implementer(IPullProducer)
class _ChunkProducer:
    def __init__(self, transport, chunks: Iterator[bytes], on_sent, half_close: bool) -> None:
        self.transport = transport
        self.chunks = chunks
        self.on_sent = on_sent
        self.half_close = half_close
        self.digest = hashlib.sha256()
        self.size = 0

    def resumeProducing(self) -> None:
        try:
            chunk = next(self.chunks)
        except StopIteration:
            self.transport.unregisterProducer()
            if self.half_close:
                self.transport.loseWriteConnection()
            self.on_sent(self)
            return
        self.digest.update(chunk)
        self.size += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Collector(Protocol):
    """Sends ``chunks`` (with backpressure), then half-closes; hashes what comes back."""

    def __init__(self, chunks: Iterator[bytes], half_close: bool = True,
                 keep: bool = False) -> None:
        self.chunks = chunks
        self.half_close = half_close
        self.keep = keep
        self.received = bytearray()
        self.digest = hashlib.sha256()
        self.size = 0
        self.sent: Deferred[_ChunkProducer] = Deferred()
        self.done: Deferred[Collector] = Deferred()

    def connectionMade(self) -> None:
        producer = _ChunkProducer(self.transport, self.chunks, self.sent.callback,
                                  self.half_close)
        self.transport.registerProducer(producer, False)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)
        if self.keep:
            self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self)


async def exchange(port: int, chunks: Iterator[bytes], keep: bool = True,
                   timeout: float = WAIT) -> Collector:
    """Connect, send ``chunks``, half-close, and collect the reply until the peer closes."""
    collector = Collector(chunks, keep=keep)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
        _OneShot(collector))
    return await collector.done.addTimeout(timeout, reactor)


class _OneShot(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol_instance


@implementer(IHalfCloseableProtocol)
class _Forward(Protocol):
    """One side of a test proxy: what it reads goes to ``peer``; bytes are recorded;
    a half-close is passed on."""

    def __init__(self, record: bytearray) -> None:
        self.record = record
        self.peer: _Forward | None = None
        self.early: list[bytes] = []
        self.eof = False

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.peer.eof:
            self.transport.loseConnection()
            self.peer.transport.loseConnection()
        else:
            self.peer.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.record += data
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _ForwardingFactory(Factory):
    def __init__(self, upstream: int, record: bytearray) -> None:
        self.upstream = upstream
        self.record = record

    def buildProtocol(self, addr) -> Protocol:
        inbound = _Forward(self.record)
        outbound = _Forward(self.record)
        inbound.peer, outbound.peer = outbound, inbound

        def connected(_):
            for data in inbound.early:
                outbound.transport.write(data)
            inbound.early.clear()

        TCP4ClientEndpoint(reactor, "127.0.0.1", self.upstream).connect(
            _OneShot(outbound)).addCallbacks(connected,
                                             lambda _: inbound.transport.loseConnection())
        return inbound


async def recording_proxy(case: TestCase, upstream: int) -> tuple[int, bytearray]:
    """A TCP forwarder to ``upstream`` that records every byte in both directions."""
    record = bytearray()
    port = await listen(case, _ForwardingFactory(upstream, record))
    return port, record


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def eventually(check, timeout: float = WAIT, step: float = 0.05) -> Any:
    """Poll ``check()`` until it is true and return what it gave; fail after ``timeout``
    seconds.  ``check`` may be a coroutine function (an API call, say)."""
    waited = 0.0
    while not (result := await _called(check)):
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(step)
        waited += step
    return result


async def _called(check) -> Any:
    result = check()
    return await result if inspect.isawaitable(result) else result


# ---------------------------------------------------------------------------
# Held connections and UDP


class Held(Protocol):
    """A connection kept open: what it got, and ``closed`` when it ends."""

    def __init__(self):
        self.closed = Deferred()
        self.got = b""

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason):
        self.closed.callback(None)


async def hold(port: int) -> Held:
    held = Held()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(_OneShot(held))
    return held


class UdpEcho(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)



class Peer(DatagramProtocol):
    """A user's UDP socket: send, and wait for replies (bounded)."""

    def __init__(self, port):
        self.port = port
        self.replies = []
        self.waiter = None
        self.expected = 0

    def startProtocol(self):
        self.transport.connect("127.0.0.1", self.port)

    def datagramReceived(self, data, addr):
        self.replies.append(data)
        if self.waiter is not None and len(self.replies) >= self.expected:
            waiter, self.waiter = self.waiter, None
            waiter.callback(None)

    async def ask(self, payload, answers=1, timeout=5.0):
        self.expected = len(self.replies) + answers
        self.waiter = Deferred()
        self.transport.write(payload)
        await self.waiter.addTimeout(timeout, reactor)
        return self.replies[-answers:]


async def udp_backend(case, protocol):
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port


async def peer(case, port):
    p = Peer(port)
    listening = reactor.listenUDP(0, p, interface="127.0.0.1")
    case.addCleanup(listening.stopListening)
    return p


async def tcp_and_udp_echo(case: TestCase) -> int:
    """An echo service on one port number, TCP and UDP (as a DNS server would be)."""
    for _ in range(20):
        tcp = await echo_backend(case)
        try:
            port = reactor.listenUDP(tcp, UdpEcho(), interface="127.0.0.1")
        except OSError:
            continue
        case.addCleanup(port.stopListening)
        return tcp
    raise AssertionError("no port free for both TCP and UDP")
