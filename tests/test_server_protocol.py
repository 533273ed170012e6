"""The server's tunnel port and target port, in memory: StringTransport and Clock."""

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel import wire
from nodepass.tunnel.connection import HANDSHAKE_TIMEOUT
from nodepass.tunnel.control import MISSED_BEATS
from nodepass.tunnel.server import POOL_WAIT_TIMEOUT
from nodepass.tunnel.wire import Kind, Proto, Type
from tests.memory import (
    FakeClient,
    add_data,
    connect_user,
    open_session,
    server_tunnel,
    transport_for,
)


def messages(events):
    return [formatEvent(e) for e in events]


class Handshake(SynchronousTestCase):
    def test_correct_key_opens_the_session(self):
        tunnel, _ = server_tunnel()
        with capturedLogs() as events:
            control = open_session(tunnel)
        self.assertIs(tunnel.session, control.protocol)
        self.assertFalse(control.closed)
        self.assertEqual(len(control.handshake.session_id), 16)
        self.assertIn("client 127.0.0.1:40000 connected: tunnel session open", messages(events))

    def test_wrong_key_closes_and_logs_the_peer(self):
        tunnel, _ = server_tunnel()
        with capturedLogs() as events:
            intruder = FakeClient(tunnel, key="guess", port=40001)
            after_auth = intruder.authenticate()
        self.assertEqual(after_auth, [])
        self.assertTrue(intruder.transport.disconnected)  # aborted
        self.assertIsNone(tunnel.session)
        self.assertIn("authentication failed from 127.0.0.1:40001: a wrong key, or not a "
                      "nodepass client", messages(events))

    def test_wrong_key_flood_is_cut_short_and_logged_at_a_bounded_rate(self):
        tunnel, clock = server_tunnel()
        with capturedLogs() as events:
            answered = [bool(FakeClient(tunnel, key="guess", port=41000 + i).authenticate() or
                             tunnel.attempts.refused == refused)
                        for i, refused in enumerate([tunnel.attempts.refused] * 500)]
            clock.advance(61)  # one more failure is allowed a minute
            FakeClient(tunnel, key="guess", port=42000).authenticate()
        # five wrong guesses got a PAKE each; the other 495 were refused before any work
        self.assertEqual((answered.count(True), tunnel.attempts.refused), (5, 495))
        lines = [m for m in messages(events) if "authentication failed" in m
                 or "refused a key attempt" in m]
        self.assertEqual(lines, [
            "authentication failed from 127.0.0.1:41000: a wrong key, or not a nodepass client",
            "refused a key attempt from 127.0.0.1:41005: 5 failed attempts from it; one more is "
            "allowed every 60s",
            "authentication failed from 127.0.0.1:42000: a wrong key, or not a nodepass client"
            " (4 more since the last report)",
        ])

    def test_over_the_attempt_limits_other_hosts_are_turned_away_as_they_connect(self):
        from twisted.internet.address import IPv4Address

        tunnel, clock = server_tunnel()
        control = open_session(tunnel)  # from 127.0.0.1
        factory = tunnel.tunnel_factory()
        # attempts from 200 hosts: the overall ceiling (32, then 16 a second) is reached
        admitted = sum(tunnel.attempts.admit(f"10.0.{n // 250}.{n % 250}") is None
                       for n in range(200))
        self.assertEqual(admitted, 31)  # 32, less the session's own attempt
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1)))
        # the session's client still opens data connections
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)))
        clock.advance(1)  # the ceiling refills: others may try again
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1)))
        self.assertIs(tunnel.session, control.protocol)

    def test_truncated_handshake_times_out(self):
        tunnel, clock = server_tunnel()
        client = FakeClient(tunnel)
        client.send(client.handshake.hello()[:-5])
        clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(client.closed)
        clock.advance(0.2)
        self.assertTrue(client.transport.disconnected)

    def test_silent_connection_times_out(self):
        tunnel, clock = server_tunnel()
        client = FakeClient(tunnel)
        clock.advance(HANDSHAKE_TIMEOUT + 0.1)
        self.assertTrue(client.closed)

    def test_malformed_input_closes_the_connection(self):
        hello = FakeClient(server_tunnel()[0]).handshake.hello()
        cases = [
            (b"GET / HTTP/1.1\r\n", "bad preamble"),
            (wire.PREAMBLE + b"\xc8\x00\x00", "unknown frame type 200"),
            (wire.PREAMBLE + bytes([Type.HELLO]) + b"\xff\xff", "exceeds its limit"),
            (wire.PREAMBLE + wire.frame(Type.AUTH, b"x" * 32),
             "unexpected AUTH frame while waiting for HELLO"),
            (wire.PREAMBLE + wire.frame(Type.HELLO, b"\x01"), "HELLO payload must be 33 bytes"),
            (hello + wire.frame(Type.HELLO, hello[7:]),
             "unexpected HELLO frame while waiting for PAKE"),
        ]
        for data, fragment in cases:
            tunnel, _ = server_tunnel()
            client = FakeClient(tunnel)
            with capturedLogs() as events:
                client.send(data)
            self.assertTrue(client.transport.disconnected, fragment)
            self.assertTrue(any(fragment in m for m in messages(events)),
                            (fragment, messages(events)))

    def test_garbage_never_disturbs_the_live_session(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        for junk in (b"\x00" * 100, wire.PREAMBLE + b"\xff" * 10,
                     wire.PREAMBLE + wire.frame(Type.DEMAND, wire.demand_payload(1))):
            FakeClient(tunnel, port=45000).send(junk)
        FakeClient(tunnel, key="guess").authenticate()
        self.assertIs(tunnel.session, control.protocol)
        self.assertFalse(control.closed)

    def test_second_client_is_told_busy(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        second = FakeClient(tunnel, port=40002)
        frames = second.authenticate()
        self.assertEqual([f.type for f in frames], [Type.BUSY])
        self.assertTrue(second.closed)
        self.assertIs(tunnel.session, control.protocol)

    def test_a_new_client_takes_over_a_closed_session(self):
        tunnel, _ = server_tunnel()
        first = open_session(tunnel)
        first.lose()
        self.assertIsNone(tunnel.session)
        second = open_session(tunnel)
        self.assertIs(tunnel.session, second.protocol)


class Heartbeat(SynchronousTestCase):
    def test_pings_are_sent_and_answered(self):
        tunnel, clock = server_tunnel()
        control = open_session(tunnel)
        control.signals()
        clock.advance(1.0)
        (ping,) = control.signals()
        self.assertEqual(ping.type, Type.PING)
        control.signal(Type.PONG, ping.payload)
        control.signal(Type.PING, wire.ping_payload(7, 123))
        (pong,) = control.signals()
        self.assertEqual((pong.type, wire.parse_ping(pong.payload)), (Type.PONG, (7, 123)))
        self.assertEqual(tunnel.report().ping_ms, 0.0)

    def test_missed_heartbeats_close_the_session(self):
        tunnel, clock = server_tunnel()
        control = open_session(tunnel)
        with capturedLogs() as events:
            for _ in range(MISSED_BEATS * 4):
                clock.advance(0.5)
                control.signal(Type.PONG, wire.ping_payload(1, 0))  # alive
            self.assertFalse(control.closed)
            clock.advance(MISSED_BEATS * 1.0 + 0.01)
        self.assertTrue(control.transport.disconnected)
        self.assertIn("client 127.0.0.1:40000 missed its heartbeats: closing the session",
                      messages(events))
        control.lose()
        self.assertIsNone(tunnel.session)

    def test_unknown_control_frame_closes_the_session(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        control.signal(Type.LAUNCH, b"\x01")  # sealed, but not a control frame
        self.assertTrue(control.transport.disconnected)

    def test_a_control_frame_without_the_session_seal_closes_the_session(self):
        for forged in (wire.frame(Type.GOODBYE, bytes([1]) + bytes(wire.TAG_SIZE)),
                       wire.frame(Type.DEMAND, wire.demand_payload(1000))):
            tunnel, _ = server_tunnel()
            control = open_session(tunnel)
            with capturedLogs() as events:
                control.send(forged)
            self.assertTrue(control.transport.disconnected)
            self.assertTrue(any("not sealed with the session key" in m or "without its tag" in m
                                for m in messages(events)), messages(events))

    def test_a_replayed_control_frame_closes_the_session(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        frame = control.sealer.seal(Type.PONG, wire.ping_payload(1, 0))
        control.send(frame)
        self.assertFalse(control.closed)
        control.send(frame)  # the same bytes again: its sequence number is past
        self.assertTrue(control.transport.disconnected)


class DataAndUsers(SynchronousTestCase):
    def test_data_connection_needs_the_live_session_id(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        stranger = FakeClient(tunnel, kind=Kind.DATA,
                              session=(b"X" * 16, control.handshake.keys), port=46000)
        self.assertEqual(stranger.authenticate(), [])
        self.assertTrue(stranger.closed)
        good = add_data(tunnel, control, 46001)
        self.assertEqual(list(tunnel.pool.idle), [good.protocol])

    def test_user_without_session_is_closed_at_once(self):
        tunnel, _ = server_tunnel()
        with capturedLogs() as events:
            _, transport = connect_user(tunnel)
        self.assertTrue(transport.disconnecting)
        self.assertIn("closed connection from 127.0.0.1:50000: no client is connected to the "
                      "tunnel", messages(events))

    def test_user_takes_an_idle_connection_and_is_relayed(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        user, user_transport = connect_user(tunnel)
        (launch,) = data.frames()
        self.assertEqual(wire.parse_launch(data.launches.open(launch.payload)),
                         wire.Launch(Proto.TCP, "127.0.0.1:50000", "10.0.0.1:12345", 0))
        # backpressure both ways: each full buffer pauses the other side, and only it
        self.assertEqual(user_transport.producerState, "producing")
        data.transport.producer.pauseProducing()
        self.assertEqual((user_transport.producerState, data.transport.producerState),
                         ("paused", "producing"))
        data.transport.producer.resumeProducing()
        user_transport.producer.pauseProducing()
        self.assertEqual((user_transport.producerState, data.transport.producerState),
                         ("producing", "paused"))
        user_transport.producer.resumeProducing()
        user.dataReceived(b"request")
        self.assertEqual(data.transport.value(), b"request")
        data.send(b"reply")
        self.assertEqual(user_transport.value(), b"reply")
        self.assertEqual((tunnel.flows.traffic.tcp_in, tunnel.flows.traffic.tcp_out), (7, 5))
        self.assertEqual(tunnel.report().connections, 1)
        self.assertEqual(len(tunnel.pool.idle), 0)

    def test_empty_pool_asks_for_more_and_waits(self):
        tunnel, clock = server_tunnel()
        control = open_session(tunnel)
        control.signals()
        _, user_transport = connect_user(tunnel)
        self.assertEqual(user_transport.producerState, "paused")
        (demand,) = control.signals()
        self.assertEqual((demand.type, wire.parse_demand(demand.payload)), (Type.DEMAND, 1))
        clock.advance(POOL_WAIT_TIMEOUT / 2)
        data = add_data(tunnel, control, 46001)
        self.assertEqual([f.type for f in data.early], [Type.LAUNCH])
        self.assertEqual(user_transport.producerState, "producing")
        data.transport.producer.pauseProducing()
        self.assertEqual(user_transport.producerState, "paused")

    def test_wait_for_the_pool_is_bounded(self):
        tunnel, clock = server_tunnel()
        open_session(tunnel)
        with capturedLogs() as events:
            _, user_transport = connect_user(tunnel)
            clock.advance(POOL_WAIT_TIMEOUT + 0.1)
        self.assertTrue(user_transport.disconnecting)
        self.assertIn("no pooled connection within 5s", " ".join(messages(events)))

    def test_semaphore_limit_refuses_at_once(self):
        tunnel, _ = server_tunnel(semaphore_limit=2)
        control = open_session(tunnel)
        for port in (46001, 46002, 46003):
            add_data(tunnel, control, port)
        transports = [connect_user(tunnel, 50000 + i)[1] for i in range(3)]
        self.assertEqual([t.disconnecting for t in transports], [False, False, True])

    def test_session_end_closes_idle_connections_but_not_relays(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        busy = add_data(tunnel, control, 46001)
        idle = add_data(tunnel, control, 46002)
        connect_user(tunnel)
        control.lose()
        self.assertTrue(idle.closed)
        self.assertFalse(busy.closed)
        self.assertEqual(len(tunnel.flows.relays), 1)


class ForwardMode(SynchronousTestCase):
    """mode=2: the client launches the data connections; the server dials its target."""

    def test_the_session_is_told_and_users_are_not_taken_here(self):
        tunnel, _ = server_tunnel(controls={"mode": 2})
        control = open_session(tunnel)
        self.assertEqual(control.settings["mode"], "forward")

    def test_a_launch_from_the_client_dials_the_target_and_relays(self):
        tunnel, reactor = server_tunnel(controls={"mode": 2, "proxy": 1})
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        self.assertEqual(len(tunnel.pool.idle), 1)
        data.send(data.launch(Proto.TCP, "203.0.113.9:51000", "127.0.0.1:8080") + b"early")
        self.assertEqual(len(tunnel.pool.idle), 0)  # launched: out of the pool for good
        (host, port, factory, _, _), = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 2))
        target = factory.buildProtocol(None)
        target_transport = transport_for(2)
        target.makeConnection(target_transport)
        # the server's own proxy=1 header, naming the user, then what came with LAUNCH
        self.assertEqual(target_transport.value(),
                         b"PROXY TCP4 203.0.113.9 127.0.0.1 51000 8080\r\nearly")
        target.dataReceived(b"answer")
        self.assertEqual(data.transport.value(), b"answer")
        self.assertEqual(tunnel.report().mode, "forward")

    def test_a_launch_in_reverse_mode_closes_the_connection(self):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        data.send(data.launch(Proto.TCP, "203.0.113.9:51000"))
        self.assertTrue(data.closed)

    def test_notcp_refuses_a_tcp_launch_and_counts_it(self):
        tunnel, reactor = server_tunnel(controls={"mode": 2, "notcp": 1})
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        data.send(data.launch(Proto.TCP, "203.0.113.9:51000"))
        self.assertEqual(reactor.tcpClients, [])
        self.assertTrue(data.transport.disconnecting)
        self.assertEqual(tunnel.report().refused, 1)
