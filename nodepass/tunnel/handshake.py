"""Mutual authentication of tunnel connections, as pure state machines (no I/O).

A session starts with SPAKE2 (the ``spake2`` library, as magic-wormhole uses it) on
the control connection: the tunnel key is the password, and nothing either end
sends — nor anything an eavesdropper, an impostor client or an impostor server sees
— lets anyone test a guess of the key offline; each online attempt tests one guess.
Both ends confirm the key they derived (the server first, so a client learns at once
that it reached a key holder), binding the CHALLENGE (the TLS mode) and, under TLS,
the fingerprint of the server's certificate as each end sees it: a rewritten mode
or a man in the middle fails the confirmation.

From the SPAKE2 key come :class:`SessionKeys`: the data connections' MACs (whose
nonces and session id make each one fresh), the tags on LAUNCH frames, and the
sealed frames of the control channel (:class:`Sealer` and :class:`Opener`), so that
without the key no one can make either end act, even with ``tls=0``.  MACs are
compared in constant time.  docs/protocol.md is the specification.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

from nodepass.tunnel import wire
from nodepass.tunnel.wire import Frame, Kind, ProtocolError, Type

LABEL = b"nodepass/2"
CLIENT_ID, SERVER_ID = b"nodepass client", b"nodepass server"


class AuthenticationError(ProtocolError):
    """The peer does not hold the key (or a MAC was forged or replayed)."""


def _lengths(*parts: bytes) -> bytes:
    """``parts`` joined unambiguously: each one after its length (2 bytes)."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, _lengths(LABEL, *parts), hashlib.sha256).digest()


def _check(mac: bytes, expected: bytes, why: str) -> None:
    if not hmac.compare_digest(mac, expected):
        raise AuthenticationError(why)


@dataclass(frozen=True)
class SessionKeys:
    """What a session's SPAKE2 key becomes, one key per use."""

    confirm: bytes  # the key confirmation and WELCOME
    data: bytes  # data connections' MACs and LAUNCH tags
    client_control: bytes  # control frames the client seals
    server_control: bytes  # control frames the server seals

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes) -> SessionKeys:
        def key(use: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=transcript,
                        info=LABEL + b" " + use).derive(shared)

        return cls(key(b"confirm"), key(b"data"), key(b"control client"),
                   key(b"control server"))


def _transcript(hello: bytes, challenge: bytes, client_msg: bytes, server_msg: bytes) -> bytes:
    return hashlib.sha256(_lengths(LABEL, hello, challenge, client_msg, server_msg)).digest()


def _spake_key(side: Any, message: bytes) -> bytes:
    try:
        return side.finish(message)
    except (SPAKEError, NotOnCurve, ValueError) as e:
        raise ProtocolError(f"malformed PAKE message ({e})") from None


# ---------------------------------------------------------------------------
# Control frames and LAUNCH, authenticated with the session's keys


class Sealer:
    """Seals the control frames one end sends: each payload is followed by a tag over
    its sequence number, type and payload, so none can be forged, replayed, dropped
    from the middle or reordered without the key."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def seal(self, kind: Type, payload: bytes) -> bytes:
        tag = _tag(self._key, self._seq, kind, payload)
        self._seq += 1
        return wire.frame(kind, payload + tag)


class Opener:
    """Checks and strips the tags of the control frames the other end sealed."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def open(self, frame: Frame) -> Frame:
        payload, tag = frame.payload[:-wire.TAG_SIZE], frame.payload[-wire.TAG_SIZE:]
        if len(tag) != wire.TAG_SIZE:
            raise AuthenticationError(f"{frame.type.name} frame without its tag")
        _check(tag, _tag(self._key, self._seq, frame.type, payload),
               f"{frame.type.name} frame not sealed with the session key")
        self._seq += 1
        return Frame(frame.type, payload)


def _tag(key: bytes, seq: int, kind: Type, payload: bytes) -> bytes:
    message = seq.to_bytes(8, "big") + bytes([kind]) + payload
    return hmac.new(key, message, hashlib.sha256).digest()[: wire.TAG_SIZE]


class Launches:
    """The LAUNCH tags of one data connection: keyed by the session's data key and
    bound to this connection's nonces and to the end that launches, so a LAUNCH
    cannot be forged, moved to another connection or sent back."""

    def __init__(self, key: bytes, role: bytes, nonces: bytes) -> None:
        self._key, self._role, self._nonces = key, role, nonces

    def _tag(self, sender: bytes, fields: bytes) -> bytes:
        return _mac(self._key, b"launch", sender, self._nonces, fields)[: wire.TAG_SIZE]

    def seal(self, fields: bytes) -> bytes:
        """The LAUNCH frame for ``fields`` (wire.launch_fields), sent by this end."""
        return wire.frame(Type.LAUNCH, fields + self._tag(self._role, fields))

    def open(self, payload: bytes) -> bytes:
        """The fields of a LAUNCH the other end sent, once its tag is checked."""
        fields, tag = payload[:-wire.TAG_SIZE], payload[-wire.TAG_SIZE:]
        other = b"client" if self._role == b"server" else b"server"
        if len(tag) != wire.TAG_SIZE:
            raise AuthenticationError("LAUNCH without its tag")
        _check(tag, self._tag(other, fields), "LAUNCH not sealed with the session key")
        return fields


# ---------------------------------------------------------------------------
# The server's side


class ServerHandshake:
    """HELLO -> CHALLENGE; then for a control connection PAKE -> PAKE (with our
    confirmation), AUTH (the client's) -> WELCOME; for a data connection [ATTEST under
    TLS], AUTH -> WELCOME, with the live session's keys (``session_keys(sid)``)."""

    def __init__(self, key: bytes, tls_mode: int, nonce: bytes,
                 session_keys: Callable[[bytes], SessionKeys | None],
                 binding: bytes = b"") -> None:
        self._password = key
        self.tls_mode = tls_mode
        self._nonce = nonce
        self._session_keys = session_keys
        self.binding = binding  # our certificate's fingerprint under TLS
        self.kind: Kind | None = None
        self.session_id = b""
        self.keys: SessionKeys | None = None
        self.confirmed = False  # our confirmation went out: a close now is a failed attempt
        self._hello = self._challenge = b""
        self._client_nonce = b""
        self._expected_auth = b""

    def on_hello(self, payload: bytes) -> bytes:
        """The CHALLENGE to answer with; a data connection must name the live session."""
        self.kind, self._client_nonce, self.session_id = wire.parse_hello(payload)
        self._hello = payload
        if self.kind is Kind.DATA:
            self.keys = self._session_keys(self.session_id)
            if self.keys is None:
                raise AuthenticationError("a data connection for no live session")
        self._challenge = wire.challenge_payload(self.tls_mode, self._nonce)
        return wire.frame(Type.CHALLENGE, self._challenge)

    # -- control connections

    def on_pake(self, client_msg: bytes) -> bytes:
        """The client's SPAKE2 message -> ours and our key confirmation (one frame)."""
        if self.kind is not Kind.CONTROL or self.keys is not None:
            raise ProtocolError("PAKE is only for a control connection's handshake")
        wire.exact(client_msg, wire.PAKE_SIZE, "PAKE")
        side = SPAKE2_B(self._password, idA=CLIENT_ID, idB=SERVER_ID)
        server_msg = side.start()
        shared = _spake_key(side, client_msg)
        transcript = _transcript(self._hello, self._challenge, client_msg, server_msg)
        self.keys = SessionKeys.derive(shared, transcript)
        self._expected_auth = _mac(self.keys.confirm, b"client", self.binding)
        self.confirmed = True
        return wire.frame(Type.PAKE, server_msg + _mac(self.keys.confirm, b"server",
                                                       self.binding))

    # -- data connections

    def attest(self) -> bytes:
        """Under TLS, a data connection's first frame inside it: our certificate's
        fingerprint, MACed with the session's data key."""
        return wire.frame(Type.ATTEST, self._data_mac(b"attest", b""))

    def _data_mac(self, role: bytes, session_id: bytes) -> bytes:
        assert self.keys is not None
        return _mac(self.keys.data, role, self._hello, self._challenge, session_id,
                    self.binding)

    # -- both

    def on_auth(self, payload: bytes) -> None:
        wire.exact(payload, wire.MAC_SIZE, "AUTH")
        if self.kind is Kind.CONTROL:
            if not self._expected_auth:
                raise ProtocolError("AUTH before PAKE")
            _check(payload, self._expected_auth, "wrong key")
        else:
            _check(payload, self._data_mac(b"client", self.session_id), "wrong session key")

    def welcome(self, session_id: bytes = b"", settings: dict[str, Any] | None = None) -> bytes:
        assert self.keys is not None
        if self.kind is Kind.DATA:
            return wire.welcome(self._data_mac(b"server", self.session_id))
        body = json.dumps(settings or {}, separators=(",", ":")).encode()
        return wire.welcome(_mac(self.keys.confirm, b"welcome", session_id, body), session_id,
                            body)

    def launches(self) -> Launches:
        assert self.keys is not None
        return Launches(self.keys.data, b"server", self._client_nonce + self._nonce)


# ---------------------------------------------------------------------------
# The client's side


class ClientHandshake:
    """HELLO; CHALLENGE -> (control) PAKE; PAKE (the server's, confirmed) -> AUTH;
    WELCOME.  A data connection: CHALLENGE, [ATTEST], -> AUTH; WELCOME."""

    def __init__(self, key: bytes, kind: Kind, nonce: bytes,
                 session: tuple[bytes, SessionKeys] | None = None) -> None:
        self._password = key
        self.kind = kind
        self._nonce = nonce
        self.session_id, self.keys = session if session is not None else (b"", None)
        self.tls_mode = 0
        self.binding = b""  # the server certificate's fingerprint as we saw it
        self._hello = wire.hello_payload(kind, nonce, self.session_id)
        self._challenge = b""
        self._server_nonce = b""
        self._side: Any = None
        self._client_msg = b""

    def hello(self) -> bytes:
        return wire.PREAMBLE + wire.frame(Type.HELLO, self._hello)

    def on_challenge(self, payload: bytes) -> int:
        self.tls_mode, self._server_nonce = wire.parse_challenge(payload)
        self._challenge = payload
        return self.tls_mode

    # -- control connections

    def pake(self) -> bytes:
        """Our SPAKE2 message, sent once the CHALLENGE (and TLS) is settled."""
        self._side = SPAKE2_A(self._password, idA=CLIENT_ID, idB=SERVER_ID)
        self._client_msg = self._side.start()
        return wire.frame(Type.PAKE, self._client_msg)

    def on_pake(self, payload: bytes, binding: bytes) -> bytes:
        """The server's SPAKE2 message and confirmation, checked against the certificate
        we saw (``binding``) -> our AUTH.  A wrong key or a man in the middle fails here."""
        if self._side is None or self.keys is not None:
            raise ProtocolError("unexpected PAKE")
        wire.exact(payload, wire.PAKE_SIZE + wire.MAC_SIZE, "PAKE")
        server_msg, mac = payload[: wire.PAKE_SIZE], payload[wire.PAKE_SIZE:]
        shared = _spake_key(self._side, server_msg)
        transcript = _transcript(self._hello, self._challenge, self._client_msg, server_msg)
        keys = SessionKeys.derive(shared, transcript)
        _check(mac, _mac(keys.confirm, b"server", binding), "the server does not hold the key")
        self.keys, self.binding = keys, binding
        return wire.auth(_mac(keys.confirm, b"client", binding))

    # -- data connections

    def on_attest(self, payload: bytes, binding: bytes) -> None:
        """Under TLS: the certificate we saw must be the one the session's key holder
        attested."""
        wire.exact(payload, wire.MAC_SIZE, "ATTEST")
        _check(payload, self._data_mac(b"attest", b"", binding),
               "the server's certificate is not attested by the session key")
        self.binding = binding

    def auth(self) -> bytes:
        return wire.auth(self._data_mac(b"client", self.session_id, self.binding))

    def _data_mac(self, role: bytes, session_id: bytes, binding: bytes) -> bytes:
        assert self.keys is not None
        return _mac(self.keys.data, role, self._hello, self._challenge, session_id, binding)

    # -- both

    def on_welcome(self, payload: bytes) -> dict[str, Any]:
        """Verify the server's WELCOME; return its settings (control connections)."""
        if self.keys is None:
            raise ProtocolError("WELCOME before the key was confirmed")
        mac, session_id, body = wire.parse_welcome(payload, self.kind)
        if self.kind is Kind.DATA:
            _check(mac, self._data_mac(b"server", self.session_id, self.binding),
                   "the server does not hold the session key")
            return {}
        _check(mac, _mac(self.keys.confirm, b"welcome", session_id, body),
               "the server's WELCOME is not sealed with the session key")
        self.session_id = session_id
        try:
            settings = json.loads(body or b"{}")
        except ValueError:
            raise ProtocolError("WELCOME settings are not JSON") from None
        if not isinstance(settings, dict):
            raise ProtocolError("WELCOME settings are not a JSON object")
        return settings

    def launches(self) -> Launches:
        assert self.keys is not None
        return Launches(self.keys.data, b"client", self._nonce + self._server_nonce)

    def session(self) -> tuple[bytes, SessionKeys]:
        """What this client's data connections authenticate with."""
        assert self.keys is not None
        return self.session_id, self.keys
