"""UDP through the tunnel: sessions in memory on a Clock, then end to end."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.names import client as dns_client
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nodepass.tunnel import wire
from nodepass.tunnel.udp import UdpCounters
from nodepass.tunnel.wire import DATAGRAM_TYPES, FrameDecoder, Type
from tests.inmemory import LogLines, Running, UdpPeer, ask, pair, udp_peer
from tests.integration import (
    WAIT,
    UdpEcho,
    peer,
    sleep,
    spawn,
    tunnel_pair,
    udp_backend,
    unreachable_udp_port,
)
from tests.memnet import MemoryNetwork
from tests.memory import udp_over_connection


class Framing(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=3000), max_size=15), st.data())
    def test_any_split_keeps_every_datagram_boundary(self, datagrams, data):
        stream = b"".join(wire.datagram(d) for d in datagrams)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
        decoder = FrameDecoder(allowed=DATAGRAM_TYPES)
        got = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            decoder.feed(stream[start:end])
            while (frame := decoder.next_frame()) is not None:
                got.append(frame.payload)
        self.assertEqual(got, datagrams)

    def test_other_frames_are_refused_in_a_udp_session(self):
        decoder = FrameDecoder(allowed=DATAGRAM_TYPES)
        decoder.feed(wire.frame(Type.PING, b"x"))
        with self.assertRaisesRegex(wire.ProtocolError, "PING frame is not allowed here"):
            decoder.next_frame()


class Sessions(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.delivered = []
        self.ended = []
        self.drops = UdpCounters()
        self.counts = {"in": 0, "out": 0}
        self.conn, self.session = udp_over_connection(
            self.clock, self.delivered.append, 5.0, 1000,
            lambda n: self.counts.__setitem__("in", self.counts["in"] + n),
            lambda n: self.counts.__setitem__("out", self.counts["out"] + n),
            self.drops, self.ended.append)

    def test_datagrams_cross_framed_and_counted(self):
        self.assertIs(self.conn.transport.producer, self.session)
        self.session.to_tunnel(b"ask")
        self.session.from_tunnel(b"answer")
        self.assertEqual(self.conn.transport.value(), wire.datagram(b"ask"))
        self.assertEqual(self.delivered, [b"answer"])
        self.assertEqual(self.counts, {"in": 3, "out": 6})

    def test_idle_timeout_ends_the_session(self):
        for _ in range(4):
            self.clock.advance(4.0)
            self.session.to_tunnel(b"keepalive")
        self.assertEqual(self.ended, [])
        self.clock.advance(5.0)
        self.assertEqual(self.ended, [self.session])
        self.assertTrue(self.conn.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replies_keep_it_alive_too(self):
        self.clock.advance(4.0)
        self.session.from_tunnel(b"reply")
        self.clock.advance(4.0)
        self.assertEqual(self.ended, [])

    def test_oversize_is_dropped_and_the_next_one_flows(self):
        self.assertFalse(self.session.to_tunnel(b"x" * 1001))
        self.assertTrue(self.session.to_tunnel(b"y" * 1000))
        self.assertEqual(self.drops.oversize, 1)
        self.assertEqual(self.conn.transport.value(), wire.datagram(b"y" * 1000))

    def test_oversize_from_the_other_end_is_dropped_too(self):
        self.session.from_tunnel(b"z" * 1001)
        self.assertEqual((self.delivered, self.drops.oversize), ([], 1))

    def test_backed_up_tunnel_drops_instead_of_queueing(self):
        self.session.pauseProducing()
        self.assertFalse(self.session.to_tunnel(b"lost"))
        self.session.resumeProducing()
        self.assertTrue(self.session.to_tunnel(b"sent"))
        self.assertEqual(self.drops.overload, 1)
        self.assertEqual(self.conn.transport.value(), wire.datagram(b"sent"))


# ---------------------------------------------------------------------------
# End to end


class Triple(DatagramProtocol):
    """Answers each request with three datagrams."""

    def datagramReceived(self, data, addr):
        for i in range(3):
            self.transport.write(b"%d:" % i + data, addr)




class _OneName(ResolverBase):
    """A tiny DNS responder: host.example.test is 192.0.2.7, nothing else exists."""

    def lookupAddress(self, name, timeout=None):
        if name.lower() != b"host.example.test":
            return fail(dns.DomainError(name))
        answer = dns.RRHeader(name, dns.A, dns.IN, 60, dns.Record_A("192.0.2.7"))
        return succeed(([answer], [], []))


UDP_ENV = {"UDP_READ_TIMEOUT": "1s", "REPORT_INTERVAL": "200ms"}


class EndToEnd(SynchronousTestCase):
    """The real server and client on the memory network (tests/inmemory.py)."""

    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)

    def tunnel(self, backend_protocol=None, **kwargs):
        _, backend = udp_peer(self.net, echo=backend_protocol is None,
                              protocol=backend_protocol)
        server, client, exposed = pair(self, self.net, backend, **{**UDP_ENV, **kwargs})
        user, _ = udp_peer(self.net)
        return server, client, exposed, user

    def test_many_sources_many_datagrams_each_reply_home(self):
        _, _, exposed, _ = self.tunnel(UDP_READ_TIMEOUT="10s")
        peers = [udp_peer(self.net)[0] for _ in range(20)]
        rng = random.Random(7)
        for n in range(100):
            for index, p in enumerate(peers):
                size = rng.randint(8, 8192)
                payload = (b"%02d:%03d:" % (index, n)) + rng.randbytes(size - 7)
                p.transport.write(payload, ("127.0.0.1", exposed))
                p.sent = [*getattr(p, "sent", []), payload]
            self.net.flush()
        for p in peers:
            self.assertEqual([d for d, _ in p.received], p.sent)

    def test_one_request_many_answers(self):
        _, _, exposed, user = self.tunnel(Triple())
        self.assertEqual(ask(self.net, user, exposed, b"hi"), [b"0:hi", b"1:hi", b"2:hi"])

    def test_idle_session_closes_on_both_sides_and_a_new_one_opens(self):
        server, client, exposed, user = self.tunnel()
        self.assertEqual(ask(self.net, user, exposed, b"one"), [b"one"])
        self.assertEqual((server.tunnel.report().udp_sessions,
                          client.tunnel.report().udp_sessions), (1, 1))
        self.net.run(1.5)  # UDP_READ_TIMEOUT is 1 s
        self.assertEqual((server.tunnel.report().udp_sessions,
                          client.tunnel.report().udp_sessions), (0, 0))
        self.assertEqual(ask(self.net, user, exposed, b"two"), [b"two"])
        self.assertEqual(client.tunnel.report().udp_sessions, 1)

    def test_oversize_datagram_is_counted_and_the_next_flows(self):
        server, _, exposed, user = self.tunnel(UDP_DATA_BUF_SIZE="1000")
        self.assertEqual(ask(self.net, user, exposed, b"x" * 1001), [])
        self.assertEqual(ask(self.net, user, exposed, b"fine"), [b"fine"])
        self.assertEqual(self.log.count("dropped a 1001-byte datagram from 127.0.0.1:"), 1)
        self.assertEqual(server.tunnel.report().udp_dropped, 1)

    def test_dns_query_through_the_tunnel(self):
        factory = server.DNSServerFactory(clients=[_OneName()])
        _, _, exposed, _ = self.tunnel(dns.DNSDatagramProtocol(factory))
        resolver = dns_client.Resolver(servers=[("127.0.0.1", exposed)], reactor=self.net)
        asked = resolver.lookupAddress("host.example.test", timeout=[3, 5])
        self.net.flush()
        answers, _, _ = self.successResultOf(asked)
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.7"])

    def test_a_target_given_by_name(self):
        _, backend = udp_peer(self.net, echo=True)
        self.net.names.names["echo.test"] = ["127.0.0.1"]
        _, _, exposed = pair(self, self.net, 0, client_target=f"echo.test:{backend}",
                             **UDP_ENV)
        user, _ = udp_peer(self.net)
        for n in range(5):
            self.assertEqual(ask(self.net, user, exposed, b"by name %d" % n),
                             [b"by name %d" % n])
        self.assertEqual(self.net.names.lookups, ["echo.test"])  # kept for dns=5m

    def test_a_name_that_does_not_resolve_ends_the_session_only(self):
        _, backend = udp_peer(self.net, echo=True)
        _, client, exposed = pair(self, self.net, 0, client_target="no-such-host.invalid:53,"
                                                                    f"127.0.0.1:{backend}",
                                  **UDP_ENV)
        first, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, first, exposed, b"to the name"), [])
        self.assertEqual(self.log.count("cannot reach UDP target no-such-host.invalid:53: DNS "
                                        "lookup failed: no-such-host.invalid has no address"),
                         1)
        other, _ = udp_peer(self.net)  # a new source: a new session, the next target
        self.assertEqual(ask(self.net, other, exposed, b"next"), [b"next"])
        self.assertEqual(client.tunnel.report().state, "connected")


    def test_a_target_that_refuses_ends_the_session_with_one_line(self):
        nobody = 9  # nothing listens there on the memory network
        _, client, exposed = pair(self, self.net, nobody, **UDP_ENV)
        user, _ = udp_peer(self.net)
        for n in range(5):
            user.transport.write(b"anyone? %d" % n, ("127.0.0.1", exposed))
            self.net.flush()
            self.assertEqual((client.tunnel.report().udp_sessions,
                              client.tunnel.report().state), (0, "connected"))
        self.assertEqual(self.log.count(f"UDP target 127.0.0.1:{nobody} refused the datagrams "
                                        "(ICMP port unreachable): its session ended"), 1)
        self.assertEqual(self.log.count("Traceback") + self.log.count("Unhandled"), 0)

    def test_single_end_ends_the_session_when_the_target_refuses(self):
        nobody = 9
        forwarder = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:{nobody}?mode=1",
                            **UDP_ENV)
        user, _ = udp_peer(self.net)
        for n in range(5):
            user.transport.write(b"anyone? %d" % n,
                                 ("127.0.0.1", forwarder.listening_port("single-end")))
            self.net.flush()
            self.assertEqual(forwarder.tunnel.report().udp_sessions, 0)
        self.assertEqual(self.log.count("refused the datagrams (ICMP port unreachable)"), 1)


class OnRealSockets(TestCase):
    """What only the kernel can show: an ICMP port unreachable."""

    timeout = 60

    async def check_refusing_target(self, daemon, exposed):
        p = await peer(self, exposed)
        for n in range(6):
            p.transport.write(b"anyone? %d" % n)
            await sleep(0.05)
        await daemon.wait_for(r"UDP target 127\.0\.0\.1:\d+ (refused the datagrams|closed "
                              r"the socket) \(ICMP port unreachable\): its session ended")
        self.assertTrue(daemon.running)
        self.assertEqual(daemon.count("Traceback") + daemon.count("Unhandled"), 0,
                         "\n".join(daemon.lines))

    async def test_bursts_keep_every_boundary_and_the_order_with_and_without_tls(self):
        """Bursts of datagrams of every size, written through to the tunnel's sockets (and
        under TLS as records): each comes back whole, once, in the order sent."""
        backend = await udp_backend(self, UdpEcho())
        rng = random.Random(18)
        for tls in (0, 1):
            _, _, exposed = await tunnel_pair(self, backend, server_query=f"?tls={tls}",
                                              **UDP_ENV)
            p = await peer(self, exposed)
            sent = []
            for burst in range(10):
                payloads = [b"%d:%d:%02d:" % (tls, burst, n) + rng.randbytes(rng.randint(0, 8000))
                            for n in range(20)]
                p.expected = len(p.replies) + len(payloads)
                p.waiter = Deferred()
                for payload in payloads:
                    p.transport.write(payload)
                sent += payloads
                await p.waiter.addTimeout(WAIT, reactor)
            self.assertEqual(p.replies, sent, f"tls={tls}")

    async def test_icmp_unreachable_ends_the_session_at_the_client(self):
        nobody = unreachable_udp_port(self)
        _, client, exposed = await tunnel_pair(self, nobody, **UDP_ENV)
        await self.check_refusing_target(client, exposed)

    async def test_icmp_unreachable_ends_the_session_in_single_end_mode(self):
        nobody = unreachable_udp_port(self)
        forwarder = spawn(self, f"client://127.0.0.1:0/127.0.0.1:{nobody}?mode=1", **UDP_ENV)
        await self.check_refusing_target(forwarder, await forwarder.listening_port(
            "single-end", udp=True))


class Floods(SynchronousTestCase):
    """UDP cannot starve TCP: its own session limit within the slot limit, a per-source
    cap, short lives for sessions the target never answered, and pooled connections
    for TCP users first."""

    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)

    def test_tcp_users_are_served_throughout_a_udp_flood_from_one_host(self):
        from tests.inmemory import User, connect, echo_backend

        backend = echo_backend(self.net)
        silent = UdpPeer()  # takes every datagram, never answers
        self.net.listenUDP(backend, silent, interface="127.0.0.1")
        server, client, exposed = pair(self, self.net, backend, server_query="?slot=100",
                                       UDP_READ_TIMEOUT="30s")
        flooders = [udp_peer(self.net)[0] for _ in range(1000)]  # one host, 1,000 ports
        served = most = 0
        for tick in range(50):  # 5 s: 200 new sources per second; TCP users from 1 s on
            for p in flooders[tick * 20:tick * 20 + 20]:
                p.transport.write(b"x", ("127.0.0.1", exposed))
            self.net.run(0.1, step=0.1)
            most = max(most, server.tunnel.report().udp_sessions)
            if tick < 10:
                continue
            user = connect(self.net, exposed, User())
            user.transport.write(b"tcp %d" % tick)
            self.net.run(0.1, step=0.1)
            self.assertEqual(bytes(user.received), b"tcp %d" % tick, f"at {tick / 10:g}s")
            user.transport.loseConnection()
            served += 1
        self.assertEqual(served, 40)
        self.assertEqual(most, 32)  # UDP_MAX_PER_SOURCE
        self.assertGreater(server.tunnel.report().refused, 0)
        self.assertEqual(self.log.count("sessions from 127.0.0.1 already (UDP_MAX_PER_SOURCE)"),
                         1)  # throttled: one line for the whole flood
        self.net.run(2.5)  # UDP_ANSWER_TIMEOUT (2 s): unanswered sessions are gone
        self.assertEqual((server.tunnel.report().udp_sessions,
                          client.tunnel.report().udp_sessions), (0, 0))
        self.assertGreater(len(silent.received), 32)

    def test_an_answered_session_lives_for_udp_read_timeout(self):
        _, backend = udp_peer(self.net, echo=True)
        server, _, exposed = pair(self, self.net, backend, UDP_READ_TIMEOUT="10s")
        user, _ = udp_peer(self.net)
        self.assertEqual(ask(self.net, user, exposed, b"answered?"), [b"answered?"])
        self.net.run(5)
        self.assertEqual(server.tunnel.report().udp_sessions, 1)  # past UDP_ANSWER_TIMEOUT
        self.net.run(6)
        self.assertEqual(server.tunnel.report().udp_sessions, 0)  # UDP_READ_TIMEOUT


class UdpAdmission(SynchronousTestCase):
    def test_udp_sessions_get_half_the_slot_limit_unless_tcp_is_off(self):
        from nodepass.tunables import Tunables
        from nodepass.tunnel.flows import Flows

        flows = Flows(Clock(), Tunables(), slot=10)
        udp = [flows.reserve_udp("UDP") for _ in range(6)]
        self.assertEqual([s is not None for s in udp], [True] * 5 + [False])
        tcp = [flows.reserve("TCP") for _ in range(6)]
        self.assertEqual([s is not None for s in tcp], [True] * 5 + [False])
        self.assertEqual(flows.refused, 2)
        udp[0].release()
        udp[0].release()  # idempotent
        self.assertIsNotNone(flows.reserve("TCP"))
        self.assertIsNone(flows.reserve_udp("UDP"))  # the slot limit itself is full
        udp_only = Flows(Clock(), Tunables(udp_max_sessions=100), slot=10, notcp=1)
        self.assertEqual(sum(udp_only.reserve_udp("UDP") is not None for _ in range(12)), 10)
        capped = Flows(Clock(), Tunables(udp_max_sessions=3), slot=10)
        self.assertEqual(sum(capped.reserve_udp("UDP") is not None for _ in range(12)), 3)

    def test_pooled_connections_go_to_tcp_users_before_udp_sources(self):
        from nodepass.tunnel.pool import IdlePool

        pool = IdlePool(Clock(), 10, 5.0, lambda n: None)
        got = []
        pool.take_udp(lambda c: got.append(("udp", c)), got.append)
        pool.take(lambda c: got.append(("tcp", c)), got.append)
        pool.add("first")
        pool.add("second")
        self.assertEqual(got, [("tcp", "first"), ("udp", "second")])
