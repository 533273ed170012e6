"""The master's REST API (../shared/seed/api.md): a Klein app holding the registry.

Every response is the envelope ``{success, data, error}``; every error has a
stable code.  Routes live under ``{prefix}/v1``; CORS preflight is answered
before authentication; ``openapi.json`` and ``docs`` need no key.
"""

from __future__ import annotations

import hmac
import json
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.static import File
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nodepass import __version__, logs
from nodepass.master.instances import InstanceError, Registry, iso
from nodepass.master.metrics import exposition
from nodepass.master.openapi import document

MAX_BODY = 64 * 1024
ACTIONS = ("start", "stop", "restart")
CORS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, X-API-Key, Authorization",
    b"Access-Control-Max-Age": b"600",
}

_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nodepass master API</title>
<link rel="stylesheet" href="docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: true});
</script></body></html>
"""


class ApiError(Exception):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def _swagger_assets() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


class MasterAPI:
    log = logs.logger("nodepass.master")

    def __init__(self, registry: Registry, prefix: str, api_key: str | None,
                 state_dir: str | None = None) -> None:
        self.registry = registry
        self.prefix = prefix
        self.api_key = api_key
        self.state_dir = state_dir
        self.openapi = json.dumps(document(prefix), indent=1).encode()
        self._refusals = logs.Throttle(registry.reactor)
        self.app = Klein()
        self._routes()

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------

    def _routes(self) -> None:
        app, base = self.app, f"{self.prefix}/v1"
        route = app.route
        route(f"{base}/instances", methods=["GET"], strict_slashes=False)(
            self._guard(self.list_instances))
        route(f"{base}/instances", methods=["POST"], strict_slashes=False)(
            self._guard(self.create_instance))
        for method, handler in (("GET", self.get_instance), ("PUT", self.control_instance),
                                ("DELETE", self.delete_instance)):
            route(f"{base}/instances/<string:instance_id>", methods=[method],
                  strict_slashes=False)(self._guard(handler))
        route(f"{base}/instances/<string:instance_id>/traffic", methods=["GET"],
              strict_slashes=False)(self._guard(self.instance_traffic))
        route(f"{base}/info", methods=["GET"], strict_slashes=False)(self._guard(self.info))
        route(f"{base}/metrics", methods=["GET"], strict_slashes=False)(
            self._raw_guard(self.metrics))
        route(f"{base}/events", methods=["GET"], strict_slashes=False)(
            self._raw_guard(self.events))
        route(f"{base}/openapi.json", methods=["GET"])(self.openapi_json)
        route(f"{base}/docs", methods=["GET"])(self.docs_page)
        route(f"{base}/docs/", methods=["GET"], branch=True)(self.docs_assets)
        for path in ("instances", "instances/<string:instance_id>",
                     "instances/<string:instance_id>/traffic", "info", "metrics", "events",
                     "openapi.json", "docs"):
            route(f"{base}/{path}", methods=["OPTIONS"], strict_slashes=False,
                  endpoint=f"preflight {path}")(self.preflight)
        app.handle_errors(NotFound)(self._not_found)
        app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def _guard(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """Authenticate, run the handler, and wrap what it returns in the envelope."""

        async def guarded(request: IRequest, **kwargs: Any) -> bytes:
            try:
                self._authenticate(request)
                status, data = await handler(request, **kwargs)
            except (ApiError, InstanceError) as e:
                return self._error(request, e)
            except Exception:
                self.log.failure("internal error serving {path}", Failure(),
                                 path=request.path.decode("utf-8", "replace"))
                return self._reply(request, 500, None, {"code": "INTERNAL",
                                                        "message": "internal error; see the "
                                                                   "master's log"})
            return self._reply(request, status, data, None)

        guarded.__name__ = handler.__name__
        return guarded

    def _reply(self, request: IRequest, status: int, data: Any, error: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in CORS.items():
            request.setHeader(name, value)
        body = {"success": error is None, "data": data, "error": error}
        return json.dumps(body, separators=(",", ":")).encode()

    def _authenticate(self, request: IRequest) -> None:
        if self.api_key is None:
            return
        offered = request.getHeader(b"x-api-key")
        if offered is None:
            bearer = request.getHeader(b"authorization") or b""
            scheme, _, token = bearer.partition(b" ")
            offered = token.strip() if scheme.lower() == b"bearer" else None
        if offered is None or not hmac.compare_digest(offered, self.api_key.encode()):
            self._refusals.warn(self.log, "refused an API request without a valid key from "
                                "{peer}", peer=getattr(request.getClientAddress(), "host", "?"))
            raise ApiError("UNAUTHORIZED", 401,
                           "missing or wrong API key (send it as X-API-Key or "
                           "Authorization: Bearer)")

    def _json_object(self, request: IRequest) -> dict[str, Any]:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise ApiError("UNSUPPORTED_MEDIA_TYPE", 415,
                           "the body must be JSON (Content-Type: application/json)")
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError("PAYLOAD_TOO_LARGE", 413, f"the body exceeds {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError("INVALID_JSON", 400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError("INVALID_JSON", 400, "the body must be a JSON object")
        unknown = sorted(set(body) - {"url", "action", "alias", "tags", "restart"})
        if unknown:
            raise ApiError("INVALID_REQUEST", 400,
                           f"unknown field {unknown[0]!r} (allowed: url, action, alias, tags, "
                           "restart)")
        return body

    @staticmethod
    def _metadata(body: dict[str, Any]) -> dict[str, Any]:
        """alias (string, up to 64), tags (object of strings), restart (boolean)."""
        alias, tags, restart = body.get("alias"), body.get("tags"), body.get("restart")
        for name in ("action", "alias", "tags", "restart"):
            if name in body and body[name] is None:
                raise ApiError("INVALID_REQUEST", 400, f"{name!r} cannot be null")
        if alias is not None and (not isinstance(alias, str) or len(alias) > 64):
            raise ApiError("INVALID_REQUEST", 400, "'alias' must be a string of at most 64 "
                                                   "characters")
        if tags is not None and not (
                isinstance(tags, dict) and len(tags) <= 64
                and all(isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64
                        and len(v) <= 256 and ":" not in k for k, v in tags.items())):
            raise ApiError("INVALID_REQUEST", 400,
                           "'tags' must be an object of at most 64 string values, keys of 1-64 "
                           "characters without ':'")
        if restart is not None and not isinstance(restart, bool):
            raise ApiError("INVALID_REQUEST", 400, "'restart' must be true or false")
        return {"alias": alias, "tags": tags, "restart": restart}

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._reply(request, 404, None, {
            "code": "NOT_FOUND",
            "message": f"no route {request.path.decode('utf-8', 'replace')} "
                       f"(the API lives under {self.prefix}/v1)"})

    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        return self._reply(request, 405, None, {
            "code": "METHOD_NOT_ALLOWED",
            "message": f"{request.method.decode()} is not allowed here "
                       f"(allowed: {', '.join(allowed)})"})

    # -- routes ------------------------------------------------------------

    def preflight(self, request: IRequest, **kwargs: Any) -> bytes:
        request.setResponseCode(204)
        for name, value in CORS.items():
            request.setHeader(name, value)
        return b""

    def openapi_json(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self.openapi

    def docs_page(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        return _DOCS_PAGE.encode()

    def docs_assets(self, request: IRequest) -> File:
        return File(_swagger_assets())

    async def list_instances(self, request: IRequest) -> tuple[int, Any]:
        wanted = []
        for raw in request.args.get(b"tag", []):
            key, sep, value = raw.decode("utf-8", "replace").partition(":")
            if not sep or not key:
                raise ApiError("INVALID_REQUEST", 400, "tag filters look like ?tag=key:value")
            wanted.append((key, value))
        instances = [self.registry.describe(i) for i in self.registry.instances.values()
                     if all(i.tags.get(k) == v for k, v in wanted)]
        return 200, {"instances": instances}

    async def create_instance(self, request: IRequest) -> tuple[int, Any]:
        body = self._json_object(request)
        if not isinstance(body.get("url"), str):
            raise ApiError("INVALID_REQUEST", 400, "the body needs 'url' as a string")
        if "action" in body:
            raise ApiError("INVALID_REQUEST", 400, "'action' is for PUT on an instance")
        metadata = self._metadata(body)
        instance = await self.registry.create(body["url"], metadata["alias"],
                                              metadata["tags"], bool(metadata["restart"]))
        return 201, self.registry.describe(instance)

    async def get_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        return 200, self.registry.describe(self.registry.get(instance_id))

    async def control_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        body = self._json_object(request)
        if "url" in body:
            raise ApiError("INVALID_REQUEST", 400, "an instance's 'url' cannot change; create "
                                                   "another instance")
        metadata = self._metadata(body)
        action = body.get("action")
        if action is None and all(v is None for v in metadata.values()):
            raise ApiError("INVALID_REQUEST", 400, "the body needs 'action' (start, stop, "
                                                   "restart) or 'alias', 'tags', 'restart'")
        if action is not None and action not in ACTIONS:
            raise ApiError("INVALID_ACTION", 400,
                           f"unknown action {action!r} (allowed: start, stop, restart)")
        if any(v is not None for v in metadata.values()):
            self.registry.update(instance, **metadata)
        if action is None:
            return 200, self.registry.describe(instance)
        await getattr(self.registry, action)(instance)
        data = self.registry.describe(instance)
        stamp = {"start": "started_at", "stop": "stopped_at", "restart": "restarted_at"}[action]
        data[stamp] = iso(getattr(instance, stamp))
        return 200, data

    async def instance_traffic(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        raw = request.args.get(b"window", [b"3600"])[0]
        try:
            window = float(raw)
        except ValueError:
            window = -1.0
        if not 0 < window <= 7 * 86400:
            raise ApiError("INVALID_REQUEST", 400,
                           "window must be seconds, more than 0 and at most 604800")
        return 200, {"id": instance.id, "interval": self.registry.tunables.report_interval,
                     "window": window, "samples": self.registry.traffic(instance, window)}

    async def info(self, request: IRequest) -> tuple[int, Any]:
        registry = self.registry
        return 200, {
            "version": __version__,
            "uptime": int(registry.reactor.seconds() - registry.started_at),
            "started_at": iso(registry.started_at),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "state_dir": self.state_dir if registry.master.persist or registry.master.auth
            else None,
            "persist": bool(registry.master.persist),
            "instances": registry.count_by_status(),
        }

    def _raw_guard(self, handler: Callable[[IRequest], Any]) -> Callable[[IRequest], Any]:
        """Authenticate a route that answers in its own format (not the envelope)."""

        def guarded(request: IRequest) -> Any:
            try:
                self._authenticate(request)
            except ApiError as e:
                return self._error(request, e)
            return handler(request)

        guarded.__name__ = handler.__name__
        return guarded

    def _error(self, request: IRequest, e: ApiError | InstanceError) -> bytes:
        return self._reply(request, e.status, None, {"code": e.code, "message": e.message})

    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return exposition(self.registry)

    def events(self, request: IRequest) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        raw = request.getHeader(b"last-event-id")
        try:
            last_id = int(raw) if raw is not None else None
        except ValueError:
            last_id = None
        registry = self.registry

        def snapshot() -> dict[str, Any]:
            return {"instances": [registry.describe(i) for i in registry.instances.values()]}

        subscriber = registry.hub.subscribe(request, last_id, snapshot)
        return subscriber.finished

    async def delete_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        await self.registry.delete(instance)
        return 200, {"id": instance.id, "deleted": True}


def docs_assets_present() -> bool:
    return (Path(_swagger_assets()) / "swagger-ui-bundle.js").exists()
