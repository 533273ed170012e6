"""The tunnel connection's state machine: every phase refuses what it does not take
— a frame from the wire or a call from an owner — with one log line, and closes only
that connection; nothing escapes as an exception."""

from __future__ import annotations

import os

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
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
                Type.WELCOME, b"x" * 48)), "unexpected WELCOME frame while waiting for PAKE"),
            (lambda t: open_session(t),
             lambda c: c.signal(Type.LAUNCH, wire.launch_fields(Proto.TCP, "a:1")),
             "unexpected LAUNCH frame on the control channel"),
            (lambda t: open_session(t),
             lambda c: c.send(wire.frame(Type.LAUNCH, wire.launch_fields(Proto.TCP, "a:1")
                                         + bytes(wire.TAG_SIZE))),
             "LAUNCH frame not sealed with the session key"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.send(wire.frame(Type.PING, wire.ping_payload(1, 1))),
             "unexpected PING frame while pooled"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.send(c.launch(Proto.TCP, "a:1")),
             "LAUNCH from the client, but this server is in reverse mode"),
            (lambda t: add_data(t, open_session(t), 46001),
             lambda c: c.send(wire.frame(Type.LAUNCH, wire.launch_fields(Proto.TCP, "a:1")
                                         + bytes(wire.TAG_SIZE))),
             "LAUNCH not sealed with the session key"),
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
        data.send(data.launch(Proto.TCP, "203.0.113.9:1") + b"held")
        self.assertEqual(type(data.protocol.state).__name__, "Launched")
        self.assertRefused(data.protocol, data.transport,
                           lambda: data.protocol.open_control(object(), b""),
                           "opening the control channel is not valid while launched")
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_a_udp_session_takes_only_datagram_frames(self):
        net = MemoryNetwork()
        net.listenUDP(2, DatagramProtocol(), interface="127.0.0.1")  # the target, silent
        tunnel = ServerTunnel(net, ServerConfig(tunnel=Address("127.0.0.1", 1),
                                                target=Address("127.0.0.1", 2), tunnel_key="k",
                                                mode=2), Tunables(report_interval=1.0))
        data = add_data(tunnel, open_session(tunnel), 46001)
        data.send(data.launch(Proto.UDP, "203.0.113.9:1") + wire.datagram(b"first"))
        net.flush()
        self.assertEqual(type(data.protocol.state).__name__, "Datagrams")
        self.assertEqual(tunnel.report().udp_sessions, 1)
        with capturedLogs() as events:
            data.send(wire.frame(Type.PING, b"x"))
        (warning,) = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertIn("PING frame is not allowed here", warning["why"])
        self.assertTrue(data.transport.disconnecting)
        data.lose()
        self.assertEqual(tunnel.report().udp_sessions, 0)  # the session ended with it

    # -- the client's phases -------------------------------------------------

    def client_conn(self, kind=Kind.CONTROL, tunnel=None):
        """A real ClientTunnel's connection on a StringTransport; it has sent HELLO."""
        if tunnel is None:
            tunnel = ClientTunnel(Clock(), parse("client://k@127.0.0.1:1/127.0.0.1:2?mode=2"),
                                  Tunables(report_interval=1.0))
        session = (tunnel.session_id, tunnel.session_keys) if kind is Kind.DATA else None
        conn = QuietFactory(TunnelConnection, tunnel.clock,
                            dialed(tunnel, kind, session)).buildProtocol(None)
        transport = transport_for(10101)
        conn.makeConnection(transport)
        return tunnel, conn, transport

    def handshake(self, conn, transport, kind, settings=None, keys=None, until=None):
        """A real server handshake answers the client until it is welcomed (or until
        the frame type ``until``, which it does not answer); returns the server side."""
        server = ServerHandshake(b"k", 0, os.urandom(wire.NONCE_SIZE), lambda sid: keys)
        decoder = wire.FrameDecoder(expect_preamble=True)

        def next_frame():
            decoder.feed(transport.value())
            transport.clear()
            return decoder.next_frame()

        conn.dataReceived(server.on_hello(next_frame().payload))
        if kind is Kind.CONTROL:
            conn.dataReceived(server.on_pake(next_frame().payload))
        if until is Type.WELCOME:
            return server
        server.on_auth(next_frame().payload)
        welcome = (server.welcome(os.urandom(wire.SESSION_ID_SIZE), settings or {})
                   if kind is Kind.CONTROL else server.welcome())
        conn.dataReceived(welcome)
        return server

    def test_client_handshake_phases(self):
        _, conn, transport = self.client_conn()
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.WELCOME, b"x" * 48)),
                           "unexpected WELCOME frame while waiting for CHALLENGE")
        _, conn, transport = self.client_conn()
        conn.dataReceived(wire.frame(Type.CHALLENGE, bytes(1 + wire.NONCE_SIZE)))
        self.assertEqual(type(conn.state).__name__, "ClientPake")
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.AUTH, bytes(32))),
                           "unexpected AUTH frame while waiting for PAKE")
        _, conn, transport = self.client_conn()
        self.handshake(conn, transport, Kind.CONTROL, until=Type.WELCOME)
        self.assertEqual(type(conn.state).__name__, "ClientWelcome")
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.PING,
                                                                wire.ping_payload(1, 1))),
                           "unexpected PING frame while waiting for WELCOME")

    def test_client_control_and_pooled_phases(self):
        tunnel, conn, transport = self.client_conn()
        server = self.handshake(conn, transport, Kind.CONTROL, {"mode": "forward"})
        self.assertEqual((type(conn.state).__name__, tunnel.mode), ("Control", "forward"))
        self.assertRefused(conn, transport,
                           lambda: conn.dataReceived(wire.frame(Type.AUTH, b"x" * 32)),
                           "AUTH frame not sealed with the session key")
        self.assertEqual(tunnel.session_keys, server.keys)  # what data connections use
        _, data, data_transport = self.client_conn(Kind.DATA, tunnel)
        data_server = self.handshake(data, data_transport, Kind.DATA, keys=server.keys)
        self.assertEqual(type(data.state).__name__, "Pooled")
        sealed = data_server.launches().seal(wire.launch_fields(Proto.TCP, "a:1"))
        self.assertRefused(data, data_transport, lambda: data.dataReceived(sealed),
                           "LAUNCH from the server, but the tunnel is in forward mode")

    def test_a_data_connection_must_offer_its_sessions_mode(self):
        tunnel, conn, transport = self.client_conn()
        self.handshake(conn, transport, Kind.CONTROL)
        tunnel.session_tls = 2  # as if the session ran over verified TLS
        _, data, data_transport = self.client_conn(Kind.DATA, tunnel)
        data_transport.clear()  # its HELLO
        with capturedLogs() as events:
            data.dataReceived(wire.frame(Type.CHALLENGE, wire.challenge_payload(0, bytes(32))))
        self.assertEqual([formatEvent(e) for e in events if e.get("log_level") == LogLevel.error],
                         ["refusing server 127.0.0.1:10101: a data connection offers tls=0, its "
                          "session tls=2"])
        self.assertTrue(data_transport.disconnecting)
        self.assertEqual(data_transport.value(), b"")  # no AUTH for a downgraded connection

    def test_a_busy_refusal_then_nothing(self):
        _, conn, transport = self.client_conn()
        self.handshake(conn, transport, Kind.CONTROL, until=Type.WELCOME)
        conn.dataReceived(wire.frame(Type.BUSY))
        self.assertEqual(type(conn.state).__name__, "Busy")
        with capturedLogs() as events:
            conn.dataReceived(b"anything at all")
            conn.connectionLost(None)
        self.assertEqual([e["log_format"] for e in events],
                         ["server {peer} is busy: another client holds the tunnel; retrying"])
        self.assertIsInstance(conn.state, Closed)


class _Collaborator:
    """Stands in for a tunnel, a relay or a session: has a key and a logger, and
    answers every other call by noting it."""

    key = b"k"
    tls_mode = 0
    credentials = None
    session_fingerprint = None

    def __init__(self) -> None:
        from nodepass import logs

        self.log = logs.logger("nodepass")
        self.calls: list[str] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append(name)


def _every_state():
    """Each state of the machine, made directly: name -> (state factory)."""
    from nodepass.tunnel import connection as c
    from nodepass.tunnel.wire import DATAGRAM_TYPES, FrameDecoder

    def hello(conn, other):
        return c.ClientHello(conn, other, Kind.CONTROL)

    from nodepass.tunnel.handshake import Launches, Opener, Sealer

    handshake = ServerHandshake(b"k", 0, os.urandom(wire.NONCE_SIZE), lambda sid: None)
    launches = Launches(b"d" * 32, b"server", bytes(64))
    return {
        "ServerHello": lambda conn, o: c.ServerHello(conn, o),
        "ServerPake": lambda conn, o: c.ServerPake(conn, o, handshake, FrameDecoder(), None),
        "ServerAuth": lambda conn, o: c.ServerAuth(conn, o, handshake, FrameDecoder(), None),
        "Authenticated": lambda conn, o: c.Authenticated(conn, o, handshake, FrameDecoder()),
        "ClientHello": hello,
        "ClientPake": lambda conn, o: c.ClientPake(hello(conn, o), None, None),
        "ClientAttest": lambda conn, o: c.ClientAttest(hello(conn, o), o, None),
        "ClientWelcome": lambda conn, o: c.ClientWelcome(hello(conn, o), None),
        "Busy": lambda conn, o: c.Busy(conn, o),
        "Control": lambda conn, o: c.Control(conn, o, o, FrameDecoder(), Sealer(b"s" * 32),
                                             Opener(b"o" * 32)),
        "Pooled": lambda conn, o: c.Pooled(conn, o, FrameDecoder(), launches),
        "Launched": lambda conn, o: c.Launched(conn),
        "Streaming": lambda conn, o: c.Streaming(conn, o),
        "AwaitingSession": lambda conn, o: c.AwaitingSession(conn, b""),
        "Datagrams": lambda conn, o: c.Datagrams(conn, o, FrameDecoder(allowed=DATAGRAM_TYPES)),
        "Closed": lambda conn, o: c.Closed(conn),
    }


# What an owner may ask of a connection, and the words its refusal uses.
_OWNER_INPUTS = {
    "open_control": ("opening the control channel", lambda conn, s: conn.open_control(s, b"")),
    "refuse_busy": ("refusing as busy", lambda conn, s: conn.refuse_busy()),
    "pool": ("pooling", lambda conn, s: conn.pool(b"")),
    "launch_tcp": ("a TCP launch", lambda conn, s: conn.launch_tcp("a:1", "b:2", 0)),
    "launch_udp": ("a UDP launch", lambda conn, s: conn.launch_udp("a:1", "b:2")),
    "carry_udp": ("carrying UDP", lambda conn, s: conn.carry_udp(s)),
    "join": ("joining a relay", lambda conn, s: conn.join(s)),
}

# The only (state, input) pairs the machine takes; every other pair is refused.
_TAKEN = {
    "Authenticated": {"open_control", "pool", "refuse_busy"},
    "ClientWelcome": {"open_control"},
    "Pooled": {"launch_tcp", "launch_udp"},
    "Launched": {"join"},
    "AwaitingSession": {"carry_udp"},
    "Closed": {"carry_udp", "join"},  # too late: the session is closed, the relay told
}


class EveryStateEveryInput(SynchronousTestCase):
    """The whole matrix: each state, each input from an owner and an out-of-turn frame."""

    def connection(self, make_state):
        other = _Collaborator()
        conn = TunnelConnection(Clock(), lambda c: make_state(c, other))
        transport = transport_for(10101)
        conn.makeConnection(transport)
        return conn, transport, other

    def test_every_input_a_state_does_not_take_is_refused_with_one_line(self):
        refused = 0
        for state_name, make_state in _every_state().items():
            for input_name, (words, act) in _OWNER_INPUTS.items():
                if input_name in _TAKEN.get(state_name, ()):
                    continue
                conn, transport, other = self.connection(make_state)
                name = conn.state.name
                with capturedLogs() as events:
                    act(conn, other)
                where = f"{input_name} in {state_name}"
                self.assertFalse([e for e in events if "log_failure" in e], where)
                warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
                self.assertEqual([w.get("why") for w in warnings],
                                 [f"{words} is not valid while {name}"], where)
                self.assertTrue(transport.disconnecting, where)
                if input_name == "carry_udp":
                    self.assertIn("close", other.calls, f"{where}: the session must end")
                refused += 1
        self.assertEqual(refused, 16 * 7 - sum(map(len, _TAKEN.values())))

    def test_every_framed_state_refuses_a_frame_out_of_turn(self):
        from nodepass.tunnel.connection import Framed

        for state_name, make_state in _every_state().items():
            conn, transport, _ = self.connection(make_state)
            if not isinstance(conn.state, Framed) or state_name in ("Control", "Datagrams"):
                continue  # they hand every frame on (to the control session, the UDP one)
            name = conn.state.name
            preamble = wire.PREAMBLE if state_name == "ServerHello" else b""
            with capturedLogs() as events:
                conn.dataReceived(preamble + wire.frame(Type.GOODBYE, bytes([1])))
            warnings = [e.get("why") for e in events if e.get("log_level") == LogLevel.warn]
            self.assertEqual(warnings, [f"unexpected GOODBYE frame while {name}"], state_name)
            self.assertTrue(transport.disconnecting, state_name)
