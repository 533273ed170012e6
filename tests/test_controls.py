"""Traffic controls end to end with real processes: rate, slot, read, proxy, dial,
notcp/noudp, and several targets with failover.  Each test fails without its
control (see the comment at each assertion)."""

from twisted.internet import reactor
from twisted.internet.defer import TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.protocols.haproxy import proxyEndpoint
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.integration import (
    Collector,
    UdpEcho,
    _ChunkProducer,
    _OneShot,
    echo_backend,
    eventually,
    exchange,
    free_port,
    hold,
    listen,
    pattern_bytes,
    peer,
    sleep,
    spawn,
    tcp_and_udp_echo,
    tunnel_pair,
    udp_backend,
)
from tests.procs import run_nodepass

RATE_MBIT = 8
RATE_BYTES = RATE_MBIT * 1_000_000 / 8
RATE_SIZE = 10_000_000  # ten seconds at the rate


@implementer(IHalfCloseableProtocol)
class _BothWays(Protocol):
    """Sends RATE_SIZE bytes while it reads whatever comes; notes when the last came."""

    def connectionMade(self):
        self.factory.got = 0
        producer = _ChunkProducer(self.transport, pattern_bytes(RATE_SIZE, 1), lambda p: None,
                                  half_close=True)
        self.transport.registerProducer(producer, False)

    def dataReceived(self, data):
        self.factory.got += len(data)
        self.factory.last = reactor.seconds()

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class _Timed(Collector):
    last = 0.0

    def dataReceived(self, data):
        super().dataReceived(data)
        self.last = reactor.seconds()


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


async def named_backend(case, name, port=0):
    factory = Factory.forProtocol(_Named)
    factory.name = name
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
    case.addCleanup(listening.stopListening)
    return listening.getHost().port


async def proxy_backend(case):
    """A backend that parses PROXY v1 or v2 with Twisted's parser and says who it sees."""
    endpoint = proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    listening = await endpoint.listen(Factory.forProtocol(_TellPeer))
    case.addCleanup(listening.stopListening)
    return listening.getHost().port


async def ask_who(port):
    """Connect from a known port; return (what the backend said, our own address)."""
    collector = Collector(iter([b"?"]), keep=True)
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
        _OneShot(collector))
    host = protocol.transport.getHost()
    await collector.done.addTimeout(10, reactor)
    return bytes(collector.received).decode(), f"{host.host}:{host.port}"


class Rate(TestCase):
    timeout = 60

    async def test_each_direction_is_held_to_the_rate_within_ten_percent(self):
        factory = Factory.forProtocol(_BothWays)
        factory.got, factory.last = 0, 0.0
        backend = await listen(self, factory)
        _, _, exposed = await tunnel_pair(self, backend, server_query=f"?rate={RATE_MBIT}")
        user = _Timed(pattern_bytes(RATE_SIZE, 2))
        started = reactor.seconds()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(_OneShot(user))
        await user.done.addTimeout(40, reactor)
        self.assertEqual((factory.got, user.size), (RATE_SIZE, RATE_SIZE))
        up = RATE_SIZE / (factory.last - started)
        down = RATE_SIZE / (user.last - started)
        # Without rate= both are over 100 MB/s here.
        for name, measured in (("upload", up), ("download", down)):
            self.assertTrue(0.9 * RATE_BYTES <= measured <= 1.1 * RATE_BYTES,
                            f"{name}: {measured:,.0f} B/s, expected {RATE_BYTES:,.0f} ± 10 %")


class Slots(TestCase):
    timeout = 60

    async def test_the_slot_limit_is_exact_and_counts_udp_sessions(self):
        backend = await tcp_and_udp_echo(self)
        server, _, exposed = await tunnel_pair(
            self, backend, server_query="?slot=5&log=debug", REPORT_INTERVAL="200ms")
        held = [await hold(exposed) for _ in range(8)]
        await eventually(lambda: sum(h.closed.called for h in held) >= 3, timeout=5)
        await sleep(0.3)
        alive = [h for h in held if not h.closed.called]
        self.assertEqual(len(alive), 5)  # without slot=5 all eight are served
        for h in alive:
            h.transport.write(b"ping")
        await eventually(lambda: all(h.got == b"ping" for h in alive))
        await server.wait_for("refused connection from 127.0.0.1:[0-9]+: slot limit \\(5\\) "
                              "reached")
        await server.wait_for("refused=3")
        # A UDP session takes a slot too: with five connections held there is no room...
        p = await peer(self, exposed)
        with self.assertRaises(TimeoutError):
            await p.ask(b"no room", timeout=1.0)
        await server.wait_for("refused=4")
        # ...and once one closes, there is.
        alive[0].transport.loseConnection()
        await alive[0].closed
        await eventually(lambda: "connections=4" in server.lines[-1])
        self.assertEqual(await p.ask(b"room"), [b"room"])


class IdleTimeout(TestCase):
    timeout = 60

    async def test_read_closes_idle_connections_and_spares_busy_ones(self):
        backend = await echo_backend(self)
        _, _, exposed = await tunnel_pair(self, backend, server_query="?read=1s")
        idle, busy = await hold(exposed), await hold(exposed)
        started = reactor.seconds()
        for n in range(8):  # 2.4 s of traffic every 0.3 s
            busy.transport.write(b"%d" % n)
            await sleep(0.3)
        self.assertTrue(idle.closed.called)  # without read= it would still be open
        self.assertFalse(busy.closed.called)
        self.assertTrue(busy.got.endswith(b"7"))
        await busy.closed.addTimeout(5, reactor)
        self.assertGreater(reactor.seconds() - started, 2.1 + 0.9)  # last byte + read


class ProxyProtocol(TestCase):
    timeout = 60

    async def test_v1_asked_by_the_server_is_written_by_the_client(self):
        backend = await proxy_backend(self)
        _, _, exposed = await tunnel_pair(self, backend, server_query="?proxy=1")
        seen, me = await ask_who(exposed)
        self.assertEqual(seen, me)  # without the header the parser drops the connection

    async def test_v2_set_on_the_client(self):
        backend = await proxy_backend(self)
        _, _, exposed = await tunnel_pair(self, backend, client_query="?proxy=2")
        seen, me = await ask_who(exposed)
        self.assertEqual(seen, me)

    async def test_v2_in_single_end_mode(self):
        backend = await proxy_backend(self)
        listen_port = free_port()
        client = spawn(self, f"client://127.0.0.1:{listen_port}/127.0.0.1:{backend}"
                             "?mode=1&proxy=2")
        await client.wait_for("single-end listening")
        seen, me = await ask_who(listen_port)
        self.assertEqual(seen, me)

    async def test_without_proxy_the_backend_sees_the_daemon(self):
        backend = await proxy_backend(self)
        _, _, exposed = await tunnel_pair(self, backend)
        seen, _ = await ask_who(exposed)
        self.assertEqual(seen, "")  # the parser refused the headerless connection


class SourceAddress(TestCase):
    timeout = 60

    async def test_dial_binds_connections_to_the_target(self):
        backend = await listen(self, Factory.forProtocol(_TellPeer))
        _, _, exposed = await tunnel_pair(self, backend, client_query="?dial=127.0.0.2")
        seen, _ = await ask_who(exposed)
        self.assertEqual(seen.split(":")[0], "127.0.0.2")  # else 127.0.0.1

    async def test_dial_binds_udp_sessions_too(self):
        backend = await udp_backend(self, _TellSource())
        _, _, exposed = await tunnel_pair(self, backend, client_query="?dial=127.0.0.3")
        p = await peer(self, exposed)
        self.assertEqual(await p.ask(b"who?"), [b"127.0.0.3"])

    def test_an_address_not_of_this_machine_is_refused_at_start(self):
        result = run_nodepass("client://k@127.0.0.1:1/127.0.0.1:2?mode=2&dial=192.0.2.1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("query: dial address 192.0.2.1 cannot be used on this machine",
                      result.stderr)


class _Bound(DatagramProtocol):
    pass


class _TellSource(DatagramProtocol):
    """Answers each datagram with the address it came from."""

    def datagramReceived(self, data, addr):
        self.transport.write(addr[0].encode(), addr)


class Protocols(TestCase):
    timeout = 60

    async def test_notcp_leaves_the_target_port_to_udp(self):
        backend = await echo_backend(self)
        udp = await udp_backend(self, UdpEcho())
        tunnel, exposed = free_port(), free_port()
        server = spawn(self, f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{exposed}?notcp=1")
        await server.wait_for("reverse mode")
        client = spawn(self, f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{udp}")
        await client.wait_for("tunnel session open")
        with self.assertRaises(ConnectionRefusedError):
            await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(
                Factory.forProtocol(Protocol))
        p = await peer(self, exposed)
        self.assertEqual(await p.ask(b"udp still"), [b"udp still"])
        del backend

    async def test_noudp_leaves_the_udp_port_free(self):
        backend = await echo_backend(self)
        _, _, exposed = await tunnel_pair(self, backend, server_query="?noudp=1")
        port = reactor.listenUDP(exposed, _Bound(), interface="127.0.0.1")  # free: not ours
        self.addCleanup(port.stopListening)
        result = await exchange(exposed, iter([b"tcp still"]))
        self.assertEqual(bytes(result.received), b"tcp still")

    async def test_noudp_on_the_dialing_end_refuses_udp_sessions(self):
        udp = await udp_backend(self, UdpEcho())
        _, client, exposed = await tunnel_pair(self, udp, client_query="?noudp=1")
        p = await peer(self, exposed)
        with self.assertRaises(TimeoutError):
            await p.ask(b"nobody", timeout=1.0)
        await client.wait_for("refused UDP from 127.0.0.1:[0-9]+: noudp=1 on this end")


class Targets(TestCase):
    timeout = 60

    async def test_connections_rotate_and_skip_a_target_that_is_down(self):
        down = free_port()
        up = await named_backend(self, b"B")
        _, client, exposed = await tunnel_pair(
            self, 0, client_target=f"127.0.0.1:{down},127.0.0.1:{up}", SERVICE_COOLDOWN="1s")
        answers = [bytes((await exchange(exposed, iter([]))).received) for _ in range(10)]
        self.assertEqual(answers, [b"B"] * 10)  # without failover every other one fails
        await client.wait_for(f"target 127.0.0.1:{down} failed \\(Connection refused\\): "
                              "trying the others")
        self.assertEqual(client.count("failed \\(Connection refused\\)"), 1)  # not one per user
        # The target comes back: once its retry time has passed, it gets its turn again.
        await named_backend(self, b"A", down)
        await sleep(1.2)
        answers = [bytes((await exchange(exposed, iter([]))).received) for _ in range(10)]
        self.assertEqual(sorted(answers), [b"A"] * 5 + [b"B"] * 5)
