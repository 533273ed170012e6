"""Run modes: server reverse/forward (and mode=0 choosing), client single-end (and
mode=0 choosing), TCP and UDP each.  The memory network runs what needs no kernel
(InMemory); real processes show exits, TLS, real addresses and descriptors."""

import os
import signal

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.inmemory import LogLines, Running, UdpPeer, ask, connect, udp_peer
from tests.inmemory import echo_backend as memory_echo_backend
from tests.integration import (
    Echo,
    echo_backend,
    eventually,
    exchange,
    hold,
    listen,
    peer,
    sleep,
    spawn,
    tcp_and_udp_echo,
)
from tests.memnet import MemoryNetwork

UDP_ENV = {"UDP_READ_TIMEOUT": "2s", "REPORT_INTERVAL": "200ms"}


async def check_tcp_and_udp(case, port, size=256 * 1024):
    payload = bytes(range(256)) * (size // 256)
    result = await exchange(port, iter([payload]))
    case.assertEqual(bytes(result.received), payload)
    p = await peer(case, port)
    for n in range(20):
        (reply,) = await p.ask(b"datagram %d" % n)
        case.assertEqual(reply, b"datagram %d" % n)


class InMemory(SynchronousTestCase):
    """The real service trees on the memory network (tests/inmemory.py)."""

    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)
        self.backend = memory_echo_backend(self.net)
        self.net.listenUDP(self.backend, UdpPeer(echo=True), interface="127.0.0.1")

    def check_tcp_and_udp(self, port, size=256 * 1024):
        payload = bytes(range(256)) * (size // 256)
        user = connect(self.net, port)
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        self.net.flush()
        self.assertEqual(bytes(user.received), payload)
        peer, _ = udp_peer(self.net)
        for n in range(20):
            self.assertEqual(ask(self.net, peer, port, b"datagram %d" % n),
                             [b"datagram %d" % n])

    def test_forward_mode_client_listens_and_server_dials(self):
        server = Running(self, self.net, f"server://k@127.0.0.1:0/127.0.0.1:{self.backend}"
                                         "?mode=2", **UDP_ENV)
        self.assertEqual(self.log.count("forward mode: users connect to the client's target "
                                        "address"), 1)
        self.assertEqual(self.log.count("target listening"), 0)
        client = Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/"
                                         "127.0.0.1:0?mode=2", **UDP_ENV)
        self.assertEqual(self.log.count("server is in forward mode"), 1)
        self.check_tcp_and_udp(client.listening_port("target"))
        self.assertEqual(server.tunnel.report().mode, "forward")

    def test_mode_0_is_forward_when_the_target_is_taken_here(self):
        server = Running(self, self.net, f"server://k@127.0.0.1:0/127.0.0.1:{self.backend}",
                         **UDP_ENV)
        self.assertEqual(self.log.count(f"mode=0: cannot listen for target on 127.0.0.1:"
                                        f"{self.backend}: Address already in use: so forward "
                                        "mode"), 1)
        client = Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/"
                                         "127.0.0.1:0?mode=2", **UDP_ENV)
        self.check_tcp_and_udp(client.listening_port("target"))

    def test_mode_0_is_reverse_when_the_target_is_free(self):
        server = Running(self, self.net, "server://k@127.0.0.1:0/127.0.0.1:0", **UDP_ENV)
        target = server.listening_port("target")
        self.assertEqual(self.log.count(f"reverse mode: users connect to 127.0.0.1:{target} "
                                        "here"), 1)
        Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/127.0.0.1:"
                                f"{self.backend}?mode=2", **UDP_ENV)
        self.check_tcp_and_udp(target)
        self.assertEqual(self.log.count("forward mode"), 0)

    def test_single_end_forwards_tcp_and_udp_without_a_server(self):
        client = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:{self.backend}"
                                         "?mode=1", **UDP_ENV)
        self.assertEqual(self.log.count("single-end mode: forwarding"), 1)
        self.check_tcp_and_udp(client.listening_port("single-end"))
        self.assertEqual(client.tunnel.report().mode, "single-end")
        self.assertEqual(self.log.count("uses no tunnel key"), 0)

    def test_single_end_with_a_key_says_the_key_is_not_used(self):
        Running(self, self.net, f"client://k@127.0.0.1:0/127.0.0.1:{self.backend}?mode=1")
        self.assertEqual(self.log.count("mode=1: single-end mode uses no tunnel key: whoever "
                                        "reaches 127.0.0.1:0 is forwarded"), 1)

    def test_single_end_opens_target_connections_ahead_of_users(self):
        factory = Factory.forProtocol(_Greeting)
        factory.accepted = 0
        backend = self.net.listenTCP(0, factory, interface="127.0.0.1").getHost().port
        client = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:{backend}?mode=1",
                         MIN_POOL_CAPACITY="4")
        self.assertEqual(factory.accepted, 4)  # before any user arrived
        # A user gets a pre-opened connection, greeting included, and it is replaced.
        user = connect(self.net, client.listening_port("single-end"))
        user.transport.write(b"ping")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"hello\nping")
        self.assertEqual(factory.accepted, 5)

    def test_a_keyed_client_never_turns_single_end_by_itself(self):
        # mode=0, and the server's address is one this machine could listen on (the
        # server runs on the memory network): with a key in the URL it still dials it.
        server = Running(self, self.net, "server://k@127.0.0.1:0/127.0.0.1:0", **UDP_ENV)
        tunnel = server.listening_port("tunnel")
        Running(self, self.net, f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{self.backend}",
                **UDP_ENV)
        self.assertEqual(self.log.count("single-end"), 0)
        self.assertEqual(self.log.count("tunnel session open"), 2)
        self.check_tcp_and_udp(server.listening_port("target"))

    def test_mode_2_always_dials_a_server(self):
        Running(self, self.net, f"client://k@127.0.0.1:20000/127.0.0.1:{self.backend}?mode=2")
        self.assertEqual(self.log.count("cannot connect to server 127.0.0.1:20000"), 1)
        self.assertEqual(self.log.count("single-end"), 0)


class _Greeting(Echo):
    """An echo backend that counts its connections and greets each one first."""

    def connectionMade(self):
        self.factory.accepted += 1
        self.transport.write(b"hello\n")


class ServerModes(TestCase):
    timeout = 60

    async def test_forward_mode_server_vanishing_mid_stream_closes_the_user(self):
        backend = await echo_backend(self)
        server = spawn(self, f"server://k@127.0.0.1:0/127.0.0.1:{backend}?mode=2")
        await server.wait_for("forward mode")
        tunnel = await server.listening_port("tunnel")
        client = spawn(self, f"client://k@127.0.0.1:{tunnel}/127.0.0.1:0")
        exposed = await client.listening_port("target", udp=True)
        held = await hold(exposed)
        held.transport.write(b"x" * 100_000)
        await eventually(lambda: len(held.got) == 100_000)
        await server.stop(signal.SIGKILL)
        await held.closed.addTimeout(10, reactor)  # the user is told, promptly
        await client.wait_for("closed; reconnecting")
        self.assertTrue(client.running)

    async def test_mode_0_is_forward_when_the_target_is_not_an_address_here(self):
        # 192.0.2.1 (TEST-NET-1) is on no interface: nothing is ever sent to it here.
        server = spawn(self, "server://k@127.0.0.1:0/192.0.2.1:5432")
        await server.wait_for("mode=0: cannot listen for target on 192.0.2.1:5432: Cannot "
                              "assign requested address: so forward mode")
        await server.wait_for("forward mode: users connect to the client's target address; "
                              "this server dials 192.0.2.1:5432")

    async def test_mode_1_refuses_to_start_when_the_target_is_taken(self):
        backend = await echo_backend(self)
        server = spawn(self, f"server://k@127.0.0.1:0/127.0.0.1:{backend}?mode=1")
        code = await server.ended
        self.assertEqual(code, 1)
        self.assertIn(f"cannot listen for target on 127.0.0.1:{backend}: Address already in use",
                      "\n".join(server.lines))

    async def test_forward_mode_with_tls(self):
        backend = await tcp_and_udp_echo(self)
        server = spawn(self, f"server://k@127.0.0.1:0/127.0.0.1:{backend}?mode=2&tls=1",
                       **UDP_ENV)
        await server.wait_for("forward mode")  # before the client: else it may go single-end
        tunnel = await server.listening_port("tunnel")
        client = spawn(self, f"client://k@127.0.0.1:{tunnel}/127.0.0.1:0", **UDP_ENV)
        exposed = await client.listening_port("target", udp=True)  # the last listener to start
        self.assertEqual(client.count("server is in forward mode"), 1)
        await check_tcp_and_udp(self, exposed, size=4 * 1024 * 1024)


    async def test_a_forward_client_that_cannot_listen_stops_with_the_reason(self):
        backend = await echo_backend(self)
        taken = await echo_backend(self)
        server = spawn(self, f"server://k@127.0.0.1:0/127.0.0.1:{backend}?mode=2")
        await server.wait_for("forward mode")
        client = spawn(self, f"client://k@127.0.0.1:{await server.listening_port('tunnel')}/"
                             f"127.0.0.1:{taken}")
        self.assertEqual(await client.ended, 1)
        self.assertIn(f"cannot listen for target on 127.0.0.1:{taken}: Address already in use",
                      "\n".join(client.lines))


class _Counting(Echo):
    """An echo backend that counts its connections and greets each one first."""

    def connectionMade(self):
        self.factory.accepted += 1
        self.transport.write(b"hello\n")


class _ClosesIdle(_Counting):
    """Greets, then closes a connection that has not spoken within 0.1 s (an idle timeout)."""

    def connectionMade(self):
        super().connectionMade()
        self.timer = reactor.callLater(0.1, self.transport.loseConnection)

    def dataReceived(self, data):
        if self.timer.active():
            self.timer.cancel()
        super().dataReceived(data)

    def connectionLost(self, reason):
        if self.timer.active():
            self.timer.cancel()


class ClientModes(TestCase):
    timeout = 60

    async def test_target_connections_closed_while_waiting_are_let_go(self):
        factory = Factory.forProtocol(_ClosesIdle)
        factory.accepted = 0
        backend = await listen(self, factory)
        client = spawn(self, f"client://127.0.0.1:0/127.0.0.1:{backend}?mode=1",
                       MIN_POOL_CAPACITY="8", MIN_POOL_INTERVAL="300ms")
        listen_port = await client.listening_port("single-end")
        await eventually(lambda: factory.accepted >= 40, timeout=10)  # five rounds of eight
        await sleep(1.5)  # five more rounds, each closed by the target 0.1 s later
        # Each closed one was closed here too: no descriptor is left behind (the process
        # needs about 20; leaking them it holds over 50 by now).
        self.assertLess(len(os.listdir(f"/proc/{client.pid}/fd")), 32)
        result = await exchange(listen_port, iter([b"still served"]))
        self.assertEqual(bytes(result.received), b"hello\nstill served")

    async def test_mode_0_is_single_end_when_the_tunnel_address_is_free(self):
        backend = await echo_backend(self)
        client = spawn(self, f"client://127.0.0.1:0/127.0.0.1:{backend}")
        await client.wait_for("single-end mode: forwarding")
        listen_port = await client.listening_port("single-end")
        result = await exchange(listen_port, iter([b"direct"]))
        self.assertEqual(bytes(result.received), b"direct")

