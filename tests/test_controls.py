"""Traffic controls end to end: rate, slot, read, proxy, dial, notcp/noudp, and several
targets with failover — the real server and client on the memory network, on its clock.
Each test fails without its control (see the comment at each assertion)."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.protocols.haproxy import proxyEndpoint
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.inmemory import (
    LogLines,
    Running,
    User,
    ask,
    connect,
    echo_backend,
    pair,
    udp_peer,
)
from tests.memnet import MemoryNetwork
from tests.procs import run_nodepass

RATE_MBIT = 8
RATE_BYTES = RATE_MBIT * 1_000_000 / 8
RATE_SIZE = 3_000_000  # three seconds at the rate


@implementer(IHalfCloseableProtocol)
class _BothWays(Protocol):
    """Sends RATE_SIZE bytes at once and half-closes; notes when the last byte came in."""

    def connectionMade(self):
        self.factory.conn = self
        self.got, self.last = 0, 0.0
        self.transport.write(b"d" * RATE_SIZE)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.got += len(data)
        self.last = self.factory.clock.seconds()

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class _TellPeer(Protocol):
    """Answers its first data with the address it sees the connection coming from.
    (Not at connectionMade: Twisted's PROXY wrapper knows it only after the header.)"""

    def dataReceived(self, data):
        peer = self.transport.getPeer()
        self.transport.write(f"{peer.host}:{peer.port}".encode())
        self.transport.loseConnection()


class _Named(Protocol):
    def connectionMade(self):
        self.transport.write(self.factory.name)
        self.transport.loseConnection()


class _TellSource(DatagramProtocol):
    """Answers each datagram with the address it came from."""

    def datagramReceived(self, data, addr):
        self.transport.write(addr[0].encode(), addr)


class Case(SynchronousTestCase):
    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)

    def named_backend(self, name, port=0):
        factory = Factory.forProtocol(_Named)
        factory.name = name
        return self.net.listenTCP(port, factory, interface="127.0.0.1").getHost().port

    def proxy_backend(self):
        """Parses PROXY v1 or v2 with Twisted's parser and says who it sees."""
        listening = self.successResultOf(proxyEndpoint(
            TCP4ServerEndpoint(self.net, 0, interface="127.0.0.1")).listen(
            Factory.forProtocol(_TellPeer)))
        return listening.getHost().port

    def ask_who(self, port):
        """(what the backend said, the user's own address)."""
        user = connect(self.net, port)
        user.transport.write(b"?")
        self.net.flush()
        host = user.transport.getHost()
        return bytes(user.received).decode(), f"{host.host}:{host.port}"


class Rate(Case):
    def test_each_direction_is_held_to_the_rate_within_ten_percent(self):
        factory = Factory.forProtocol(_BothWays)
        factory.clock = self.net
        backend = self.net.listenTCP(0, factory, interface="127.0.0.1").getHost().port
        _, _, target = pair(self, self.net, backend, server_query=f"?rate={RATE_MBIT}")
        started = self.net.seconds()
        user = connect(self.net, target)
        user.transport.write(b"u" * RATE_SIZE)
        user.transport.loseWriteConnection()
        arrived = {}
        for _ in range(1000):  # at most 10 s of the clock
            self.net.run(0.01, step=0.01)
            if len(user.received) == RATE_SIZE and "down" not in arrived:
                arrived["down"] = self.net.seconds() - started
            if factory.conn.got == RATE_SIZE and "up" not in arrived:
                arrived["up"] = factory.conn.last - started
            if len(arrived) == 2:
                break
        # Without rate= both arrive at once on the memory network.
        for direction, seconds in arrived.items():
            measured = RATE_SIZE / seconds
            self.assertTrue(0.9 * RATE_BYTES <= measured <= 1.1 * RATE_BYTES,
                            f"{direction}: {measured:,.0f} B/s, expected {RATE_BYTES:,.0f} "
                            "± 10 %")
        self.assertEqual(len(arrived), 2)


class Slots(Case):
    def test_the_slot_limit_is_exact_and_counts_udp_sessions(self):
        backend = echo_backend(self.net)
        self.net.listenUDP(backend, _Echo(), interface="127.0.0.1")
        server, _, target = pair(self, self.net, backend, server_query="?slot=5")
        users = [connect(self.net, target) for _ in range(8)]
        alive = [u for u in users if not u.eof]
        self.assertEqual(len(alive), 5)  # without slot=5 all eight are served
        for user in alive:
            user.transport.write(b"ping")
        self.net.flush()
        self.assertEqual([bytes(u.received) for u in alive], [b"ping"] * 5)
        self.assertEqual(self.log.count("slot limit (5) reached"), 1)  # logged sparingly
        self.assertEqual(server.tunnel.report().refused, 3)
        # A UDP session takes a slot too: with five connections held there is no room...
        peer, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, peer, target, b"no room"), [])
        self.assertEqual(server.tunnel.report().refused, 4)
        # ...and once one closes, there is.
        alive[0].transport.loseConnection()
        self.net.flush()
        self.assertEqual(server.tunnel.report().connections, 4)
        self.assertEqual(ask(self.net, peer, target, b"room"), [b"room"])


class _Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class IdleTimeout(Case):
    def test_read_closes_idle_connections_and_spares_busy_ones(self):
        _, _, target = pair(self, self.net, echo_backend(self.net), server_query="?read=1s")
        idle, busy = connect(self.net, target), connect(self.net, target)
        for n in range(8):  # 2.4 s of traffic, every 0.3 s
            busy.transport.write(b"%d" % n)
            self.net.run(0.3)
        self.assertTrue(idle.eof)  # without read= it would still be open
        self.assertFalse(busy.eof)
        self.assertTrue(bytes(busy.received).endswith(b"7"))
        self.net.run(0.6)  # 0.9 s since its last byte
        self.assertFalse(busy.eof)
        self.net.run(0.2)
        self.assertTrue(busy.eof)  # a whole read= after its last byte


class ProxyProtocol(Case):
    def test_v1_asked_by_the_server_is_written_by_the_client(self):
        _, _, target = pair(self, self.net, self.proxy_backend(), server_query="?proxy=1")
        seen, me = self.ask_who(target)
        self.assertEqual(seen, me)  # without the header the parser drops the connection

    def test_v2_set_on_the_client(self):
        _, _, target = pair(self, self.net, self.proxy_backend(), client_query="?proxy=2&mode=2")
        seen, me = self.ask_who(target)
        self.assertEqual(seen, me)

    def test_v2_in_single_end_mode(self):
        forwarder = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:"
                                            f"{self.proxy_backend()}?mode=1&proxy=2")
        seen, me = self.ask_who(forwarder.listening_port("single-end"))
        self.assertEqual(seen, me)

    def test_without_proxy_the_backend_sees_the_daemon(self):
        _, _, target = pair(self, self.net, self.proxy_backend())
        seen, _ = self.ask_who(target)
        self.assertEqual(seen, "")  # the parser refused the headerless connection


class SourceAddress(Case):
    def test_dial_binds_connections_to_the_target(self):
        backend = self.net.listenTCP(0, Factory.forProtocol(_TellPeer),
                                     interface="127.0.0.1").getHost().port
        _, _, target = pair(self, self.net, backend, client_query="?dial=127.0.0.2&mode=2")
        seen, _ = self.ask_who(target)
        self.assertEqual(seen.split(":")[0], "127.0.0.2")  # else 127.0.0.1

    def test_dial_binds_udp_sessions_too(self):
        _, backend = udp_peer(self.net, protocol=_TellSource())
        _, _, target = pair(self, self.net, backend, client_query="?dial=127.0.0.3&mode=2")
        peer, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, peer, target, b"who?"), [b"127.0.0.3"])

    def test_an_address_not_of_this_machine_is_refused_at_start(self):
        result = run_nodepass("client://k@127.0.0.1:1/127.0.0.1:2?mode=2&dial=192.0.2.1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("query: dial address 192.0.2.1 cannot be used on this machine",
                      result.stderr)


class Protocols(Case):
    def test_notcp_leaves_the_target_port_to_udp(self):
        _, udp = udp_peer(self.net, echo=True)
        server, _, _ = pair(self, self.net, udp, server_query="?notcp=1")
        target = server.udp_port("target")
        self.assertEqual(self.net.find("127.0.0.1", target), None)  # no TCP listener there
        peer, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, peer, target, b"udp still"), [b"udp still"])

    def test_noudp_leaves_the_udp_port_free(self):
        _, _, target = pair(self, self.net, echo_backend(self.net), server_query="?noudp=1")
        self.net.listenUDP(target, DatagramProtocol(), interface="127.0.0.1")  # free: not ours
        user = connect(self.net, target)
        user.transport.write(b"tcp still")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"tcp still")

    def test_noudp_on_the_dialing_end_refuses_udp_sessions(self):
        _, udp = udp_peer(self.net, echo=True)
        _, client, target = pair(self, self.net, udp, client_query="?noudp=1&mode=2")
        peer, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, peer, target, b"nobody"), [])
        self.assertEqual(self.log.count("noudp=1 on this end"), 1)
        self.assertEqual(client.tunnel.report().refused, 1)


class Targets(Case):
    def test_connections_rotate_and_skip_a_target_that_is_down(self):
        down = self.net.ephemeral()
        up = self.named_backend(b"B")
        _, _, target = pair(self, self.net, 0, client_target=f"127.0.0.1:{down},127.0.0.1:{up}",
                            SERVICE_COOLDOWN="1s")

        def answers():
            got = []
            for _ in range(10):
                user = connect(self.net, target, User())
                self.net.flush()
                got.append(bytes(user.received))
            return got

        self.assertEqual(answers(), [b"B"] * 10)  # without failover every other one fails
        self.assertEqual(self.log.count(f"target 127.0.0.1:{down} failed (Connection was "
                                        "refused by other side): trying the others"), 1)
        # The target comes back: once its retry time has passed, it gets its turn again.
        self.named_backend(b"A", down)
        self.net.run(1.2)
        self.assertEqual(sorted(answers()), [b"A"] * 5 + [b"B"] * 5)
