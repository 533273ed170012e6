"""PROXY protocol headers (HAProxy's spec, versions 1 and 2) that tell a target
who the original client was.

Only the sending side lives here; the tests parse what it writes with Twisted's
own PROXY protocol parser (``twisted.protocols.haproxy``).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from nodepass.url import URLError, parse_address

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY_COMMAND = 0x21  # version 2, PROXY
_TCP, _UDP = 0x1, 0x2
_INET, _INET6 = 0x10, 0x20

Endpoint = tuple[str, int]  # (IP address, port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _same_family(source: Endpoint, dest: Endpoint) -> tuple[Any, Any] | None:
    """Both addresses as one IP family (IPv4 mapped into IPv6 when they differ), or None."""
    a, b = _ip(source[0]), _ip(dest[0])
    if a is None or b is None:
        return None
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (a, b))
    return a, b


def v1(source: Endpoint, dest: Endpoint) -> bytes:
    """``PROXY TCP4 src dst sport dport\\r\\n``; ``PROXY UNKNOWN`` when an address is no IP."""
    pair = _same_family(source, dest)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    a, b = pair
    family = "TCP4" if a.version == 4 else "TCP6"
    return f"PROXY {family} {a} {b} {source[1]} {dest[1]}\r\n".encode()


def v2(source: Endpoint, dest: Endpoint, udp: bool = False) -> bytes:
    """The binary header: signature, PROXY command, family, addresses and ports."""
    pair = _same_family(source, dest)
    if pair is None:  # LOCAL-like: family UNSPEC, no addresses
        return V2_SIGNATURE + bytes([_V2_PROXY_COMMAND, 0]) + struct.pack("!H", 0)
    a, b = pair
    family = (_INET if a.version == 4 else _INET6) | (_UDP if udp else _TCP)
    body = a.packed + b.packed + struct.pack("!HH", source[1], dest[1])
    return V2_SIGNATURE + bytes([_V2_PROXY_COMMAND, family]) + struct.pack("!H", len(body)) + body


def header(version: int, source: Endpoint, dest: Endpoint) -> bytes:
    """The header for ``version`` (1 or 2) of a TCP connection; b"" for 0."""
    if version == 1:
        return v1(source, dest)
    if version == 2:
        return v2(source, dest)
    return b""


def split_address(text: str) -> Endpoint:
    """``host:port`` or ``[v6]:port`` (as LAUNCH carries them) -> (host, port); ("", 0) if bad."""
    try:
        address = parse_address(text, "address")
    except URLError:
        return ("", 0)
    return (address.host, address.port)
