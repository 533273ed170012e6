"""Mutual authentication of a tunnel connection, as pure state machines.

Both ends prove the key with HMAC-SHA256 over both nonces, the connection kind,
the session id (data connections) and, under TLS, the fingerprint of the
server's certificate (so a man in the middle without the key cannot splice two
TLS sessions).  The key never crosses the wire; MACs are compared in constant
time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from nodepass.tunnel import wire
from nodepass.tunnel.wire import Kind, ProtocolError


class AuthenticationError(ProtocolError):
    """The peer does not hold the key (or a MAC was forged or replayed)."""


def _mac(key: bytes, role: bytes, kind: Kind, client_nonce: bytes, server_nonce: bytes,
         session_id: bytes, binding: bytes) -> bytes:
    parts = [b"nodepass/1", role, bytes([kind]), client_nonce, server_nonce, session_id, binding]
    message = b"".join(len(p).to_bytes(2, "big") + p for p in parts)
    return hmac.new(key, message, hashlib.sha256).digest()


class ServerHandshake:
    """The server's side: HELLO -> CHALLENGE, AUTH -> verified kind and session."""

    def __init__(self, key: bytes, tls_mode: int, nonce: bytes, binding: bytes = b"") -> None:
        self._key = key
        self.tls_mode = tls_mode
        self._server_nonce = nonce
        self.binding = binding  # our certificate's fingerprint under TLS
        self._client_nonce = b""
        self.kind: Kind | None = None
        self.session_id = b""

    def on_hello(self, payload: bytes) -> bytes:
        self.kind, self._client_nonce = wire.parse_hello(payload)
        return wire.challenge(self.tls_mode, self._server_nonce)

    def attest(self) -> bytes:
        """Under TLS, the first frame inside it: our certificate's fingerprint, MACed."""
        assert self.kind is not None
        mac = _mac(self._key, b"attest", self.kind, self._client_nonce, self._server_nonce,
                   b"", self.binding)
        return wire.frame(wire.Type.ATTEST, mac)

    def on_auth(self, payload: bytes) -> None:
        assert self.kind is not None
        session_id, mac = wire.parse_auth(payload, self.kind)
        expected = _mac(self._key, b"client", self.kind, self._client_nonce, self._server_nonce,
                        session_id, self.binding)
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("wrong key")
        self.session_id = session_id

    def welcome(self, session_id: bytes = b"", settings: dict[str, Any] | None = None) -> bytes:
        assert self.kind is not None
        sid = session_id if self.kind is Kind.CONTROL else self.session_id
        mac = _mac(self._key, b"server", self.kind, self._client_nonce, self._server_nonce,
                   sid, self.binding)
        if self.kind is Kind.DATA:
            return wire.welcome(mac)
        body = json.dumps(settings or {}, separators=(",", ":")).encode()
        return wire.welcome(mac, session_id, body)


class ClientHandshake:
    """The client's side: HELLO, CHALLENGE -> AUTH, WELCOME -> verified server."""

    def __init__(self, key: bytes, kind: Kind, nonce: bytes, session_id: bytes = b"") -> None:
        self._key = key
        self.kind = kind
        self._client_nonce = nonce
        self._server_nonce = b""
        self.session_id = session_id
        self.tls_mode = 0
        self.binding = b""  # the server certificate's fingerprint as we saw it

    def hello(self) -> bytes:
        return wire.hello(self.kind, self._client_nonce)

    def on_challenge(self, payload: bytes) -> int:
        self.tls_mode, self._server_nonce = wire.parse_challenge(payload)
        return self.tls_mode

    def on_attest(self, payload: bytes, binding: bytes) -> None:
        """Under TLS: the certificate we saw must be the one the key holder attested."""
        wire._exact(payload, wire.MAC_SIZE, "ATTEST")
        expected = _mac(self._key, b"attest", self.kind, self._client_nonce, self._server_nonce,
                        b"", binding)
        if not hmac.compare_digest(payload, expected):
            raise AuthenticationError("the server's certificate is not attested by the key")
        self.binding = binding

    def auth(self) -> bytes:
        mac = _mac(self._key, b"client", self.kind, self._client_nonce, self._server_nonce,
                   self.session_id, self.binding)
        return wire.auth(mac, self.session_id)

    def on_welcome(self, payload: bytes) -> dict[str, Any]:
        """Verify the server's proof; return its settings (control connections)."""
        mac, session_id, body = wire.parse_welcome(payload, self.kind)
        sid = session_id if self.kind is Kind.CONTROL else self.session_id
        expected = _mac(self._key, b"server", self.kind, self._client_nonce, self._server_nonce,
                        sid, self.binding)
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("the server does not hold the key")
        if self.kind is Kind.DATA:
            return {}
        self.session_id = session_id
        try:
            settings = json.loads(body or b"{}")
        except ValueError:
            raise ProtocolError("WELCOME settings are not JSON") from None
        if not isinstance(settings, dict):
            raise ProtocolError("WELCOME settings are not a JSON object")
        return settings
