"""The tunnel's wire format: framing and messages, as pure functions (no I/O).

Every connection to the tunnel port opens with the 4-byte preamble ``NPT`` +
version, then carries frames ``type:u8 | length:u16 | payload``.  Each frame
type has a payload size limit; anything malformed raises :class:`ProtocolError`
and the caller closes that one connection.  docs/protocol.md is the
specification this module implements.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

MAGIC = b"NPT"
VERSION = 3
PREAMBLE = MAGIC + bytes([VERSION])
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 16  # a sealed control frame's or a LAUNCH's tag
PAKE_SIZE = 33  # one SPAKE2 message (spake2's Ed25519 group: a side byte, an element)
SESSION_ID_SIZE = 16
MAX_SETTINGS = 1024
MAX_ADDRESS = 64

_HEADER = struct.Struct("!BH")
_PING = struct.Struct("!IQ")
_DEMAND = struct.Struct("!H")


class ProtocolError(Exception):
    """The peer broke the protocol; the message says how, for the log."""


class Kind(IntEnum):
    """What a tunnel connection is for, declared in its HELLO."""

    CONTROL = 1
    DATA = 2


class Type(IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    BUSY = 5
    ATTEST = 6
    PAKE = 7
    PING = 16
    PONG = 17
    DEMAND = 18
    GOODBYE = 19
    LAUNCH = 32
    # 33 and 34 (DATA, EOF: a stream under TLS, version 2) are retired
    DATAGRAM = 35


class Proto(IntEnum):
    """What a launched data connection carries."""

    TCP = 1
    UDP = 2


class Goodbye(IntEnum):
    SHUTDOWN = 1


MAX_PAYLOAD: dict[Type, int] = {
    Type.HELLO: 1 + NONCE_SIZE + SESSION_ID_SIZE,
    Type.CHALLENGE: 1 + NONCE_SIZE,
    Type.AUTH: MAC_SIZE,
    Type.WELCOME: MAC_SIZE + SESSION_ID_SIZE + MAX_SETTINGS,
    Type.BUSY: 0,
    Type.ATTEST: MAC_SIZE,
    Type.PAKE: PAKE_SIZE + MAC_SIZE,
    # control frames are sealed: their payload is followed by a tag
    Type.PING: _PING.size + TAG_SIZE,
    Type.PONG: _PING.size + TAG_SIZE,
    Type.DEMAND: _DEMAND.size + TAG_SIZE,
    Type.GOODBYE: 1 + TAG_SIZE,
    Type.LAUNCH: 2 + 2 * MAX_ADDRESS + 1 + TAG_SIZE,
    Type.DATAGRAM: 0xFFFF,
}

# Frames of a data connection launched for UDP: one datagram each, boundaries kept.
DATAGRAM_TYPES = frozenset({Type.DATAGRAM})
SIGNAL_TYPES = frozenset(Type) - DATAGRAM_TYPES


class Frame(NamedTuple):
    """One decoded frame (a NamedTuple: cheaper than a dataclass on the data path)."""

    type: Type
    payload: bytes


def frame(kind: Type, payload: bytes = b"") -> bytes:
    """Encode one frame; refuses a payload over its type's limit."""
    if len(payload) > MAX_PAYLOAD[kind]:
        raise ValueError(f"{kind.name} payload of {len(payload)} bytes exceeds its limit")
    return _HEADER.pack(kind, len(payload)) + payload


_TYPES = {t.value: t for t in Type}


class FrameDecoder:
    """Incremental decoder: feed bytes, pull frames one at a time.

    Pull, not push, because a LAUNCH frame turns the rest of the stream into raw
    relay bytes: the reader stops pulling and takes :meth:`rest`.
    """

    def __init__(self, expect_preamble: bool = False,
                 allowed: frozenset[Type] = SIGNAL_TYPES) -> None:
        self._buffer = bytearray()
        self._need_preamble = expect_preamble
        self._allowed = allowed

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._need_preamble and not PREAMBLE.startswith(bytes(self._buffer[:3])[:3]):
            raise ProtocolError("not a nodepass tunnel connection (bad preamble)")
        if self._need_preamble and len(self._buffer) >= len(PREAMBLE):
            head = bytes(self._buffer[: len(PREAMBLE)])
            if head[:3] != MAGIC:
                raise ProtocolError("not a nodepass tunnel connection (bad preamble)")
            if head[3] != VERSION:
                raise ProtocolError(f"unsupported protocol version {head[3]} (this is {VERSION})")
            del self._buffer[: len(PREAMBLE)]
            self._need_preamble = False

    def next_frame(self) -> Frame | None:
        if self._need_preamble or len(self._buffer) < _HEADER.size:
            return None
        code, length = _HEADER.unpack_from(self._buffer)
        kind = _TYPES.get(code)
        if kind is None:
            raise ProtocolError(f"unknown frame type {code}")
        if kind not in self._allowed:
            raise ProtocolError(f"{kind.name} frame is not allowed here")
        if length > MAX_PAYLOAD[kind]:
            raise ProtocolError(
                f"{kind.name} frame of {length} bytes exceeds its limit of {MAX_PAYLOAD[kind]}"
            )
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        return Frame(kind, payload)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def rest(self) -> bytes:
        """The bytes after the last frame pulled (raw relay data after LAUNCH)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


# ---------------------------------------------------------------------------
# Messages


def exact(payload: bytes, size: int, name: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{name} payload must be {size} bytes, got {len(payload)}")


def hello_payload(kind: Kind, nonce: bytes, session_id: bytes = b"") -> bytes:
    """A HELLO's payload: the kind, the client's nonce, and for a data connection the
    session it belongs to."""
    return bytes([kind]) + nonce + session_id


def parse_hello(payload: bytes) -> tuple[Kind, bytes, bytes]:
    """-> (kind, client nonce, session id — empty for a control connection)."""
    if not payload:
        raise ProtocolError("HELLO payload is empty")
    try:
        kind = Kind(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown connection kind {payload[0]}") from None
    size = 1 + NONCE_SIZE + (SESSION_ID_SIZE if kind is Kind.DATA else 0)
    exact(payload, size, "HELLO")
    return kind, payload[1 : 1 + NONCE_SIZE], payload[1 + NONCE_SIZE :]


def challenge_payload(tls_mode: int, nonce: bytes) -> bytes:
    return bytes([tls_mode]) + nonce


def parse_challenge(payload: bytes) -> tuple[int, bytes]:
    exact(payload, 1 + NONCE_SIZE, "CHALLENGE")
    if payload[0] not in (0, 1, 2):
        raise ProtocolError(f"unknown TLS mode {payload[0]}")
    return payload[0], payload[1:]


def auth(mac: bytes) -> bytes:
    return frame(Type.AUTH, mac)


def welcome(mac: bytes, session_id: bytes = b"", settings: bytes = b"") -> bytes:
    return frame(Type.WELCOME, mac + session_id + settings)


def parse_welcome(payload: bytes, kind: Kind) -> tuple[bytes, bytes, bytes]:
    """-> (mac, session_id, settings)."""
    if kind is Kind.DATA:
        exact(payload, MAC_SIZE, "WELCOME")
        return payload, b"", b""
    if len(payload) < MAC_SIZE + SESSION_ID_SIZE:
        raise ProtocolError(f"WELCOME payload too short ({len(payload)} bytes)")
    end = MAC_SIZE + SESSION_ID_SIZE
    return payload[:MAC_SIZE], payload[MAC_SIZE:end], payload[end:]


# Control frames: these are their payloads; the control channel seals them
# (handshake.Sealer) before they are framed.


def ping_payload(seq: int, micros: int) -> bytes:
    return _PING.pack(seq & 0xFFFFFFFF, micros & 0xFFFFFFFFFFFFFFFF)


def parse_ping(payload: bytes) -> tuple[int, int]:
    exact(payload, _PING.size, "PING/PONG")
    return _PING.unpack(payload)


def demand_payload(count: int) -> bytes:
    return _DEMAND.pack(min(count, 0xFFFF))


def parse_demand(payload: bytes) -> int:
    exact(payload, _DEMAND.size, "DEMAND")
    return _DEMAND.unpack(payload)[0]


def goodbye_payload(reason: Goodbye) -> bytes:
    return bytes([reason])


_DATAGRAM_HEADER = bytes([Type.DATAGRAM])


def datagram(payload: bytes) -> bytes:
    """A DATAGRAM frame; the caller has checked the size (it is on the data path)."""
    return _DATAGRAM_HEADER + len(payload).to_bytes(2, "big") + payload


class Launch(NamedTuple):
    """What a LAUNCH frame says: the protocol, the user's address, the address the
    user reached, and the PROXY protocol version the launching end asks for (0: none)."""

    proto: Proto
    source: str
    dest: str = ""
    proxy: int = 0


def launch_fields(proto: Proto, source: str, dest: str = "", proxy: int = 0) -> bytes:
    """A LAUNCH's fields; the data connection tags them (handshake.Launches)."""
    addresses = source.encode()[:MAX_ADDRESS] + b" " + dest.encode()[:MAX_ADDRESS]
    return bytes([proto, proxy]) + addresses


def parse_launch(payload: bytes) -> Launch:
    if len(payload) < 2:
        raise ProtocolError("LAUNCH payload is shorter than 2 bytes")
    try:
        proto = Proto(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown launch protocol {payload[0]}") from None
    if payload[1] > 2:
        raise ProtocolError(f"unknown PROXY protocol version {payload[1]} in LAUNCH")
    source, _, dest = payload[2:].decode("utf-8", "replace").partition(" ")
    return Launch(proto, source, dest, payload[1])
