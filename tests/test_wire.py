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
        data = (wire.hello(Kind.DATA, b"n" * 32) + wire.demand(7)
                + wire.goodbye(wire.Goodbye.SHUTDOWN))
        frames, decoder = decode_all(data, expect_preamble=True)
        self.assertEqual([f.type for f in frames], [Type.HELLO, Type.DEMAND, Type.GOODBYE])
        self.assertEqual(wire.parse_hello(frames[0].payload), (Kind.DATA, b"n" * 32))
        self.assertEqual(wire.parse_demand(frames[1].payload), 7)
        self.assertEqual(decoder.rest(), b"")

    def test_truncated_frame_waits(self):
        data = wire.demand(3)
        frames, decoder = decode_all(data[:-1])
        self.assertEqual(frames, [])
        decoder.feed(data[-1:])
        self.assertEqual(decoder.next_frame(), Frame(Type.DEMAND, b"\x00\x03"))

    def test_oversized_frame_refused_from_its_header(self):
        header = bytes([Type.PING]) + (MAX_PAYLOAD[Type.PING] + 1).to_bytes(2, "big")
        with self.assertRaisesRegex(ProtocolError, "PING frame of 13 bytes exceeds its limit"):
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
        data = (wire.launch(Proto.TCP, "127.0.0.1:1", "[::1]:2", 2)
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
        with self.assertRaisesRegex(ProtocolError, "unknown TLS mode 7"):
            wire.parse_challenge(b"\x07" + b"n" * 32)
        with self.assertRaisesRegex(ProtocolError, "unknown launch protocol 5"):
            wire.parse_launch(b"\x05\x00")
        with self.assertRaisesRegex(ProtocolError, "unknown PROXY protocol version 3"):
            wire.parse_launch(b"\x01\x03")
        longest = wire.launch(Proto.UDP, "a" * 100, "b" * 100, 1)
        decoder = FrameDecoder()
        decoder.feed(longest)
        self.assertEqual(decoder.next_frame().payload, longest[3:])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, 200), max_size=20), st.data())
    def test_any_split_gives_the_same_frames(self, counts, data):
        stream = PREAMBLE + b"".join(wire.demand(n) for n in counts) + wire.frame(Type.BUSY)
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


class Handshake(SynchronousTestCase):
    def exchange(self, client_key, server_key, kind=Kind.CONTROL, session=b""):
        server = ServerHandshake(server_key, 0, os.urandom(32))
        client = ClientHandshake(client_key, kind, os.urandom(32), session)
        frames, _ = decode_all(client.hello(), expect_preamble=True)
        challenge, _ = decode_all(server.on_hello(frames[0].payload))
        self.assertEqual(client.on_challenge(challenge[0].payload), 0)
        auth, _ = decode_all(client.auth())
        server.on_auth(auth[0].payload)
        return server, client

    def test_same_key_authenticates_both_ways(self):
        server, client = self.exchange(b"k", b"k")
        welcome, _ = decode_all(server.welcome(b"S" * 16, {"heartbeat_ms": 5}))
        self.assertEqual(client.on_welcome(welcome[0].payload), {"heartbeat_ms": 5})
        self.assertEqual(client.session_id, b"S" * 16)

    def test_wrong_key_refused_by_server(self):
        with self.assertRaisesRegex(AuthenticationError, "wrong key"):
            self.exchange(b"guess", b"k")

    def test_server_without_key_refused_by_client(self):
        server = ServerHandshake(b"impostor", 0, os.urandom(32))
        client = ClientHandshake(b"k", Kind.CONTROL, os.urandom(32))
        frames, _ = decode_all(client.hello(), expect_preamble=True)
        challenge, _ = decode_all(server.on_hello(frames[0].payload))
        client.on_challenge(challenge[0].payload)
        server.kind = Kind.CONTROL
        welcome, _ = decode_all(server.welcome(b"S" * 16))
        with self.assertRaises(AuthenticationError):
            client.on_welcome(welcome[0].payload)

    def test_data_connection_binds_its_session(self):
        server, client = self.exchange(b"k", b"k", Kind.DATA, b"D" * 16)
        self.assertEqual(server.session_id, b"D" * 16)
        welcome, _ = decode_all(server.welcome())
        self.assertEqual(client.on_welcome(welcome[0].payload), {})

    def test_replayed_auth_fails_against_a_new_challenge(self):
        _, client = self.exchange(b"k", b"k")
        recorded = decode_all(client.auth())[0][0].payload
        fresh = ServerHandshake(b"k", 0, os.urandom(32))
        fresh.on_hello(decode_all(client.hello(), expect_preamble=True)[0][0].payload)
        with self.assertRaises(AuthenticationError):
            fresh.on_auth(recorded)

    def test_key_never_on_the_wire(self):
        key = b"a-very-distinctive-key"
        server = ServerHandshake(key, 0, os.urandom(32))
        client = ClientHandshake(key, Kind.CONTROL, os.urandom(32))
        sent = client.hello()
        sent += server.on_hello(decode_all(sent, expect_preamble=True)[0][0].payload)
        client.on_challenge(decode_all(sent[len(client.hello()):])[0][0].payload)
        sent += client.auth() + server.welcome(b"S" * 16)
        self.assertNotIn(key, sent)


class TLSBinding(SynchronousTestCase):
    """Under TLS the MACs cover the certificate fingerprint each end sees."""

    def start(self, server_binding):
        server = ServerHandshake(b"k", 1, os.urandom(32), server_binding)
        client = ClientHandshake(b"k", Kind.CONTROL, os.urandom(32))
        hello = decode_all(client.hello(), expect_preamble=True)[0][0]
        challenge = decode_all(server.on_hello(hello.payload))[0][0]
        self.assertEqual(client.on_challenge(challenge.payload), 1)
        attest = decode_all(server.attest())[0][0]
        self.assertEqual(attest.type, Type.ATTEST)
        return server, client, attest.payload

    def test_matching_certificate_authenticates(self):
        server, client, attestation = self.start(b"F" * 32)
        client.on_attest(attestation, b"F" * 32)
        server.on_auth(decode_all(client.auth())[0][0].payload)
        client.on_welcome(decode_all(server.welcome(b"S" * 16))[0][0].payload)

    def test_other_certificate_is_refused_by_the_client(self):
        _, client, attestation = self.start(b"F" * 32)
        with self.assertRaisesRegex(AuthenticationError, "not attested"):
            client.on_attest(attestation, b"M" * 32)  # what a man in the middle shows

    def test_auth_bound_to_another_certificate_is_refused_by_the_server(self):
        server, client, _ = self.start(b"F" * 32)
        client.binding = b"M" * 32
        with self.assertRaises(AuthenticationError):
            server.on_auth(decode_all(client.auth())[0][0].payload)

    def test_stripping_tls_from_the_challenge_fails_authentication(self):
        server = ServerHandshake(b"k", 1, os.urandom(32), b"F" * 32)
        client = ClientHandshake(b"k", Kind.CONTROL, os.urandom(32))
        hello = decode_all(client.hello(), expect_preamble=True)[0][0]
        challenge = decode_all(server.on_hello(hello.payload))[0][0]
        client.on_challenge(b"\x00" + challenge.payload[1:])  # rewritten to tls=0
        with self.assertRaises(AuthenticationError):
            server.on_auth(decode_all(client.auth())[0][0].payload)
