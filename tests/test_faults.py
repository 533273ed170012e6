"""Faults, floods and load: what breaks, what survives, what is freed.  Floods and load
run on the memory network (InMemory); killed processes, descriptors and memory on real
ones."""

import os
import resource
import signal
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nodepass.tunnel import wire
from nodepass.tunnel.handshake import ClientHandshake
from nodepass.tunnel.wire import Kind
from tests.fakemaster import MemoryMaster
from tests.inmemory import LogLines, Running, connect, pair
from tests.inmemory import echo_backend as memory_echo_backend
from tests.integration import (
    Echo,
    echo_backend,
    eventually,
    exchange,
    hold,
    rss_kib,
    sleep,
    spawn,
    tunnel_pair,
)
from tests.memnet import MemoryNetwork


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
        backend = await listen_echo(self, 0)
        backend_port = backend.getHost().port
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

class _WrongKey(Protocol):
    """Speaks the handshake with a wrong key, as an attacker would (one SPAKE2 message,
    made once, for every attempt; an AUTH it made up); ``done`` fires with True if it
    was refused without a WELCOME."""

    PAKE = ClientHandshake(b"wrong", Kind.CONTROL, os.urandom(32)).pake()

    def __init__(self):
        self.hs = ClientHandshake(b"wrong", Kind.CONTROL, os.urandom(32))
        self.decoder = wire.FrameDecoder()
        self.answered = False  # a WELCOME, or anything else after our AUTH: a leak
        self.pake = False  # the server spent a PAKE on it
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.hs.hello())

    def dataReceived(self, data):
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if frame.type is wire.Type.CHALLENGE:
                self.transport.write(self.PAKE)
            elif frame.type is wire.Type.PAKE and not self.pake:
                self.pake = True
                self.transport.write(wire.auth(os.urandom(wire.MAC_SIZE)))
            else:
                self.answered = True

    def connectionLost(self, reason):
        self.done.callback(not self.answered)


class ClearErrors(TestCase):
    timeout = 60

    async def test_unusable_state_directory_stops_the_master_with_its_name(self):
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file where a directory should be")
        master = spawn(self, f"master://127.0.0.1:0?state={blocker}/state",
                       name="master")
        self.assertEqual(await master.ended.addTimeout(20, reactor), 2)  # like a bad TLS file
        await master.wait_for(rf"nodepass: error: state directory '{blocker}/state' cannot be "
                              "created")



class InMemory(SynchronousTestCase):
    """The real service trees on the memory network (tests/inmemory.py)."""

    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)
        self.backend = memory_echo_backend(self.net)

    def test_ten_thousand_wrong_keys_are_refused_and_logged_sparingly(self):
        server, _, target = pair(self, self.net, self.backend)
        tunnel = server.listening_port("tunnel")
        attempts = []
        for _ in range(50):
            for _n in range(200):
                attempt = _WrongKey()
                connect(self.net, tunnel, attempt)
                attempts.append(attempt)
            self.net.flush()
        refused = [self.successResultOf(a.done) for a in attempts]
        self.assertEqual(refused, [True] * 10_000)  # and not one answered after AUTH
        # the attempt limits: five wrong guesses from this host got a PAKE, no more
        self.assertEqual(sum(a.pake for a in attempts), 5)
        self.assertLessEqual(self.log.count("authentication failed from"), 3,
                             "a flood must not fill the log")
        self.assertLessEqual(self.log.count("refused a key attempt from"), 3)
        user = connect(self.net, target)
        user.transport.write(b"live")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"live")

    def test_semaphore_limit_is_exact_and_nothing_hangs(self):
        _, _, target = pair(self, self.net, self.backend, SEMAPHORE_LIMIT="50",
                            MIN_POOL_CAPACITY="64")
        users = [connect(self.net, target) for _ in range(60)]
        self.assertEqual(sum(u.eof for u in users), 10)
        alive = [u for u in users if not u.eof]
        for user in alive:
            user.transport.write(b"ping")
        self.net.flush()
        self.assertEqual([bytes(u.received) for u in alive], [b"ping"] * 50)

    def test_two_thousand_concurrent_connections_every_byte_checked(self):
        _, _, target = pair(self, self.net, self.backend, MAX_POOL_CAPACITY="2048",
                            SEMAPHORE_LIMIT="4096")
        users = [connect(self.net, target) for _ in range(2000)]
        payloads = [b"%05d" % i * 400 for i in range(2000)]
        for user, payload in zip(users, payloads, strict=True):
            user.transport.write(payload)
            user.transport.loseWriteConnection()
        self.net.flush()
        ok = sum(bytes(u.received) == p for u, p in zip(users, payloads, strict=True))
        self.assertEqual(ok, 2000)
        self.assertEqual(self.log.matching("WARN"), [])

    def test_an_unresolvable_target_is_reported_and_the_tunnel_keeps_working(self):
        server = Running(self, self.net, "server://k@127.0.0.1:0/127.0.0.1:0")
        lost = Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/"
                                       "no-such-host.invalid:80?mode=2")
        user = connect(self.net, server.listening_port("target"))
        user.transport.write(b"anyone?")
        self.net.flush()
        self.assertEqual((bytes(user.received), user.eof), (b"", True))
        self.assertEqual(self.log.count("cannot reach target no-such-host.invalid:80: "), 1)
        self.assertEqual(lost.tunnel.report().state, "connected")
        # the same server serves the next client, whose target resolves
        lost.stop()
        Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/127.0.0.1:"
                                f"{self.backend}?mode=2")
        user = connect(self.net, server.listening_port("target"))
        user.transport.write(b"here")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"here")

    def test_wrong_api_keys_in_bulk_are_refused_and_logged_sparingly(self):
        master = MemoryMaster(self)
        codes = [self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances", key="not-the-key")))[0] for _ in range(3000)]
        self.assertEqual(codes, [401] * 3000)
        self.assertLessEqual(self.log.count("refused an API request without a valid key"), 3)
        code, envelope, _ = self.successResultOf(ensureDeferred(master.call(
            "GET", master.seed + "/instances")))
        self.assertEqual((code, envelope["data"]), (200, {"instances": []}))
