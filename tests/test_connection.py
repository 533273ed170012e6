"""The tunnel connection's state machine: every phase refuses what it does not take
— a frame from the wire or a call from an owner — with one log line, and closes only
that connection; nothing escapes as an exception."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunables import Tunables
from nodepass.tunnel import wire
from nodepass.tunnel.channel import QuietFactory
from nodepass.tunnel.client import ClientTunnel
from nodepass.tunnel.connection import Closed, TunnelConnection, dialed
from nodepass.tunnel.handshake import ServerHandshake
from nodepass.tunnel.server import ServerTunnel
from nodepass.tunnel.udp import UdpCounters, UdpSession
from nodepass.tunnel.wire import Kind, Proto, Type
from nodepass.url import Address, ServerConfig, parse
from tests.memnet import MemoryNetwork
from tests.memory import (
    FakeClient,
    add_data,
    connect_user,
    open_session,
    server_tunnel,
    transport_for,
)


def session(clock):
    return UdpSession(clock, lambda p: None, lambda p: None, 5.0, 1000, lambda n: None,
                      lambda n: None, UdpCounters(), lambda s: None)


class Refusals(SynchronousTestCase):
    def assertRefused(self, conn, transport, act, fragment):
        with capturedLogs() as events:
            act()
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, [e.get("log_format") for e in events])
        self.assertIn(fragment, warnings[0]["why"])
        self.assertFalse([e for e in events if "log_failure" in e])
        self.assertTrue(transport.disconnecting)
        return conn

    # -- the server's phases -------------------------------------------------

    def test_server_phases(self):
        hello = FakeClient(server_tunnel()[0]).handshake.hello()
        cases = [
            (lambda t: FakeClient(t), lambda c: c.send(wire.PREAMBLE + wire.frame(
                Type.AUTH, b"x" * 32)), "unexpected AUTH frame while waiting for HELLO"),
            (lambda t: FakeClient(t), lambda c: c.send(hello + wire.frame(
                Type.WELCOME, b"x" * 48)), "unexpected WELCOME frame while waiting for AUTH"),
            (lambda t: open_session(t), lambda c: c.send(wire.launch(Proto.TCP, "a:1")),
             "unexpected LAUNCH frame on the control channel"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.send(wire.ping(Type.PING, 1, 1)),
             "unexpected PING frame while pooled"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.send(wire.launch(Proto.TCP, "a:1")),
             "LAUNCH from the client, but this server is in reverse mode"),
            (lambda t: open_session(t), lambda c: c.protocol.pool(b""),
             "pooling is not valid while the control channel"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.protocol.carry_udp(session(c.tunnel.clock)),
             "carrying UDP is not valid while pooled"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.protocol.join(object()), "joining a relay is not valid while pooled"),
        ]
        for reach, act, fragment in cases:
            tunnel, _ = server_tunnel()
            client = reach(tunnel)
            self.assertRefused(client.protocol, client.transport, lambda a=act, c=client: a(c),
                               fragment)

    def test_a_relayed_connection_takes_no_launch(self):
        tunnel, _ = server_tunnel()
        data = add_data(tunnel, open_session(tunnel), 46001)
        connect_user(tunnel)
        self.assertEqual(type(data.protocol.state).__name__, "Streaming")
        self.assertRefused(data.protocol, data.transport,
                           lambda: data.protocol.launch_tcp("a:1", "b:2", 0),
                           "a TCP launch is not valid while streaming")

    def test_a_launched_connection_waits_for_its_relay_only(self):
        tunnel, reactor = server_tunnel(controls={"mode": 2})
        data = add_data(tunnel, open_session(tunnel), 46001)
        data.send(wire.launch(Proto.TCP, "203.0.113.9:1") + b"held")
        self.assertEqual(type(data.protocol.state).__name__, "Launched")
        self.assertRefused(data.protocol, data.transport,
                           lambda: data.protocol.open_control(object(), b""),
                           "opening the control channel is not valid while launched")
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_a_udp_session_takes_only_datagram_frames(self):
        net = MemoryNetwork()
        tunnel = ServerTunnel(net, ServerConfig(tunnel=Address("127.0.0.1", 1),
                                                target=Address("127.0.0.1", 2), tunnel_key="k",
                                                mode=2), Tunables(report_interval=1.0))
        data = add_data(tunnel, open_session(tunnel), 46001)
        data.send(wire.launch(Proto.UDP, "203.0.113.9:1") + wire.datagram(b"first"))
        net.flush()
        self.assertEqual(type(data.protocol.state).__name__, "Datagrams")
        self.assertEqual(tunnel.report().udp_sessions, 1)
        with capturedLogs() as events:
            data.send(wire.frame(Type.DATA, b"x"))
        (warning,) = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertIn("DATA frame is not allowed here", warning["why"])
        self.assertTrue(data.transport.disconnecting)
        data.lose()
        self.assertEqual(tunnel.report().udp_sessions, 0)  # the session ended with it

    # -- the client's phases -------------------------------------------------

    def client_conn(self, kind=Kind.CONTROL):
        """A real ClientTunnel's connection on a StringTransport; it has sent HELLO."""
        clock = Clock()
        tunnel = ClientTunnel(clock, parse("client://k@127.0.0.1:1/127.0.0.1:2?mode=2"),
                              Tunables(report_interval=1.0))
        session_id = b"s" * wire.SESSION_ID_SIZE if kind is Kind.DATA else b""
        conn = QuietFactory(TunnelConnection, clock,
                            dialed(tunnel, kind, session_id)).buildProtocol(None)
        transport = transport_for(10101)
        conn.makeConnection(transport)
        return tunnel, conn, transport

    def handshake(self, conn, transport, kind, settings=None):
        """A real server handshake answers the client until it is welcomed."""
        server = ServerHandshake(b"k", 0, os.urandom(wire.NONCE_SIZE))
        decoder = wire.FrameDecoder(expect_preamble=True)

        def next_frame():
            decoder.feed(transport.value())
            transport.clear()
            return decoder.next_frame()

        conn.dataReceived(server.on_hello(next_frame().payload))
        server.on_auth(next_frame().payload)
        welcome = (server.welcome(os.urandom(wire.SESSION_ID_SIZE), settings or {})
                   if kind is Kind.CONTROL else server.welcome())
        conn.dataReceived(welcome)

    def test_client_handshake_phases(self):
        _, conn, transport = self.client_conn()
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.WELCOME, b"x" * 48)),
                           "unexpected WELCOME frame while waiting for CHALLENGE")
        _, conn, transport = self.client_conn()
        conn.dataReceived(wire.challenge(0, os.urandom(wire.NONCE_SIZE)))
        self.assertEqual(type(conn.state).__name__, "ClientWelcome")
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.ping(Type.PING, 1, 1)),
                           "unexpected PING frame while waiting for WELCOME")

    def test_client_control_and_pooled_phases(self):
        tunnel, conn, transport = self.client_conn()
        self.handshake(conn, transport, Kind.CONTROL, {"mode": "forward"})
        self.assertEqual((type(conn.state).__name__, tunnel.mode), ("Control", "forward"))
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.AUTH, b"x" * 32)),
                           "unexpected AUTH frame on the control channel")
        tunnel, data, data_transport = self.client_conn(Kind.DATA)
        tunnel.mode = "forward"  # as its session said
        self.handshake(data, data_transport, Kind.DATA)
        self.assertEqual(type(data.state).__name__, "Pooled")
        self.assertRefused(data, data_transport,
                           lambda: data.dataReceived(wire.launch(Proto.TCP, "a:1")),
                           "LAUNCH from the server, but the tunnel is in forward mode")

    def test_a_busy_refusal_then_nothing(self):
        _, conn, _ = self.client_conn()
        conn.dataReceived(wire.challenge(0, os.urandom(wire.NONCE_SIZE)) + wire.frame(Type.BUSY))
        self.assertEqual(type(conn.state).__name__, "Busy")
        with capturedLogs() as events:
            conn.dataReceived(b"anything at all")
            conn.connectionLost(None)
        self.assertEqual([e["log_format"] for e in events],
                         ["server {peer} is busy: another client holds the tunnel; retrying"])
        self.assertIsInstance(conn.state, Closed)
