"""The wire format: frames, limits, malformed input, arbitrary splits."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel import wire
from nodepass.tunnel.handshake import AuthenticationError, ClientHandshake, ServerHandshake
from nodepass.tunnel.wire import (
    MAX_PAYLOAD,
    PREAMBLE,
    Frame,
    FrameDecoder,
    Kind,
    Proto,
    ProtocolError,
    Type,
)


def decode_all(data, expect_preamble=False):
    decoder = FrameDecoder(expect_preamble)
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames, decoder


class Framing(SynchronousTestCase):
    def test_round_trip(self):
        data = (PREAMBLE + wire.frame(Type.HELLO, wire.hello_payload(Kind.DATA, b"n" * 32,
                                                                     b"s" * 16))
                + wire.frame(Type.DEMAND, wire.demand_payload(7))
                + wire.frame(Type.GOODBYE, wire.goodbye_payload(wire.Goodbye.SHUTDOWN)))
        frames, decoder = decode_all(data, expect_preamble=True)
        self.assertEqual([f.type for f in frames], [Type.HELLO, Type.DEMAND, Type.GOODBYE])
        self.assertEqual(wire.parse_hello(frames[0].payload),
                         (Kind.DATA, b"n" * 32, b"s" * 16))
        self.assertEqual(wire.parse_demand(frames[1].payload), 7)
        self.assertEqual(decoder.rest(), b"")

    def test_truncated_frame_waits(self):
        data = wire.frame(Type.DEMAND, wire.demand_payload(3))
        frames, decoder = decode_all(data[:-1])
        self.assertEqual(frames, [])
        decoder.feed(data[-1:])
        self.assertEqual(decoder.next_frame(), Frame(Type.DEMAND, b"\x00\x03"))

    def test_oversized_frame_refused_from_its_header(self):
        header = bytes([Type.PING]) + (MAX_PAYLOAD[Type.PING] + 1).to_bytes(2, "big")
        with self.assertRaisesRegex(ProtocolError, "PING frame of 29 bytes exceeds its limit"):
            decode_all(header)

    def test_unknown_type_refused(self):
        with self.assertRaisesRegex(ProtocolError, "unknown frame type 200"):
            decode_all(b"\xc8\x00\x00")

    def test_bad_preamble_refused_early(self):
        with self.assertRaisesRegex(ProtocolError, "bad preamble"):
            decode_all(b"GE", expect_preamble=True)
        with self.assertRaisesRegex(ProtocolError, "unsupported protocol version 9"):
            decode_all(b"NPT\x09", expect_preamble=True)

    def test_encoder_refuses_oversized_payload(self):
        with self.assertRaises(ValueError):
            wire.frame(Type.BUSY, b"x")

    def test_rest_after_launch_is_raw(self):
        data = (wire.frame(Type.LAUNCH, wire.launch_fields(Proto.TCP, "127.0.0.1:1", "[::1]:2",
                                                            2))
                + b"\x01\x02raw bytes, not frames")
        decoder = FrameDecoder()
        decoder.feed(data)
        frame = decoder.next_frame()
        self.assertEqual(wire.parse_launch(frame.payload),
                         wire.Launch(Proto.TCP, "127.0.0.1:1", "[::1]:2", 2))
        self.assertEqual(decoder.rest(), b"\x01\x02raw bytes, not frames")

    def test_message_size_checks(self):
        for parse, payload in ((wire.parse_hello, b"x"), (wire.parse_challenge, b""),
                               (wire.parse_ping, b"123"), (wire.parse_demand, b"1"),
                               (wire.parse_launch, b"")):
            with self.assertRaises(ProtocolError, msg=parse.__name__):
                parse(payload)
        with self.assertRaisesRegex(ProtocolError, "unknown connection kind 9"):
            wire.parse_hello(b"\x09" + b"n" * 32)
        with self.assertRaisesRegex(ProtocolError, "HELLO payload must be 49 bytes"):
            wire.parse_hello(b"\x02" + b"n" * 32)  # a data connection names its session
        with self.assertRaisesRegex(ProtocolError, "unknown TLS mode 7"):
            wire.parse_challenge(b"\x07" + b"n" * 32)
        with self.assertRaisesRegex(ProtocolError, "unknown launch protocol 5"):
            wire.parse_launch(b"\x05\x00")
        with self.assertRaisesRegex(ProtocolError, "unknown PROXY protocol version 3"):
            wire.parse_launch(b"\x01\x03")
        longest = wire.frame(Type.LAUNCH, wire.launch_fields(Proto.UDP, "a" * 100, "b" * 100, 1)
                             + bytes(wire.TAG_SIZE))
        decoder = FrameDecoder()
        decoder.feed(longest)
        self.assertEqual(decoder.next_frame().payload, longest[3:])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, 200), max_size=20), st.data())
    def test_any_split_gives_the_same_frames(self, counts, data):
        stream = (PREAMBLE + b"".join(wire.frame(Type.DEMAND, wire.demand_payload(n))
                                      for n in counts) + wire.frame(Type.BUSY))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        decoder = FrameDecoder(expect_preamble=True)
        frames = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            decoder.feed(stream[start:end])
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        self.assertEqual([wire.parse_demand(f.payload) for f in frames[:-1]], counts)
        self.assertEqual(frames[-1].type, Type.BUSY)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_decodes_or_raises_protocol_error(self, garbage):
        decoder = FrameDecoder(expect_preamble=True)
        try:
            decoder.feed(garbage)
            while decoder.next_frame() is not None:
                pass
        except ProtocolError:
            pass


def frame_of(data, expect_preamble=False):
    (frame,), _ = decode_all(data, expect_preamble)
    return frame


class Session:
    """A live session's keys, for data connections (made by a real control handshake)."""

    def __init__(self, key=b"k"):
        self.id = b"S" * 16
        server, client = control_handshake(key, key)
        client.on_welcome(frame_of(server.welcome(self.id)).payload)
        self.keys = client.keys
        self.server_keys = server.keys


def control_handshake(client_key, server_key, tls_mode=0, server_binding=b"",
                      client_binding=b"", rewrite_challenge=None):
    """The control connection's handshake up to the client's AUTH, checked by the server."""
    server = ServerHandshake(server_key, tls_mode, os.urandom(32), lambda sid: None,
                             server_binding)
    client = ClientHandshake(client_key, Kind.CONTROL, os.urandom(32))
    challenge = frame_of(server.on_hello(frame_of(client.hello(), True).payload)).payload
    client.on_challenge(rewrite_challenge(challenge) if rewrite_challenge else challenge)
    reply = frame_of(server.on_pake(frame_of(client.pake()).payload))
    auth = client.on_pake(reply.payload, client_binding)
    server.on_auth(frame_of(auth).payload)
    return server, client


class Handshake(SynchronousTestCase):
    def test_same_key_authenticates_both_ways(self):
        server, client = control_handshake(b"k", b"k")
        self.assertEqual(server.keys, client.keys)
        welcome = frame_of(server.welcome(b"S" * 16, {"heartbeat_ms": 5}))
        self.assertEqual(client.on_welcome(welcome.payload), {"heartbeat_ms": 5})
        self.assertEqual(client.session_id, b"S" * 16)

    def test_a_wrong_key_is_found_by_the_client_at_the_servers_confirmation(self):
        with self.assertRaisesRegex(AuthenticationError, "the server does not hold the key"):
            control_handshake(b"guess", b"k")

    def test_a_client_without_the_key_is_refused_by_the_server(self):
        server = ServerHandshake(b"k", 0, os.urandom(32), lambda sid: None)
        client = ClientHandshake(b"guess", Kind.CONTROL, os.urandom(32))
        server.on_hello(frame_of(client.hello(), True).payload)
        server.on_pake(frame_of(client.pake()).payload)
        with self.assertRaisesRegex(AuthenticationError, "wrong key"):
            server.on_auth(bytes(32))  # whatever it makes up

    def test_a_welcome_not_sealed_with_the_session_key_is_refused(self):
        _, client = control_handshake(b"k", b"k")
        forged = wire.welcome(bytes(32), b"S" * 16, b'{"mode":"forward"}')
        with self.assertRaisesRegex(AuthenticationError, "WELCOME is not sealed"):
            client.on_welcome(frame_of(forged).payload)

    def test_malformed_pake_messages_are_protocol_errors(self):
        for message in (b"", b"A" * 33, b"B" + bytes(32), b"A" + b"\xff" * 32):
            server = ServerHandshake(b"k", 0, os.urandom(32), lambda sid: None)
            server.on_hello(frame_of(ClientHandshake(b"k", Kind.CONTROL, os.urandom(32))
                                     .hello(), True).payload)
            with self.assertRaises(ProtocolError, msg=message):
                server.on_pake(message)

    def test_data_connections_authenticate_with_the_session_keys(self):
        session = Session()
        server = ServerHandshake(b"k", 0, os.urandom(32),
                                 {session.id: session.server_keys}.get)
        client = ClientHandshake(b"k", Kind.DATA, os.urandom(32), (session.id, session.keys))
        client.on_challenge(frame_of(server.on_hello(frame_of(client.hello(), True).payload))
                            .payload)
        self.assertEqual(server.session_id, session.id)
        server.on_auth(frame_of(client.auth()).payload)
        self.assertEqual(client.on_welcome(frame_of(server.welcome()).payload), {})
        # and a LAUNCH one end seals, only the other end opens
        fields = wire.launch_fields(Proto.TCP, "203.0.113.9:1", "127.0.0.1:2", 1)
        sealed = frame_of(server.launches().seal(fields)).payload
        self.assertEqual(client.launches().open(sealed), fields)
        with self.assertRaisesRegex(AuthenticationError, "LAUNCH not sealed"):
            server.launches().open(sealed)  # sent back
        with self.assertRaisesRegex(AuthenticationError, "LAUNCH not sealed"):
            client.launches().open(fields + bytes(wire.TAG_SIZE))  # forged

    def test_a_data_connection_for_no_live_session_is_refused_at_hello(self):
        session = Session()
        server = ServerHandshake(b"k", 0, os.urandom(32), lambda sid: None)
        client = ClientHandshake(b"k", Kind.DATA, os.urandom(32), (session.id, session.keys))
        with self.assertRaisesRegex(AuthenticationError, "no live session"):
            server.on_hello(frame_of(client.hello(), True).payload)

    def test_a_data_connection_with_other_keys_is_refused(self):
        session, other = Session(), Session()
        server = ServerHandshake(b"k", 0, os.urandom(32),
                                 {session.id: session.server_keys}.get)
        client = ClientHandshake(b"k", Kind.DATA, os.urandom(32), (session.id, other.keys))
        client.on_challenge(frame_of(server.on_hello(frame_of(client.hello(), True).payload))
                            .payload)
        with self.assertRaises(AuthenticationError):
            server.on_auth(frame_of(client.auth()).payload)

    def test_replayed_auth_fails_against_a_new_connection(self):
        session = Session()
        lookup = {session.id: session.server_keys}.get
        client = ClientHandshake(b"k", Kind.DATA, os.urandom(32), (session.id, session.keys))
        first = ServerHandshake(b"k", 0, os.urandom(32), lookup)
        client.on_challenge(frame_of(first.on_hello(frame_of(client.hello(), True).payload))
                            .payload)
        recorded = frame_of(client.auth()).payload
        fresh = ServerHandshake(b"k", 0, os.urandom(32), lookup)
        fresh.on_hello(frame_of(client.hello(), True).payload)
        first.on_auth(recorded)
        with self.assertRaises(AuthenticationError):
            fresh.on_auth(recorded)

    def test_key_never_on_the_wire(self):
        key = b"a-very-distinctive-key"
        server = ServerHandshake(key, 0, os.urandom(32), lambda sid: None)
        client = ClientHandshake(key, Kind.CONTROL, os.urandom(32))
        sent = client.hello()
        sent += server.on_hello(frame_of(client.hello(), True).payload)
        client.on_challenge(frame_of(sent[len(client.hello()):]).payload)
        pake = client.pake()
        reply = server.on_pake(frame_of(pake).payload)
        auth = client.on_pake(frame_of(reply).payload, b"")
        sent += pake + reply + auth + server.welcome(b"S" * 16)
        self.assertNotIn(key, sent)


class ControlSeals(SynchronousTestCase):
    def test_sealed_frames_open_in_order_once(self):
        from nodepass.tunnel.handshake import Opener, Sealer

        sealer, opener = Sealer(b"x" * 32), Opener(b"x" * 32)
        first = frame_of(sealer.seal(Type.PING, wire.ping_payload(1, 2)))
        second = frame_of(sealer.seal(Type.DEMAND, wire.demand_payload(3)))
        with self.assertRaises(AuthenticationError):
            Opener(b"x" * 32).open(second)  # out of order (a frame dropped)
        self.assertEqual(opener.open(first), Frame(Type.PING, wire.ping_payload(1, 2)))
        self.assertEqual(opener.open(second), Frame(Type.DEMAND, wire.demand_payload(3)))
        with self.assertRaises(AuthenticationError):
            opener.open(second)  # replayed
        with self.assertRaises(AuthenticationError):
            Opener(b"y" * 32).open(first)  # another key


class TLSBinding(SynchronousTestCase):
    """Under TLS the key confirmation covers the certificate fingerprint each end sees,
    and the CHALLENGE (the mode) itself."""

    def test_matching_certificate_authenticates(self):
        _, client = control_handshake(b"k", b"k", 1, b"F" * 32, b"F" * 32)
        self.assertEqual(client.binding, b"F" * 32)

    def test_another_certificate_is_refused_by_the_client(self):
        with self.assertRaisesRegex(AuthenticationError, "the server does not hold the key"):
            control_handshake(b"k", b"k", 1, b"F" * 32, b"M" * 32)  # a man in the middle's

    def test_stripping_tls_from_the_challenge_fails_the_confirmation(self):
        with self.assertRaises(AuthenticationError):
            control_handshake(b"k", b"k", 1, b"F" * 32, b"F" * 32,
                              rewrite_challenge=lambda c: b"\x00" + c[1:])

    def test_a_data_connection_attests_the_certificate_with_the_session_key(self):
        session = Session()
        lookup = {session.id: session.server_keys}.get
        for seen, ok in ((b"F" * 32, True), (b"M" * 32, False)):
            server = ServerHandshake(b"k", 1, os.urandom(32), lookup, b"F" * 32)
            client = ClientHandshake(b"k", Kind.DATA, os.urandom(32),
                                     (session.id, session.keys))
            challenge = frame_of(server.on_hello(frame_of(client.hello(), True).payload))
            client.on_challenge(challenge.payload)
            attest = frame_of(server.attest()).payload
            if ok:
                client.on_attest(attest, seen)
                server.on_auth(frame_of(client.auth()).payload)
            else:
                with self.assertRaisesRegex(AuthenticationError, "not attested"):
                    client.on_attest(attest, seen)
