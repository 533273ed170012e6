"""Who may send what to the master's API, decided once a request's headers are complete,
before a byte of its body is read (the channel in site.py asks).

In order: the ``Host`` and the ``Origin`` (browsers.py), the key
(:class:`~nodepass.master.web.KeyCheck`), and the body's declared size.  A refusal is
answered in the dialect the path belongs to; an admitted request leaves here with the
CORS headers its answer will carry.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.web.iweb import IRequest

from nodepass.master.browsers import HostCheck, OriginPolicy
from nodepass.master.web import MAX_BODY, KeyCheck, Refusal
from nodepass.url import MasterConfig


class Dialect(Protocol):
    """What the gate needs of an API dialect (api.MasterAPI, npapi.NodePassAPI)."""

    base: str
    docs: Any

    def refuse(self, request: IRequest, refusal: Refusal) -> bytes: ...


def unauthorized(kind: str) -> Refusal:
    """A missing (``kind == "missing"``) or wrong key, in each dialect's words."""
    return Refusal(401, "UNAUTHORIZED",
                   "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
                   "Unauthorized: API key required" if kind == "missing"
                   else "Unauthorized: Invalid API key")


def too_large(size: int | None, limit: int = MAX_BODY) -> Refusal:
    said = f"the body ({size} bytes)" if size is not None else "the body"
    message = f"{said} exceeds {limit} bytes"
    return Refusal(413, "PAYLOAD_TOO_LARGE", message, f"Invalid request body: {message}")


class Gate:
    """The checks, in order, for a request whose headers are complete."""

    def __init__(self, config: MasterConfig, keys: KeyCheck, seed: Dialect,
                 nodepass: Dialect, max_body: int = MAX_BODY,
                 public: tuple[str, ...] = ()) -> None:
        self.hosts = HostCheck(config)
        self.origins = OriginPolicy(config)
        self.keys = keys
        self.max_body = max_body
        self.seed = seed
        self.dialects = (seed, nodepass)
        # Exact paths, so that no spelling of a keyed route can pass for documentation
        # (or for the dashboard's files, ``public``).
        self.public = frozenset([*(path.encode() for d in self.dialects
                                   for path in d.docs.public_paths(d.base)),
                                 *(path.encode() for path in public)])

    def dialect_for(self, path: bytes) -> Dialect:
        """The dialect whose base ``path`` lies under (the longer base first, as one may
        lie under the other); the seed's for any other path, as web.mount routes it."""
        for dialect in sorted(self.dialects, key=lambda d: -len(d.base)):
            base = dialect.base.encode()
            if path == base or path.startswith(base + b"/"):
                return dialect
        return self.seed

    def admit(self, request: IRequest, length: int | None) -> Refusal | None:
        """None to go on (the CORS headers set on ``request``), else the refusal.
        ``length`` is the declared body size (None: chunked)."""
        refusal = self.hosts.refusal(request.requestHeaders.getRawHeaders(b"host"))
        if refusal is not None:
            return refusal
        refusal, headers = self.origins.verdict(request)
        for name, value in headers.items():
            request.setHeader(name, value)
        if refusal is not None:
            return refusal
        # A preflight never carries the key; the documentation is public.
        if request.method != b"OPTIONS" and request.path not in self.public:
            kind = self.keys.refusal(request)
            if kind is not None:
                return unauthorized(kind)
        if length is not None and length > self.max_body:
            return too_large(length, self.max_body)
        return None

    def oversized(self) -> Refusal:
        """A body that went past the limit as it arrived (chunked)."""
        return too_large(None, self.max_body)
