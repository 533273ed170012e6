"""What a web browser may do with the master's API: the names it may call the master by
(``Host``: DNS rebinding) and the pages that may call it from another origin
(``Origin`` and CORS).

Browsers are the threat both checks meet: anything else can send whatever Host and
Origin it likes, and only the key stops it.  So both are on by default when the API
has no key (``auth=0``), and opt-in with a key (``hosts=``, ``origins=``).  The gate
(gate.py) asks them first, once a request's headers are complete.
"""

from __future__ import annotations

import re

from twisted.web.iweb import IRequest

from nodepass.endpoints import is_ip
from nodepass.master.web import Refusal
from nodepass.url import MasterConfig, URLError, is_loopback, parse_host, parse_origin

# Every method and header a browser panel of either dialect sends (NodePanel's event
# stream asks with Cache-Control).
CORS_ALLOW = {
    b"Access-Control-Allow-Methods": b"GET, POST, PUT, PATCH, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, X-API-Key, Authorization, Cache-Control",
    b"Access-Control-Max-Age": b"600",
}
_HOST_HEADER = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]+)?")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::"})


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def host_of(value: bytes) -> str | None:
    """The host named by a ``Host`` header (lowercase, unbracketed, port dropped), or
    None when it names none."""
    match = _HOST_HEADER.fullmatch(value.decode("latin-1"))
    if match is None:
        return None
    try:
        return parse_host(match.group(1), "Host")
    except URLError:
        return None


class HostCheck:
    """The names this master answers to: its listen address; ``localhost`` and the
    loopback addresses when it listens on loopback; on a wildcard address (``0.0.0.0``,
    ``[::]``) ``localhost`` and any IP address (DNS rebinding needs a name the attacker
    controls, and an address cannot be rebound); and the names in ``hosts=``.  Ports are
    not compared: a proxy or a NAT may change them, and rebinding does not need them."""

    def __init__(self, config: MasterConfig) -> None:
        self.active = not config.auth or bool(config.hosts)
        listen = config.api.host
        self.any_ip = listen in WILDCARDS
        names = {*config.hosts}
        if self.any_ip:
            names.add("localhost")
        else:
            names.add(listen)
        if is_loopback(listen):
            names |= LOOPBACK_NAMES
        self.names = frozenset(names)

    def allowed(self) -> str:
        shown = ", ".join(sorted(_shown(n) for n in self.names))
        return f"{shown}, or any IP address" if self.any_ip else shown

    def refusal(self, values: list[bytes] | None) -> Refusal | None:
        """None when the ``Host`` header values are fine; a request without one (never
        a browser's) is not checked."""
        if not self.active or not values:
            return None
        if len(values) > 1:
            return self._refused("more than one Host header")
        host = host_of(values[0])
        if host is not None and (host in self.names or (self.any_ip and is_ip(host))):
            return None
        shown = values[0].decode("ascii", "replace")[:100]
        return self._refused(f"Host {shown!r} is not a name this master answers to")

    def _refused(self, what: str) -> Refusal:
        # 421 Misdirected Request: the request reached a server that does not serve that
        # authority (RFC 9110 15.5.20) -- it is about the name, not about who asks, and a
        # client behind a proxy learns to fix the name rather than its credentials.
        message = f"{what} (allowed: {self.allowed()}; add names with hosts= in the master URL)"
        return Refusal(421, "MISDIRECTED_REQUEST", message, f"Misdirected request: {message}")


class OriginPolicy:
    """Which web pages may call the API from another origin (CORS).

    With a key and no ``origins=``, any page may (``Access-Control-Allow-Origin: *``):
    a panel must still send the key.  Otherwise only the listed origins get CORS
    headers, and a request carrying any other ``Origin`` is refused before it does
    anything: a page's "simple" request (a form post, ``fetch`` with ``no-cors``) is
    sent without a preflight, so withholding the headers alone would not stop it.
    Requests without ``Origin``, or from the master's own origin, pass.
    """

    def __init__(self, config: MasterConfig) -> None:
        self.any = bool(config.auth) and not config.origins
        self.listed = frozenset(config.origins)

    def verdict(self, request: IRequest) -> tuple[Refusal | None, dict[bytes, bytes]]:
        """(a refusal or None, the CORS headers for the answer)."""
        if self.any:
            return None, {b"Access-Control-Allow-Origin": b"*", **CORS_ALLOW}
        headers = {b"Vary": b"Origin"}  # the answer depends on it: caches must know
        raw = request.getHeader(b"origin")
        if raw is None:
            return None, headers
        origin = _origin(raw)
        if origin is not None and origin in self.listed:
            return None, {**headers, b"Access-Control-Allow-Origin": origin.encode(),
                          **CORS_ALLOW}
        if origin is not None and origin == own_origin(request):
            return None, headers
        shown = raw.decode("ascii", "replace")[:100]
        listed = ", ".join(sorted(self.listed)) or "none"
        message = (f"requests from the web page at {shown!r} are not allowed (allowed "
                   f"origins: {listed}; add it with origins= in the master URL)")
        return Refusal(403, "ORIGIN_NOT_ALLOWED", message, f"Forbidden: {message}"), headers


def _origin(raw: bytes) -> str | None:
    try:
        return parse_origin(raw.decode("ascii"))
    except (UnicodeDecodeError, URLError):
        return None  # "null" (a sandboxed or file: page), or garbage


def own_origin(request: IRequest) -> str | None:
    """The origin this request was sent to, from its Host and the connection's TLS."""
    host = request.getHeader(b"host")
    if host is None:
        return None
    return _origin(b"https://" + host if request.isSecure() else b"http://" + host)
