"""The real server and client, paired in memory: the service trees ``tap`` assembles,
on a MemoryNetwork and its clock — no process, no socket, no sleep."""

from __future__ import annotations

import hashlib
import itertools

from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel.relay import RelayProtocol
from tests.inmemory import (
    LogLines,
    Running,
    connect,
    echo_backend,
    pair,
    udp_peer,
)
from tests.memnet import MemoryNetwork

MIB = 1024 * 1024


def pattern(size: int) -> bytes:
    block = hashlib.sha256(b"nodepass").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


class Case(SynchronousTestCase):
    def setUp(self):
        self.net = MemoryNetwork()
        self.log = LogLines(self, self.net)
        self.backend = echo_backend(self.net)


class Session(Case):
    def test_the_handshake_opens_the_session_and_fills_both_pools(self):
        server, client, _ = pair(self, self.net, self.backend)
        self.assertEqual(self.log.count("connected: tunnel session open"), 1)
        self.assertEqual(self.log.count("tunnel session open (tls=0, not encrypted)"), 1)
        for end in (server, client):
            report = end.tunnel.report()
            self.assertEqual((report.state, report.pool, report.mode),
                             ("connected", 4, "reverse"))  # MIN_POOL_CAPACITY here
        self.net.run(3.0)  # heartbeats go both ways; nothing is declared dead
        self.assertEqual(self.log.count("missed its heartbeats"), 0)
        self.assertIsNotNone(client.tunnel.report().ping_ms)

    def test_a_user_is_relayed_both_ways_and_half_close_is_carried(self):
        server, client, target = pair(self, self.net, self.backend)
        user = connect(self.net, target)
        user.transport.write(b"request")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"request")  # echoed through the tunnel
        user.transport.write(b" and more")
        user.transport.loseWriteConnection()
        self.net.flush()
        # the echo service saw our EOF after every byte, answered them, and closed
        self.assertEqual((bytes(user.received), user.eof), (b"request and more", True))
        user.transport.loseConnection()
        self.net.flush()
        for end, (read, written) in ((server, (16, 16)), (client, (16, 16))):
            report = end.tunnel.report()
            self.assertEqual((report.tcp_in, report.tcp_out, report.connections),
                             (read, written, 0))
        self.assertEqual(client.tunnel.report().pool, 4)  # the used one was replaced

    def test_four_mebibytes_to_a_slow_user_hold_memory_with_backpressure(self):
        _, _, target = pair(self, self.net, self.backend)
        user = connect(self.net, target)
        user.transport.pauseProducing()  # the user reads nothing for now
        data = pattern(4 * MIB)
        user.transport.write(data)
        user.transport.loseWriteConnection()
        self.net.flush()
        # every hop stopped reading instead of buffering: what waits is in the user's and
        # the service's own buffers, and at most a few socket-sized buffers in nodepass
        held = sum(len(t.outgoing) for t in self.net.transports
                   if isinstance(t.protocol, RelayProtocol))
        self.assertLess(held, 1 * MIB)
        self.assertEqual(len(user.received), 0)
        user.transport.resumeProducing()
        self.net.flush()
        self.assertEqual((len(user.received), user.digest),
                         (len(data), hashlib.sha256(data).hexdigest()))

    def test_udp_datagrams_cross_both_ways(self):
        echo, echo_port = udp_peer(self.net, echo=True)
        server, client, _ = pair(self, self.net, echo_port)
        user, _ = udp_peer(self.net)
        target = server.udp_port("target")
        for n in range(5):
            user.transport.write(b"datagram %d" % n, ("127.0.0.1", target))
        self.net.flush()
        self.assertEqual([d for d, _ in user.received], [b"datagram %d" % n for n in range(5)])
        self.assertEqual(len(echo.received), 5)
        self.assertEqual(server.tunnel.report().udp_sessions, 1)  # one session per source
        self.net.run(6.0)  # UDP_READ_TIMEOUT of silence ends it at both ends
        self.assertEqual((server.tunnel.report().udp_sessions,
                          client.tunnel.report().udp_sessions), (0, 0))

    def test_forward_mode_the_client_listens_and_the_server_dials(self):
        server = Running(self, self.net, f"server://k@127.0.0.1:0/127.0.0.1:{self.backend}"
                                         "?mode=2")
        client = Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/"
                                         "127.0.0.1:0?mode=2")
        user = connect(self.net, client.listening_port("target"))
        user.transport.write(b"forward")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"forward")
        self.assertEqual((server.tunnel.report().mode, client.tunnel.report().mode),
                         ("forward", "forward"))

    def test_single_end_forwards_straight_to_the_target(self):
        forwarder = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:{self.backend}"
                                            "?mode=1")
        self.assertEqual(forwarder.tunnel.report().pool, 4)  # target connections ahead
        user = connect(self.net, forwarder.listening_port("single-end"))
        user.transport.write(b"direct")
        user.transport.loseWriteConnection()
        self.net.flush()
        self.assertEqual((bytes(user.received), user.eof), (b"direct", True))
        _, echo_port = udp_peer(self.net, echo=True)
        udp = Running(self, self.net, f"client://127.0.0.1:0/127.0.0.1:{echo_port}?mode=1"
                                      "&notcp=1")
        peer, _ = udp_peer(self.net)
        peer.transport.write(b"ping", ("127.0.0.1", udp.udp_port("single-end")))
        self.net.flush()
        self.assertEqual([d for d, _ in peer.received], [b"ping"])


class Faults(Case):
    def test_a_silent_link_is_declared_dead_and_the_client_comes_back(self):
        _, client, target = pair(self, self.net, self.backend)
        self.net.partition(client.tunnel.session.transport)
        self.net.run(3.5, step=0.05)  # three heartbeat intervals of silence
        self.assertEqual(self.log.count("missed its heartbeats: closing the session"), 2)
        self.net.run(1.0)  # SERVICE_COOLDOWN later, a new session
        self.assertEqual(self.log.count("connected: tunnel session open"), 2)
        user = connect(self.net, target)
        user.transport.write(b"after")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"after")

    def test_reconnects_back_off_while_the_server_is_away(self):
        client = Running(self, self.net, f"client://k@127.0.0.1:20000/127.0.0.1:{self.backend}"
                                         "?mode=2")
        self.net.run(4.0, step=0.005)
        attempts = self.log.when("cannot connect to server 127.0.0.1:20000")
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        self.assertGreaterEqual(len(gaps), 3)
        for n, gap in enumerate(gaps[:4]):  # SERVICE_COOLDOWN doubling, 25 % jitter at most
            base = 0.2 * 2 ** n
            self.assertTrue(base - 0.01 <= gap <= base * 1.25 + 0.01, (n, gaps))
        Running(self, self.net, "server://k@127.0.0.1:20000/127.0.0.1:0")
        self.net.run(6.0)
        self.assertEqual(client.tunnel.report().state, "connected")

    def test_a_second_client_is_told_the_server_is_busy(self):
        server, _, _ = pair(self, self.net, self.backend)
        Running(self, self.net, f"client://k@127.0.0.1:{server.listening_port('tunnel')}/127.0.0.1:9"
                                "?mode=2")
        self.assertEqual(self.log.count("is busy: another client holds the tunnel; retrying"), 1)
        self.assertEqual(self.log.count("refused client 127.0.0.1:"), 1)
        self.assertEqual(server.tunnel.report().state, "connected")  # the first keeps it

    def test_a_wrong_key_is_refused_and_each_end_says_why(self):
        server = Running(self, self.net, "server://key-A-7f3e@127.0.0.1:0/127.0.0.1:0")
        tunnel = server.listening_port("tunnel")
        client = Running(self, self.net, f"client://key-B-9c1d@127.0.0.1:{tunnel}/127.0.0.1:9"
                                         "?mode=2")
        self.assertEqual(self.log.count("authentication failed from 127.0.0.1:"), 1)
        self.assertEqual(self.log.count(f"refusing server 127.0.0.1:{tunnel}: it does not prove "
                                        "the tunnel key: the keys differ (check both ends)"), 1)
        self.assertEqual((server.tunnel.report().state, client.tunnel.report().state),
                         ("waiting", "connecting"))
        self.assertEqual([line for _, line in self.log.lines if "key-A" in line or
                          "key-B" in line], [])  # neither key is ever logged

    def test_without_a_client_users_are_closed_at_once(self):
        server = Running(self, self.net, "server://k@127.0.0.1:0/127.0.0.1:0")
        user = connect(self.net, server.listening_port("target"))
        self.assertTrue(user.eof)
        self.assertEqual(self.log.count("no client is connected to the tunnel"), 1)
        self.assertEqual(server.tunnel.report().refused, 0)  # not a refusal: nobody to serve

    def test_two_hundred_concurrent_users_each_get_their_own_bytes(self):
        _, _, target = pair(self, self.net, self.backend)
        users = [connect(self.net, target) for _ in range(200)]
        payloads = [hashlib.sha256(str(i).encode()).digest() * 512 for i in range(200)]
        for user, payload in zip(users, payloads, strict=True):
            user.transport.write(payload)
            user.transport.loseWriteConnection()
        self.net.flush()
        self.assertEqual([bytes(u.received) for u in users], payloads)
        self.assertTrue(all(u.eof for u in users))

    def test_a_refusing_target_closes_the_user_at_once(self):
        nobody = self.net.ephemeral()  # nothing listens there
        _, _, target = pair(self, self.net, nobody)
        user = connect(self.net, target)
        user.transport.write(b"hello?")
        self.net.flush()
        self.assertEqual((bytes(user.received), user.eof), (b"", True))
        self.assertEqual(self.log.count(f"cannot reach target 127.0.0.1:{nobody}: "
                                        "Connection was refused by other side"), 1)

    def test_a_restarted_server_is_found_again(self):
        server, client, _ = pair(self, self.net, self.backend)
        tunnel = server.listening_port("tunnel")
        server.stop()
        self.assertEqual(self.log.count("closed; reconnecting"), 1)
        again = Running(self, self.net, f"server://k@127.0.0.1:{tunnel}/127.0.0.1:0")
        self.net.run(2.0)
        self.assertEqual(client.tunnel.report().state, "connected")
        user = connect(self.net, again.listening_port("target"))
        user.transport.write(b"reconnected")
        self.net.flush()
        self.assertEqual(bytes(user.received), b"reconnected")

    def test_the_server_stopping_says_goodbye(self):
        server, client, _ = pair(self, self.net, self.backend)
        server.stop()
        self.assertEqual(self.log.count("is shutting down"), 1)
        self.assertEqual(client.tunnel.report().state, "connecting")


class _CountingEcho(RelayProtocol):
    accepted = 0

    def connectionMade(self):
        _CountingEcho.accepted += 1

    def dataReceived(self, data):
        self.transport.write(data)


class _OffersMode(RelayProtocol):
    """An impostor server: answers any HELLO with a CHALLENGE offering ``mode``; keeps
    whatever the client sends after it."""

    def __init__(self, mode):
        self.mode = mode
        self.after = b""
        self.challenged = False

    def dataReceived(self, data):
        import os

        from nodepass.tunnel import wire

        if not self.challenged:
            self.challenged = True
            self.transport.write(wire.frame(wire.Type.CHALLENGE,
                                            wire.challenge_payload(self.mode, os.urandom(32))))
        else:
            self.after += data


class Attacks(Case):
    """What an attacker on the path, or in the server's place, can make the ends do."""

    def test_a_client_refuses_a_server_offering_less_than_it_requires(self):
        from twisted.internet.protocol import Factory

        for query, offered, why in (
                ("sni=example.test", 0, "its URL asks for a verified certificate (ca= or sni=)"),
                ("sni=example.test", 1, "its URL asks for a verified certificate (ca= or sni=)"),
                ("tls=1", 0, "its URL says tls=1"),
                ("tls=2", 1, "its URL says tls=2")):
            impostor = _OffersMode(offered)
            port = self.net.listenTCP(0, Factory.forProtocol(lambda i=impostor: i),
                                      interface="127.0.0.1").getHost().port
            least = 1 if query == "tls=1" else 2
            Running(self, self.net, f"client://k@127.0.0.1:{port}/127.0.0.1:9?mode=2&{query}")
            self.assertEqual(self.log.count(
                f"refusing server 127.0.0.1:{port}: it offers tls={offered}, and this client "
                f"accepts tls={least} or more ({why})"), 1, query)
            self.assertEqual(impostor.after, b"", "nothing after HELLO: not even a PAKE")

    def test_an_injected_launch_reaches_no_target(self):
        from twisted.internet.protocol import Factory

        from nodepass.tunnel import wire
        from nodepass.tunnel.wire import Proto

        backend = self.net.listenTCP(0, Factory.forProtocol(_CountingEcho),
                                     interface="127.0.0.1").getHost().port
        _CountingEcho.accepted = 0
        server, client, target = pair(self, self.net, backend, client_query="?mode=2",
                                      MIN_POOL_CAPACITY="4")
        idle = list(server.tunnel.pool.idle)
        self.assertGreaterEqual(len(idle), 3)
        # a user's real LAUNCH on the first idle connection (one an attacker could record:
        # the same tag, HMAC over the same fields)
        launches = idle[0].state.launches
        user = connect(self.net, target)
        user.transport.write(b"real")
        self.net.flush()
        self.assertEqual((bytes(user.received), _CountingEcho.accepted), (b"real", 1))
        recorded = launches.seal(wire.launch_fields(Proto.TCP, "127.0.0.1:50000"))
        # on the path of tls=0, into idle data connections: a forged LAUNCH, and the
        # recorded one moved to another connection
        forged = wire.frame(wire.Type.LAUNCH, wire.launch_fields(Proto.TCP, "203.0.113.9:1")
                            + bytes(wire.TAG_SIZE))
        idle[1].transport.write(forged)
        idle[2].transport.write(recorded)
        self.net.flush()
        self.assertEqual(_CountingEcho.accepted, 1, "an injected LAUNCH reached the target")
        self.assertEqual(self.log.count("closed: LAUNCH not sealed with the session key"), 2)
        self.assertEqual(client.tunnel.report().state, "connected")  # the session lives on
