"""UDP through the tunnel: sessions in memory on a Clock, then end to end."""

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.names import client as dns_client
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nodepass.tunnel import wire
from nodepass.tunnel.udp import UdpCounters
from nodepass.tunnel.wire import DATAGRAM_TYPES, FrameDecoder, Type
from tests.integration import UdpEcho, free_port, peer, sleep, tunnel_pair, udp_backend
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
        decoder.feed(wire.frame(Type.DATA, b"x"))
        with self.assertRaisesRegex(wire.ProtocolError, "DATA frame is not allowed here"):
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


async def udp_echo_on_both_loopbacks(case):
    """A UDP echo on 127.0.0.1 and ::1 with one port number: whichever "localhost" is."""
    for _ in range(20):
        port = await udp_backend(case, UdpEcho())
        try:
            listening = reactor.listenUDP(port, UdpEcho(), interface="::1")
        except OSError:
            continue
        case.addCleanup(listening.stopListening)
        return port
    raise AssertionError("no UDP port free on both loopbacks")


UDP_ENV = {"UDP_READ_TIMEOUT": "1s", "REPORT_INTERVAL": "200ms"}


class EndToEnd(TestCase):
    timeout = 120

    async def test_many_sources_many_datagrams_each_reply_home(self):
        backend = await udp_backend(self, UdpEcho())
        _, _, exposed = await tunnel_pair(self, backend, **{**UDP_ENV, "UDP_READ_TIMEOUT": "10s"})
        peers = [await peer(self, exposed) for _ in range(20)]
        rng = random.Random(7)

        async def converse(index, p):
            for n in range(500):
                size = rng.randint(1, 8192)
                payload = (b"%02d:%03d:" % (index, n)) + os.urandom(max(0, size - 7))[: size - 7]
                (reply,) = await p.ask(payload)
                self.assertEqual(reply, payload)

        await gatherResults([Deferred.fromCoroutine(converse(i, p))
                             for i, p in enumerate(peers)])

    async def test_one_request_many_answers(self):
        backend = await udp_backend(self, Triple())
        _, _, exposed = await tunnel_pair(self, backend, **UDP_ENV)
        p = await peer(self, exposed)
        answers = await p.ask(b"hi", answers=3)
        self.assertEqual(answers, [b"0:hi", b"1:hi", b"2:hi"])

    async def test_idle_session_closes_on_both_sides_and_a_new_one_opens(self):
        backend = await udp_backend(self, UdpEcho())
        server, client, exposed = await tunnel_pair(self, backend, server_query="?log=debug",
                                                    client_query="?log=debug", **UDP_ENV)
        p = await peer(self, exposed)
        self.assertEqual(await p.ask(b"one"), [b"one"])
        for end in (server, client):
            await end.wait_for("udp_sessions=1")
        await sleep(1.5)  # UDP_READ_TIMEOUT is 1 s
        marks = {end.name: len(end.lines) for end in (server, client)}
        await sleep(0.5)
        for end in (server, client):
            recent = [line for line in end.lines[marks[end.name]:] if "report:" in line]
            self.assertTrue(recent and all("udp_sessions=0" in line for line in recent),
                            recent)
        self.assertEqual(await p.ask(b"two"), [b"two"])
        await client.wait_for("UDP session for", nth=2)

    async def test_oversize_datagram_is_counted_and_the_next_flows(self):
        backend = await udp_backend(self, UdpEcho())
        server, _, exposed = await tunnel_pair(self, backend, server_query="?log=debug",
                                               UDP_DATA_BUF_SIZE="1000", **UDP_ENV)
        p = await peer(self, exposed)
        p.transport.write(b"x" * 1001)
        self.assertEqual(await p.ask(b"fine"), [b"fine"])
        await server.wait_for(r"dropped a 1001-byte datagram from 127\.0\.0\.1:\d+: over "
                              r"UDP_DATA_BUF_SIZE \(1000\)")
        await server.wait_for("udp_dropped=1")

    async def test_dns_query_through_the_tunnel(self):
        factory = server.DNSServerFactory(clients=[_OneName()])
        backend = await udp_backend(self, dns.DNSDatagramProtocol(factory))
        _, _, exposed = await tunnel_pair(self, backend, **UDP_ENV)
        resolver = dns_client.Resolver(servers=[("127.0.0.1", exposed)])
        answers, _, _ = await resolver.lookupAddress("host.example.test", timeout=[3, 5])
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.7"])

    async def test_a_target_given_by_name(self):
        backend = await udp_echo_on_both_loopbacks(self)
        _, _, exposed = await tunnel_pair(self, 0, client_target=f"localhost:{backend}",
                                          **UDP_ENV)
        p = await peer(self, exposed)
        for n in range(5):
            self.assertEqual(await p.ask(b"by name %d" % n), [b"by name %d" % n])

    async def test_a_name_that_does_not_resolve_ends_the_session_only(self):
        backend = await udp_backend(self, UdpEcho())
        _, client, exposed = await tunnel_pair(
            self, 0, client_target=f"no-such-host.invalid:53,127.0.0.1:{backend}", **UDP_ENV)
        first = await peer(self, exposed)
        first.transport.write(b"to the name")  # the first session goes to the first target
        await client.wait_for("cannot reach UDP target no-such-host.invalid:53")
        other = await peer(self, exposed)  # a new source: a new session, the next target
        self.assertEqual(await other.ask(b"next"), [b"next"])
        self.assertTrue(client.running)

    async def test_icmp_unreachable_does_not_kill_the_client(self):
        nobody = free_port()
        _, client, exposed = await tunnel_pair(self, nobody, **UDP_ENV)
        p = await peer(self, exposed)
        p.transport.write(b"anyone?")
        await client.wait_for("tunnel session open")
        await sleep(0.5)
        self.assertTrue(client.running)
        self.assertEqual(client.count("Traceback"), 0)
