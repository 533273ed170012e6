"""What both API dialects share: the key check, CORS, JSON bodies, Swagger UI, and the
one Klein app that serves them side by side (``{prefix}/v1`` and ``{np}/v1``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.static import File
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nodepass import logs
from nodepass.master.state import ApiKey

MAX_BODY = 64 * 1024
# Every method and header a browser panel of either dialect sends (NodePanel's event
# stream asks with Cache-Control).
CORS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, POST, PUT, PATCH, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, X-API-Key, Authorization, Cache-Control",
    b"Access-Control-Max-Age": b"600",
}

_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/start.js"></script></body></html>
"""
# Outside the page, so a Content-Security-Policy without inline scripts holds.
_DOCS_START = b"""window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: true});
"""


class BodyError(Exception):
    """A request body the API refuses: HTTP status, the seed's error code, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def set_cors(request: IRequest) -> None:
    for name, value in CORS.items():
        request.setHeader(name, value)


def preflight(request: IRequest, **kwargs: Any) -> bytes:
    """A browser's CORS preflight, answered before authentication."""
    request.setResponseCode(204)
    set_cors(request)
    return b""


def read_json(request: IRequest, require_type: bool = True) -> Any:
    """The request's JSON body (at most MAX_BODY bytes)."""
    if require_type:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise BodyError(415, "UNSUPPORTED_MEDIA_TYPE",
                            "the body must be JSON (Content-Type: application/json)")
    raw = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BodyError(413, "PAYLOAD_TOO_LARGE", f"the body exceeds {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise BodyError(400, "INVALID_JSON", f"the body is not valid JSON ({e})") from None


class KeyCheck:
    """Who may use the API: the holder of the key, as ``X-API-Key`` or a bearer token.
    Refusals are logged at most once per 10 s, with the peer's address."""

    log = logs.logger("nodepass.master")

    def __init__(self, key: ApiKey, clock: Any) -> None:
        self.key = key
        self._refusals = logs.Throttle(clock)

    def refusal(self, request: IRequest) -> str | None:
        """None when the request may pass; else ``"missing"`` or ``"wrong"``."""
        if not self.key.required:
            return None
        offered = request.getHeader(b"x-api-key")
        if offered is None:
            bearer = request.getHeader(b"authorization") or b""
            scheme, _, token = bearer.partition(b" ")
            offered = token.strip() if scheme.lower() == b"bearer" else None
        if self.key.matches(offered):
            return None
        self._refusals.warn(self.log, "refused an API request without a valid key from "
                                      "{peer}",
                            peer=getattr(request.getClientAddress(), "host", "?"))
        return "missing" if offered is None else "wrong"


def swagger_assets() -> str:
    import swagger_ui

    return str(Path(swagger_ui.__file__).parent / "static")


class SwaggerUI:
    """``docs`` (the page), ``docs/start.js`` and ``docs/*`` (Swagger UI's own files,
    from the swagger-ui-py package: no CDN, works offline) for one dialect's base."""

    def __init__(self, app: Klein, base: str, title: str) -> None:
        self.page = _DOCS_PAGE.format(title=title).encode()
        app.route(f"{base}/docs", methods=["GET"], endpoint=f"{base} docs")(self.docs_page)
        app.route(f"{base}/docs/start.js", methods=["GET"],
                  endpoint=f"{base} docs start")(self.docs_start)
        app.route(f"{base}/docs/", methods=["GET"], branch=True,
                  endpoint=f"{base} docs assets")(self.docs_assets)

    def docs_page(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self.page

    def docs_start(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/javascript; charset=utf-8")
        return _DOCS_START

    def docs_assets(self, request: IRequest) -> File:
        return File(swagger_assets())


class Dialects:
    """Routes both dialects' unknown paths and wrong methods to the dialect whose base
    the path is under (the longest base wins: ``/api/np`` is under ``/api``)."""

    def __init__(self, app: Klein) -> None:
        self._bases: list[tuple[str, Any]] = []
        self._first: Any = None
        app.handle_errors(NotFound)(self._not_found)
        app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def add(self, base: str, dialect: Any) -> None:
        self._first = self._first or dialect
        self._bases.append((base, dialect))
        self._bases.sort(key=lambda entry: -len(entry[0]))

    def _owner(self, request: IRequest) -> Any:
        path = request.path.decode("utf-8", "replace")
        for base, dialect in self._bases:
            if path == base or path.startswith(base + "/"):
                return dialect
        return self._first  # the seed's, whose message says where the API lives

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._owner(request).not_found(request)

    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        return self._owner(request).not_allowed(request, allowed)
