"""Hostile input, in memory: slow HTTP clients, garbage on the tunnel port, control fuzz."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.static import Data

from nodepass.master.service import ApiSite, DeadlineChannel
from nodepass.tunnel import wire
from nodepass.tunnel.wire import Type
from tests.memory import FakeClient, add_data, open_session, server_tunnel


def api_connection():
    clock = Clock()
    root = Resource()
    root.putChild(b"ok", Data(b"fine", "text/plain"))
    site = ApiSite(root, timeout=60, reactor=clock)
    site.startFactory()
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, channel, transport


class SlowHttpClients(SynchronousTestCase):
    def test_a_request_trickled_a_byte_a_second_is_cut_off(self):
        clock, channel, transport = api_connection()
        request = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"
        elapsed = 0
        for byte in request:
            if transport.disconnected:
                break
            channel.dataReceived(bytes([byte]))
            clock.advance(1.0)
            elapsed += 1
        self.assertTrue(transport.disconnected)
        self.assertLessEqual(elapsed, DeadlineChannel.request_deadline + 1)
        self.assertEqual(transport.value(), b"")

    def test_a_prompt_request_is_served_and_the_next_one_gets_a_new_deadline(self):
        clock, channel, transport = api_connection()
        channel.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"fine", transport.value())
        clock.advance(DeadlineChannel.request_deadline - 1)
        channel.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"fine"), 2)
        self.assertFalse(transport.disconnected)
        clock.advance(DeadlineChannel.request_deadline + 1)  # idle after a response: cut
        self.assertTrue(transport.disconnected)


class TunnelGarbage(SynchronousTestCase):
    """Whatever arrives on the tunnel port, only that connection is closed."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=6))
    def test_random_bytes_never_escape_or_disturb_the_session(self, chunks):
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        intruder = FakeClient(tunnel, port=41111)
        for chunk in chunks:
            intruder.send(chunk)  # must not raise
        self.assertIs(tunnel.session, control.protocol)
        self.assertFalse(control.closed)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(list(Type)), st.binary(max_size=80),
                              st.booleans()), min_size=1, max_size=8))
    def test_any_frames_in_any_order_on_an_authenticated_control_channel(self, frames):
        # sealed (what the key holder could send: the session's own logic is fuzzed) or
        # not (what anyone on the path could inject)
        tunnel, _ = server_tunnel()
        control = open_session(tunnel)
        for kind, payload, sealed in frames:
            room = wire.MAX_PAYLOAD[kind] - (wire.TAG_SIZE if sealed else 0)
            if len(payload) > room:
                payload = payload[: max(0, room)]
            if sealed and room >= 0:
                control.signal(kind, payload)  # must not raise
            else:
                control.send(wire.frame(kind, payload))  # must not raise
            if not sealed and not control.protocol.closing:
                self.fail(f"an unsealed {kind.name} frame was taken")
        if not control.transport.disconnected:
            self.assertIs(tunnel.session, control.protocol)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=wire.MAX_PAYLOAD[Type.LAUNCH]), st.binary(max_size=300),
           st.sampled_from([0, 2]))
    def test_any_launch_on_a_data_connection_in_either_mode(self, payload, after, mode):
        tunnel, _ = server_tunnel(controls={"mode": mode, "proxy": 2})
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        data.send(wire.frame(Type.LAUNCH, payload) + after)  # must not raise
        self.assertIs(tunnel.session, control.protocol)
        self.assertFalse(control.closed)
        if mode == 0:  # the server launches; a client's LAUNCH closes the connection
            self.assertTrue(data.closed)

    def test_replayed_handshake_is_refused(self):
        tunnel, _ = server_tunnel()
        first = FakeClient(tunnel, port=42000)
        hello = first.handshake.hello()
        first.send(hello)
        first.handshake.on_challenge(first.frames()[0].payload)
        pake = first.handshake.pake()
        first.send(pake)
        auth = first.handshake.on_pake(first.frames()[0].payload, b"")
        first.send(auth)
        self.assertIs(tunnel.session, first.protocol)
        first.lose()
        replay = FakeClient(tunnel, port=42001)
        for recorded in (hello, pake, auth):  # the same bytes, against a fresh server side
            replay.send(recorded)
        self.assertTrue(replay.transport.disconnected)
        self.assertIsNone(tunnel.session)
