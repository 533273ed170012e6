"""What both API dialects share: the key check, JSON bodies, Swagger UI, and the one
Klein app that serves them side by side (``{prefix}/v1`` and ``{np}/v1``).  What may
reach them at all (Host, Origin and CORS, the key, body sizes) the gate decides first
(gate.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.static import File
from werkzeug.exceptions import NotFound

from nodepass import logs
from nodepass.master.state import ApiKey

MAX_BODY = 64 * 1024

# {here} is where the page's own files are, relative to the page: "docs/" for
# {base}/docs, "" for {base}/docs/ and {base}/docs/index.html.
_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="{here}swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{here}swagger-ui-bundle.js"></script>
<script src="{here}start.js"></script></body></html>
"""
# Outside the page, so a Content-Security-Policy without inline scripts holds.  The
# document is found from this script's own URL ({base}/docs/start.js), so every spelling
# of the page finds it; validatorUrl null: Swagger UI would otherwise send the
# document's URL to validator.swagger.io.
_DOCS_START = b"""window.ui = SwaggerUIBundle({
  url: new URL("../openapi.json", document.currentScript.src).href,
  dom_id: "#swagger-ui", deepLinking: true, persistAuthorization: true, validatorUrl: null});
"""
# The only files of the swagger-ui-py package served: the package also holds a stock
# page and initializer that load the petstore example from the internet.
DOCS_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js")


@dataclass(frozen=True)
class Refusal:
    """An answer given instead of the route's: the status, the seed dialect's error code
    and message, and the NodePass dialect's message (its clients match on that text)."""

    status: int
    code: str
    message: str
    np_message: str


class BodyError(Exception):
    """A request body the API refuses: HTTP status, the seed's error code, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def preflight(request: IRequest, **kwargs: Any) -> bytes:
    """A browser's CORS preflight, answered before authentication (the gate has set the
    CORS headers, or refused the origin)."""
    request.setResponseCode(204)
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
    except RecursionError:  # [[[[... : the parser recurses once per level
        raise BodyError(400, "INVALID_JSON", "the body is not valid JSON (nested too "
                                             "deeply)") from None


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
    """One dialect's documentation, public: ``openapi.json``, and Swagger UI at ``docs``
    (also spelt ``docs/`` and ``docs/index.html``: always our page), ``docs/start.js``
    and Swagger UI's own files from the swagger-ui-py package (DOCS_ASSETS): no CDN,
    works offline, nothing else of that package."""

    def __init__(self, title: str, openapi: bytes) -> None:
        self._pages = {here: _DOCS_PAGE.format(title=title, here=here).encode()
                       for here in ("docs/", "")}
        self._openapi = openapi

    @staticmethod
    def public_paths(base: str) -> list[str]:
        """Every path this serves under ``base`` (the gate lets them pass without a key)."""
        return [f"{base}/{path}" for path, _, _ in SwaggerUI._routes()]

    @staticmethod
    def _routes() -> list[tuple[str, str, str]]:
        """(path, handler name, where the page's files are) for every document."""
        return [("openapi.json", "openapi", ""), ("docs", "page", "docs/"),
                ("docs/", "page", ""), ("docs/index.html", "page", ""),
                ("docs/start.js", "start", ""),
                *((f"docs/{name}", "asset", name) for name in DOCS_ASSETS)]

    def route(self, app: Klein, base: str, dialect: Any) -> None:
        """GET each document under ``base``; OPTIONS is a preflight; any other method is
        ``dialect``'s 405.  Any other path under ``docs/`` is the dialect's 404."""
        for path, name, arg in self._routes():
            handler = getattr(self, name)
            app.route(f"{base}/{path}", methods=["GET"], endpoint=f"{base} {path}")(
                lambda request, handler=handler, arg=arg: handler(request, arg))
            app.route(f"{base}/{path}", methods=["OPTIONS"],
                      endpoint=f"{base} {path} preflight")(preflight)
            app.route(f"{base}/{path}",  # any other method, even QUERY
                      endpoint=f"{base} {path} refused")(
                lambda request, dialect=dialect: dialect.wrong_method(
                    request, _allow(request, ["GET", "OPTIONS"])))

    def openapi(self, request: IRequest, _: str) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self._openapi

    def page(self, request: IRequest, here: str) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._pages[here]

    def start(self, request: IRequest, _: str) -> bytes:
        request.setHeader(b"Content-Type", b"text/javascript; charset=utf-8")
        return _DOCS_START

    def asset(self, request: IRequest, name: str) -> File:
        return File(str(Path(swagger_assets()) / name))


def add_preflight(app: Klein) -> None:
    """A CORS preflight route (answered before authentication) for the path of every
    route ``app`` has, so the two cannot drift apart."""
    seen = set()
    for rule in list(app.url_map.iter_rules()):
        if rule.rule not in seen:
            seen.add(rule.rule)
            app.route(rule.rule, methods=["OPTIONS"], strict_slashes=False,
                      endpoint=f"preflight {rule.rule}")(
                lambda self, request, **kwargs: preflight(request))


def _allow(request: IRequest, allowed: list[str]) -> list[str]:
    request.setHeader(b"Allow", ", ".join(allowed).encode())
    return allowed


def allowed_methods(request: IRequest, failure: Failure) -> list[str]:
    """The methods a route takes, also put in the Allow header of a 405."""
    return _allow(request, list(getattr(failure.value, "valid_methods", None) or []))


def mount(seed: Any, nodepass: Any, dashboard: Any = None) -> Klein:
    """One Klein app serving each dialect's routes under its base (``{prefix}/v1``,
    ``{np}/v1``), and the dashboard at ``{prefix}/``; a path under neither gets the seed
    dialect's 404."""
    root = Klein()
    if dashboard is not None:
        dashboard.route(root, seed)
    for dialect in (seed, nodepass):
        dialect.docs.route(root, dialect.base, dialect)
        root.route(f"{dialect.base}/", branch=True, endpoint=dialect.base)(
            lambda request, dialect=dialect: dialect.app.resource())

    @root.handle_errors(NotFound)
    def elsewhere(request: IRequest, failure: Failure) -> bytes:
        return seed.not_found(request, failure)

    return root
