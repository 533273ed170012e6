"""The master's REST API in the seed's dialect (../shared/seed/api.md).

Every response is the envelope ``{success, data, error}``; every error has a
stable code.  Routes live under ``{prefix}/v1``; CORS preflight is answered
before authentication; ``openapi.json`` and ``docs`` need no key.  The NodePass
dialect (npapi.py) serves the same registry beside it.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from nodepass import __version__, logs
from nodepass.master import metadata
from nodepass.master.events import encode
from nodepass.master.instances import Instance, InstanceError, Registry, iso
from nodepass.master.metrics import exposition
from nodepass.master.openapi import document
from nodepass.master.web import (
    BodyError,
    KeyCheck,
    SwaggerUI,
    preflight,
    read_json,
    set_cors,
)

ACTIONS = ("start", "stop", "restart", "reset")
FIELDS = ("url", "action", "alias", "tags", "restart", "peer")
DIALECT = "seed"
# Asked once: platform.platform() may run `uname` in a subprocess.
PLATFORM = platform.platform()


class ApiError(Exception):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


class MasterAPI:
    log = logs.logger("nodepass.master")

    def __init__(self, app: Klein, registry: Registry, prefix: str, keys: KeyCheck,
                 state_dir: str | None = None, np_base: str | None = None) -> None:
        self.app = app
        self.registry = registry
        self.prefix = prefix
        self.base = f"{prefix}/v1"
        self.keys = keys
        self.state_dir = state_dir
        self.np_base = np_base
        self.openapi = json.dumps(document(prefix), indent=1).encode()
        self._routes()
        registry.hub.add_dialect(DIALECT, self.render_event)

    # -- plumbing ----------------------------------------------------------

    def _routes(self) -> None:
        base, route = self.base, self.app.route
        table: list[tuple[str, str, Callable[..., Any]]] = [
            ("instances", "GET", self._guard(self.list_instances)),
            ("instances", "POST", self._guard(self.create_instance)),
            ("instances/<string:instance_id>", "GET", self._guard(self.get_instance)),
            ("instances/<string:instance_id>", "PUT", self._guard(self.control_instance)),
            ("instances/<string:instance_id>", "DELETE", self._guard(self.delete_instance)),
            ("instances/<string:instance_id>/traffic", "GET",
             self._guard(self.instance_traffic)),
            ("info", "GET", self._guard(self.info)),
            ("metrics", "GET", self._raw_guard(self.metrics)),
            ("events", "GET", self._raw_guard(self.events)),
        ]
        for path, method, handler in table:
            route(f"{base}/{path}", methods=[method], strict_slashes=False,
                  endpoint=f"seed {method} {path}")(handler)
        route(f"{base}/openapi.json", methods=["GET"], endpoint="seed openapi")(
            self.openapi_json)
        SwaggerUI(self.app, base, "nodepass master API")
        for path in ("instances", "instances/<string:instance_id>",
                     "instances/<string:instance_id>/traffic", "info", "metrics", "events",
                     "openapi.json", "docs"):
            route(f"{base}/{path}", methods=["OPTIONS"], strict_slashes=False,
                  endpoint=f"seed preflight {path}")(preflight)

    def _guard(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """Authenticate, run the handler, and wrap what it returns in the envelope."""

        async def guarded(request: IRequest, **kwargs: Any) -> bytes:
            try:
                self._authenticate(request)
                status, data = await handler(request, **kwargs)
            except (ApiError, InstanceError, BodyError) as e:
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
        set_cors(request)
        body = {"success": error is None, "data": data, "error": error}
        return json.dumps(body, separators=(",", ":")).encode()

    def _authenticate(self, request: IRequest) -> None:
        if self.keys.refusal(request) is not None:
            raise ApiError("UNAUTHORIZED", 401,
                           "missing or wrong API key (send it as X-API-Key or "
                           "Authorization: Bearer)")

    def _json_object(self, request: IRequest) -> dict[str, Any]:
        body = read_json(request)
        if not isinstance(body, dict):
            raise ApiError("INVALID_JSON", 400, "the body must be a JSON object")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise ApiError("INVALID_REQUEST", 400,
                           f"unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
        return body

    @staticmethod
    def _metadata(body: dict[str, Any]) -> dict[str, Any]:
        """alias, tags, restart and peer as given (None: not given), checked."""
        for name in ("action", "alias", "tags", "restart", "peer"):
            if name in body and body[name] is None:
                raise ApiError("INVALID_REQUEST", 400, f"{name!r} cannot be null")
        checks: Mapping[str, Callable[[Any], Any]] = {
            "alias": metadata.alias, "tags": metadata.tags, "restart": metadata.restart,
            "peer": metadata.peer}
        try:
            return {name: check(body[name]) if name in body else None
                    for name, check in checks.items()}
        except metadata.MetadataError as e:
            raise ApiError("INVALID_REQUEST", 400, str(e)) from None

    def not_found(self, request: IRequest) -> bytes:
        return self._reply(request, 404, None, {
            "code": "NOT_FOUND",
            "message": f"no route {request.path.decode('utf-8', 'replace')} "
                       f"(the API lives under {self.base})"})

    def not_allowed(self, request: IRequest, allowed: list[str]) -> bytes:
        return self._reply(request, 405, None, {
            "code": "METHOD_NOT_ALLOWED",
            "message": f"{request.method.decode()} is not allowed here "
                       f"(allowed: {', '.join(allowed)})"})

    def render_event(self, event_id: int, kind: str, instance: Instance | None,
                     fields: Mapping[str, Any]) -> bytes:
        """An event as this dialect's stream tells it (docs/api.md, events)."""
        data: Any
        if kind in ("create", "update"):
            data = self.registry.describe(instance)
        elif kind == "delete":
            data = {"id": instance.id}
        elif kind == "log":
            data = {"id": instance.id, "level": fields["level"], "message": fields["message"]}
        else:
            data = {}
        return encode(event_id, kind, data)

    # -- routes ------------------------------------------------------------

    def openapi_json(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self.openapi

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
        given = self._metadata(body)
        instance = await self.registry.create(body["url"], given["alias"], given["tags"],
                                              bool(given["restart"]), given["peer"])
        return 201, self.registry.describe(instance)

    async def get_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        return 200, self.registry.describe(self.registry.get(instance_id))

    async def control_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        body = self._json_object(request)
        url = body.get("url")
        if "url" in body and not isinstance(url, str):
            raise ApiError("INVALID_REQUEST", 400, "'url' must be a string")
        given = self._metadata(body)
        action = body.get("action")
        if action is None and url is None and all(v is None for v in given.values()):
            raise ApiError("INVALID_REQUEST", 400,
                           "the body needs 'action' (start, stop, restart, reset), 'url', or "
                           "'alias', 'tags', 'restart', 'peer'")
        if action is not None and action not in ACTIONS:
            raise ApiError("INVALID_ACTION", 400,
                           f"unknown action {action!r} (allowed: {', '.join(ACTIONS)})")
        if url is not None and action is not None:
            raise ApiError("INVALID_REQUEST", 400, "give 'url' or 'action', not both (a new "
                                                   "URL restarts the instance)")
        if url is not None:
            self.registry.vet_url(instance, url)  # a bad URL changes nothing at all
        if any(v is not None for v in given.values()):
            self.registry.update(instance, **given)
        if url is not None:
            await self.registry.replace_url(instance, url)
            return 200, self.registry.describe(instance)
        if action is None:
            return 200, self.registry.describe(instance)
        if action == "reset":
            self.registry.reset(instance)
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
            "platform": PLATFORM,
            "python": platform.python_version(),
            "state_dir": self.state_dir if registry.master.persist or registry.master.auth
            else None,
            "persist": bool(registry.master.persist),
            "instances": registry.count_by_status(),
            "alias": registry.alias,
            "master_id": registry.master_id,
            "bases": {"seed": self.base, "nodepass": self.np_base},
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

    def _error(self, request: IRequest, e: ApiError | InstanceError | BodyError) -> bytes:
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
        registry = self.registry

        def snapshot(last_id: int) -> list[bytes]:
            instances = [registry.describe(i) for i in registry.instances.values()]
            return [encode(last_id, "initial", {"instances": instances})]

        subscriber = registry.hub.subscribe(request, DIALECT, last_event_id(request), snapshot)
        return subscriber.finished

    async def delete_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        await self.registry.delete(instance)
        return 200, {"id": instance.id, "deleted": True}


def last_event_id(request: IRequest) -> int | None:
    """The ``Last-Event-ID`` a reconnecting browser sends, if it is one of ours."""
    raw = request.getHeader(b"last-event-id")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
