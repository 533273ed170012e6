"""Faults, floods and load on real processes: what breaks, what survives, what is freed."""

import os
import resource
import signal
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from nodepass.tunnel import wire
from nodepass.tunnel.handshake import ClientHandshake
from nodepass.tunnel.wire import Kind
from tests.integration import (
    Echo,
    _ForwardingFactory,
    _OneShot,
    echo_backend,
    eventually,
    exchange,
    free_port,
    hold,
    listen,
    rss_kib,
    sleep,
    spawn,
    tunnel_pair,
)


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def tunnel_port_of(daemon):
    for line in daemon.lines:
        if "tunnel listening on" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("no tunnel port")


def raise_fd_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class PeersKilled(TestCase):
    timeout = 120

    async def transfer_then_kill(self, victim_of, restart):
        backend_port = free_port()
        backend = await listen_echo(self, backend_port)
        server, client, exposed = await tunnel_pair(self, backend_port)
        await sleep(0.5)
        baseline = {d.name: fds(d.pid) for d in (server, client)}
        held = await hold(exposed)
        held.transport.write(b"x" * 100_000)
        await eventually(lambda: len(held.got) >= 100_000)
        victim = victim_of(server, client, backend)
        if hasattr(victim, "stopListening"):
            await victim.stopListening()
            for conn in list(_Tracked.live):
                conn.transport.abortConnection()
        else:
            await victim.stop(signal.SIGKILL)
        await held.closed.addTimeout(10, reactor)  # the user is told, promptly
        survivors = [d for d in (server, client) if d is not victim and d.running]
        for d in survivors:
            await eventually(lambda d=d: fds(d.pid) <= baseline[d.name] + 2, timeout=10)
        await restart(server, client, backend_port)
        result = await exchange(exposed, iter([b"after the fault"]), timeout=15)
        self.assertEqual(bytes(result.received), b"after the fault")

    async def test_backend_killed_mid_transfer(self):
        async def restart(server, client, port):
            await listen_echo(self, port)

        await self.transfer_then_kill(lambda s, c, b: b, restart)

    async def test_client_killed_mid_transfer(self):
        async def restart(server, client, port):
            again = spawn(self, f"client://secret@127.0.0.1:{tunnel_port_of(server)}/"
                                f"127.0.0.1:{port}", name="client-2")
            await again.wait_for("tunnel session open")

        await self.transfer_then_kill(lambda s, c, b: c, restart)

    async def test_server_killed_mid_transfer(self):
        async def restart(server, client, port):
            target = next(line for line in server.lines if "target listening on" in line)
            exposed = target.rsplit(" ", 1)[1]
            again = spawn(self, f"server://secret@127.0.0.1:{tunnel_port_of(server)}/{exposed}",
                          name="server-2")
            await again.wait_for("tunnel session open")
            await client.wait_for("tunnel session open", nth=2)

        await self.transfer_then_kill(lambda s, c, b: s, restart)


class _Tracked(Echo):
    live: set = set()

    def connectionMade(self):
        _Tracked.live.add(self)

    def connectionLost(self, reason):
        _Tracked.live.discard(self)


async def listen_echo(case, port):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(
        Factory.forProtocol(_Tracked))
    case.addCleanup(listening.stopListening)
    return listening


class _Valve(_ForwardingFactory):
    """A forwarding proxy that can go silent (stop forwarding, keep connections open)."""

    def __init__(self, upstream, record):
        super().__init__(upstream, record)
        self.sides = []

    def buildProtocol(self, addr):
        inbound = super().buildProtocol(addr)
        self.sides.extend([inbound, inbound.peer])
        return inbound

    def silence(self):
        for side in self.sides:
            if side.transport is not None:
                side.transport.pauseProducing()


class SilentNetwork(TestCase):
    timeout = 90

    async def test_heartbeat_declares_a_silent_session_dead_and_both_recover(self):
        backend = await echo_backend(self)
        tunnel, exposed = free_port(), free_port()
        env = {"REPORT_INTERVAL": "500ms"}
        server = spawn(self, f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{exposed}", **env)
        await server.wait_for("target listening")
        valve = _Valve(tunnel, bytearray())
        proxy = await listen(self, valve)
        client = spawn(self, f"client://k@127.0.0.1:{proxy}/127.0.0.1:{backend}", **env)
        await client.wait_for("tunnel session open")
        started = time.monotonic()
        valve.silence()  # packets stop; nothing is closed
        await server.wait_for("missed its heartbeats", timeout=5)
        await client.wait_for("missed its heartbeats", timeout=5)
        self.assertLess(time.monotonic() - started, 3.5)  # 3 intervals of 0.5 s, plus slack
        # the proxy heals: new connections through it work again
        valve.sides.clear()
        await client.wait_for("tunnel session open", nth=2, timeout=15)
        result = await exchange(exposed, iter([b"healed"]))
        self.assertEqual(bytes(result.received), b"healed")


class Floods(TestCase):
    timeout = 180

    async def test_a_thousand_silent_connections_time_out_and_disturb_nothing(self):
        raise_fd_limit()
        backend = await echo_backend(self)
        server, _, exposed = await tunnel_pair(self, backend)
        port = tunnel_port_of(server)
        before_fds, before_rss = fds(server.pid), rss_kib(server.pid)
        silent = []
        for _ in range(1000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            silent.append(s)
        self.addCleanup(lambda: [s.close() for s in silent])
        await eventually(lambda: fds(server.pid) >= before_fds + 900, timeout=10)
        result = await exchange(exposed, iter([b"still here"]), timeout=5)
        self.assertEqual(bytes(result.received), b"still here")
        self.assertLess((rss_kib(server.pid) - before_rss) / 1024, 32)
        # the handshake timeout (10 s) closes every one of them (the pool may move by a few)
        await eventually(lambda: fds(server.pid) <= before_fds + 20, timeout=20)

    async def test_ten_thousand_wrong_keys_are_refused_and_logged_sparingly(self):
        backend = await echo_backend(self)
        server, _, exposed = await tunnel_pair(self, backend)
        port = tunnel_port_of(server)
        refused = await wrong_keys(port, 10_000, batch=200)
        self.assertEqual(refused, 10_000)
        lines = server.count("authentication failed from")
        self.assertLessEqual(lines, 3, "a flood must not fill the log")
        started = time.monotonic()
        result = await exchange(exposed, iter([b"live"]), timeout=5)
        self.assertEqual(bytes(result.received), b"live")
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_semaphore_limit_is_exact_and_nothing_hangs(self):
        raise_fd_limit()
        backend = await echo_backend(self)
        _, _, exposed = await tunnel_pair(self, backend, SEMAPHORE_LIMIT="50",
                                          MIN_POOL_CAPACITY="64")
        await sleep(0.5)
        held = [await hold(exposed) for _ in range(60)]
        await sleep(0.5)
        closed = [h for h in held if h.closed.called]
        self.assertEqual(len(closed), 10)
        alive = [h for h in held if not h.closed.called]
        for h in alive:
            h.transport.write(b"ping")
        await eventually(lambda: all(h.got == b"ping" for h in alive), timeout=10)
        for h in alive:
            h.transport.loseConnection()

    async def test_two_thousand_concurrent_connections_every_byte_checked(self):
        raise_fd_limit()
        backend = await echo_backend(self)
        server, client, exposed = await tunnel_pair(self, backend, MAX_POOL_CAPACITY="2048",
                                                    SEMAPHORE_LIMIT="4096")
        payloads = [b"%05d" % i * 400 for i in range(2000)]
        results = await gatherResults(
            [Deferred.fromCoroutine(exchange(exposed, iter([p]), timeout=60))
             for p in payloads], consumeErrors=True)
        ok = sum(bytes(r.received) == p for r, p in zip(results, payloads, strict=True))
        self.assertEqual(ok, 2000)
        self.assertEqual([line for line in server.lines + client.lines if "WARN" in line], [])


class _WrongKey(Protocol):
    """Speaks the handshake with a wrong key; ``done`` fires with True if refused silently."""

    def __init__(self):
        self.hs = ClientHandshake(b"wrong", Kind.CONTROL, os.urandom(32))
        self.decoder = wire.FrameDecoder()
        self.answered = False
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.hs.hello())

    def dataReceived(self, data):
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if frame.type is wire.Type.CHALLENGE:
                self.hs.on_challenge(frame.payload)
                self.transport.write(self.hs.auth())
            else:
                self.answered = True  # anything after AUTH would be a leak

    def connectionLost(self, reason):
        self.done.callback(not self.answered)


async def wrong_keys(port, count, batch):
    """Authenticate ``count`` times with a wrong key; return how many were refused."""
    refused = 0
    for start in range(0, count, batch):
        attempts = []
        for _ in range(min(batch, count - start)):
            proto = _WrongKey()
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(_OneShot(proto))
            attempts.append(proto.done)
        refused += sum(await gatherResults(attempts))
    return refused


class ClearErrors(TestCase):
    timeout = 60

    async def test_unusable_state_directory_stops_the_master_with_its_name(self):
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file where a directory should be")
        master = spawn(self, f"master://127.0.0.1:{free_port()}?state={blocker}/state",
                       name="master")
        self.assertEqual(await master.ended.addTimeout(20, reactor), 1)
        await master.wait_for(rf"FATAL  state directory '{blocker}/state' cannot be created")

    async def test_unresolvable_target_is_reported_and_the_tunnel_keeps_working(self):
        backend = await echo_backend(self)
        tunnel, exposed = free_port(), free_port()
        server = spawn(self, f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{exposed}")
        await server.wait_for("target listening")
        lost = spawn(self, f"client://k@127.0.0.1:{tunnel}/no-such-host.invalid:80",
                     name="client")
        await lost.wait_for("tunnel session open")
        result = await exchange(exposed, iter([b"anyone?"]), timeout=15)
        self.assertEqual(bytes(result.received), b"")
        await lost.wait_for(r"WARN   cannot reach target no-such-host\.invalid:80: ")
        self.assertTrue(lost.running)
        # the same server serves the next client, whose target resolves
        await lost.stop()
        good = spawn(self, f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{backend}",
                     name="client-2")
        await good.wait_for("tunnel session open")
        result = await exchange(exposed, iter([b"here"]), timeout=10)
        self.assertEqual(bytes(result.received), b"here")


class ApiKeyFlood(TestCase):
    timeout = 120

    async def test_wrong_api_keys_in_bulk_are_refused_and_logged_sparingly(self):
        from tests.test_master_api import Api, start_master

        master = await start_master(self)
        wrong = Api(master.base, key="not-the-key")
        codes = []
        for _ in range(30):
            batch = await gatherResults([Deferred.fromCoroutine(wrong.call("GET", "/instances"))
                                         for _ in range(100)])
            codes.extend(code for code, _, _ in batch)
        self.assertEqual(codes, [401] * 3000)
        self.assertLessEqual(master.count("refused an API request without a valid key"), 3)
        right = await Api(master.base).ok("GET", "/instances")
        self.assertEqual(right["instances"], [])
