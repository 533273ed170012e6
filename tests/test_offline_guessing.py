"""Offline key guessing: what an attacker records — as a client, as an impostor server,
or on the path with tls=0 — checked against candidate keys with the right one among
them.

The harness is each role's best check: recompute, for every candidate, what the
recorded messages would be under that key.  Run on the handshake we had before
protocol 2 (HMAC challenge/response, reproduced below from its specification) it
finds the right key at once, so it can fail; on protocol 2 (SPAKE2) it finds none —
except the one key an attacker tried online, which is how each attempt tests one
guess (the positive controls below show the same check does work for that one)."""

from __future__ import annotations

import hashlib
import hmac
import os
import random

from spake2 import SPAKE2_A, SPAKE2_B
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel import wire
from nodepass.tunnel.handshake import (
    CLIENT_ID,
    SERVER_ID,
    AuthenticationError,
    ClientHandshake,
    ServerHandshake,
    SessionKeys,
    _mac,
    _transcript,
)
from nodepass.tunnel.wire import FrameDecoder, Kind

KEY = b"sunflower-7"  # a human password: the kind a wordlist holds
CANDIDATES = [b"123456", b"password", b"letmein", KEY, b"dragon", b"sunshine", b"qwerty"]
WRONG_GUESS = b"sunflower-8"


def confirmed(check) -> list[bytes]:
    """The candidates an attacker can confirm offline with ``check``."""
    return [candidate for candidate in CANDIDATES if check(candidate)]


def frame_of(data: bytes, preamble: bool = False) -> wire.Frame:
    decoder = FrameDecoder(expect_preamble=preamble)
    decoder.feed(data)
    return decoder.next_frame()


def seeded(seed: int):
    """The attacker's own randomness, which it knows (and can replay offline)."""
    rng = random.Random(seed)
    return rng.randbytes


# ---------------------------------------------------------------------------
# Protocol 1, as docs/protocol.md specified it: every MAC is HMAC(key, transcript).


def v1_mac(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes,
           binding: bytes = b"") -> bytes:
    parts = [b"nodepass/1", role, bytes([Kind.CONTROL]), client_nonce, server_nonce, b"",
             binding]
    return hmac.new(key, b"".join(len(p).to_bytes(2, "big") + p for p in parts),
                    hashlib.sha256).digest()


class ProtocolOne(SynchronousTestCase):
    """The harness against the old handshake: it must find the key."""

    def test_as_a_client_the_servers_attestation_gives_the_key_away(self):
        nc, ns, fingerprint = os.urandom(32), os.urandom(32), os.urandom(32)
        attest = v1_mac(KEY, b"attest", nc, ns, fingerprint)  # what a tls=1 server sent
        self.assertEqual(confirmed(lambda c: v1_mac(c, b"attest", nc, ns, fingerprint)
                                   == attest), [KEY])

    def test_as_an_impostor_server_or_on_the_path_the_clients_auth_gives_it_away(self):
        nc, ns = os.urandom(32), os.urandom(32)
        auth = v1_mac(KEY, b"client", nc, ns)  # what the client sent with tls=0
        self.assertEqual(confirmed(lambda c: v1_mac(c, b"client", nc, ns) == auth), [KEY])


# ---------------------------------------------------------------------------
# Protocol 2: the real handshake classes, and an attacker using the spake2 library.


class ProtocolTwo(SynchronousTestCase):
    def attack_server(self, guess: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """An attacker connects to a real server (key KEY) with its one guess:
        returns (hello, challenge, its message, the server's reply)."""
        server = ServerHandshake(KEY, 0, os.urandom(32), lambda sid: None)
        hello = wire.hello_payload(Kind.CONTROL, os.urandom(32))
        challenge = frame_of(server.on_hello(hello)).payload
        mine = SPAKE2_A(guess, idA=CLIENT_ID, idB=SERVER_ID, entropy_f=seeded(1)).start()
        reply = frame_of(server.on_pake(mine)).payload
        return hello, challenge, mine, reply

    def offline_as_client(self, recorded):
        hello, challenge, mine, reply = recorded
        theirs, mac = reply[: wire.PAKE_SIZE], reply[wire.PAKE_SIZE:]

        def check(candidate: bytes) -> bool:
            side = SPAKE2_A(candidate, idA=CLIENT_ID, idB=SERVER_ID, entropy_f=seeded(1))
            side.start()
            keys = SessionKeys.derive(side.finish(theirs),
                                      _transcript(hello, challenge, mine, theirs))
            return hmac.compare_digest(_mac(keys.confirm, b"server", b""), mac)

        return confirmed(check)

    def test_as_a_client_nothing_confirms_a_key_but_the_one_guessed_online(self):
        self.assertEqual(self.offline_as_client(self.attack_server(WRONG_GUESS)), [])
        # the positive control: had the online guess been right, the same check says so
        self.assertEqual(self.offline_as_client(self.attack_server(KEY)), [KEY])

    def impostor_server(self, guess: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes | None]:
        """A real client (key KEY) reaches an attacker with one guess in the server's
        place: (hello, challenge, the client's message, the attacker's, the client's
        AUTH — None when the client gave up on the attacker's confirmation)."""
        client = ClientHandshake(KEY, Kind.CONTROL, os.urandom(32))
        hello = frame_of(client.hello(), preamble=True).payload
        challenge = wire.challenge_payload(0, os.urandom(32))
        client.on_challenge(challenge)
        theirs = frame_of(client.pake()).payload
        side = SPAKE2_B(guess, idA=CLIENT_ID, idB=SERVER_ID, entropy_f=seeded(2))
        mine = side.start()
        keys = SessionKeys.derive(side.finish(theirs), _transcript(hello, challenge, theirs,
                                                                    mine))
        try:
            auth = frame_of(client.on_pake(mine + _mac(keys.confirm, b"server", b""), b""))
        except AuthenticationError:
            auth = None
        return hello, challenge, theirs, mine, auth and auth.payload

    def offline_as_server(self, recorded):
        hello, challenge, theirs, mine, auth = recorded

        def check(candidate: bytes) -> bool:
            if auth is None:
                return False  # the client sent nothing that depends on the key
            side = SPAKE2_B(candidate, idA=CLIENT_ID, idB=SERVER_ID, entropy_f=seeded(2))
            side.start()
            keys = SessionKeys.derive(side.finish(theirs),
                                      _transcript(hello, challenge, theirs, mine))
            return hmac.compare_digest(_mac(keys.confirm, b"client", b""), auth)

        return confirmed(check)

    def test_as_an_impostor_server_nothing_confirms_a_key_but_the_one_guessed(self):
        recorded = self.impostor_server(WRONG_GUESS)
        self.assertIsNone(recorded[-1], "a client must not answer a server without the key")
        self.assertEqual(self.offline_as_server(recorded), [])
        self.assertEqual(self.offline_as_server(self.impostor_server(KEY)), [KEY])

    def test_on_the_path_a_whole_tls0_session_confirms_nothing(self):
        server = ServerHandshake(KEY, 0, os.urandom(32), lambda sid: None)
        client = ClientHandshake(KEY, Kind.CONTROL, os.urandom(32))
        hello = frame_of(client.hello(), preamble=True).payload
        challenge = frame_of(server.on_hello(hello)).payload
        client.on_challenge(challenge)
        theirs_a = frame_of(client.pake()).payload
        reply = frame_of(server.on_pake(theirs_a)).payload
        auth = frame_of(client.on_pake(reply, b"")).payload
        server.on_auth(auth)
        welcome = frame_of(server.welcome(b"S" * 16, {"mode": "reverse"})).payload
        theirs_b, server_mac = reply[: wire.PAKE_SIZE], reply[wire.PAKE_SIZE:]
        transcript = _transcript(hello, challenge, theirs_a, theirs_b)

        def check(candidate: bytes) -> bool:
            # with no side's secret, the best an eavesdropper can do is to play either
            # side with its own randomness against each recorded message
            for side, theirs, role, mac in (
                    (SPAKE2_A(candidate, idA=CLIENT_ID, idB=SERVER_ID), theirs_b, b"server",
                     server_mac),
                    (SPAKE2_B(candidate, idA=CLIENT_ID, idB=SERVER_ID), theirs_a, b"client",
                     auth)):
                side.start()
                keys = SessionKeys.derive(side.finish(theirs), transcript)
                if hmac.compare_digest(_mac(keys.confirm, role, b""), mac):
                    return True
            return False

        self.assertEqual(confirmed(check), [])
        self.assertNotIn(KEY, b"".join((hello, challenge, reply, auth, welcome)))
