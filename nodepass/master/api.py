"""The master's REST API in the seed's dialect (../shared/seed/api.md).

Every response is the envelope ``{success, data, error}``; every error has a
stable code.  Routes live under ``{prefix}/v1``; CORS preflight is answered
before authentication; ``openapi.json`` and ``docs`` need no key.  The gate
(gate.py) has checked Host, Origin, key and body size before a route runs.  The NodePass
dialect (npapi.py) serves the same registry beside it.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nodepass import __version__, logs
from nodepass.master import metadata
from nodepass.master.events import encode
from nodepass.master.gate import unauthorized
from nodepass.master.instances import Instance, InstanceError, iso
from nodepass.master.metrics import exposition
from nodepass.master.openapi import document
from nodepass.master.registry import RECENT_LOGS, Registry
from nodepass.master.web import (
    BodyError,
    KeyCheck,
    Refusal,
    SwaggerUI,
    add_preflight,
    allowed_methods,
    read_json,
)

ACTIONS = ("start", "stop", "restart", "reset")
FIELDS = ("url", "action", "alias", "tags", "restart", "peer", "node")
DIALECT = "seed"
# Asked once: platform.platform() may run `uname` in a subprocess.
PLATFORM = platform.platform()


class ApiError(Exception):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def _enveloped(handler: Callable[..., Awaitable[tuple[int, Any]]]) -> Callable[..., Any]:
    """Authenticate, run the handler, and wrap what it returns in the envelope."""

    @functools.wraps(handler)
    async def guarded(self: MasterAPI, request: IRequest, **kwargs: Any) -> bytes:
        try:
            self._authenticate(request)
            status, data = await handler(self, request, **kwargs)
        except (ApiError, InstanceError, BodyError) as e:
            return self._error(request, e)
        except Exception:
            self.log.failure("internal error serving {path}", Failure(),
                             path=request.path.decode("utf-8", "replace"))
            return self._reply(request, 500, None, {"code": "INTERNAL",
                                                    "message": "internal error; see the "
                                                               "master's log"})
        return self._reply(request, status, data, None)

    return guarded


def _keyed(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Authenticate a route that answers in its own format (not the envelope)."""

    @functools.wraps(handler)
    def guarded(self: MasterAPI, request: IRequest, **kwargs: Any) -> Any:
        try:
            self._authenticate(request)
        except ApiError as e:
            return self._error(request, e)
        return handler(self, request, **kwargs)

    return guarded


class MasterAPI:
    """Routes relative to ``{prefix}/v1``, where web.mount puts them."""

    app = Klein()
    log = logs.logger("nodepass.master")

    def __init__(self, registry: Registry, prefix: str, keys: KeyCheck,
                 state_dir: str | None = None, np_base: str | None = None) -> None:
        self.registry = registry
        self.base = f"{prefix}/v1"
        self.keys = keys
        self.state_dir = state_dir
        self.np_base = np_base
        self.openapi = json.dumps(document(prefix), indent=1).encode()
        self.docs = SwaggerUI("nodepass master API", self.openapi)
        registry.hub.add_dialect(DIALECT, self.render_event)

    # -- plumbing ----------------------------------------------------------

    def _reply(self, request: IRequest, status: int, data: Any, error: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        body = {"success": error is None, "data": data, "error": error}
        return json.dumps(body, separators=(",", ":")).encode()

    def _authenticate(self, request: IRequest) -> None:
        """The gate refused a request without the key before its body; asked again here,
        a route never serves one even where no gate stands before it."""
        kind = self.keys.refusal(request)
        if kind is not None:
            refusal = unauthorized(kind)
            raise ApiError(refusal.code, refusal.status, refusal.message)

    def refuse(self, request: IRequest, refusal: Refusal) -> bytes:
        """The gate's refusal, in this dialect's envelope."""
        return self._reply(request, refusal.status, None,
                           {"code": refusal.code, "message": refusal.message})

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

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._reply(request, 404, None, {
            "code": "NOT_FOUND",
            "message": f"no route {request.path.decode('utf-8', 'replace')} "
                       f"(the API lives under {self.base})"})

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return self.wrong_method(request, allowed_methods(request, failure))

    def wrong_method(self, request: IRequest, allowed: list[str]) -> bytes:
        """405, in this dialect's words (the Allow header is already set)."""
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

    @app.route("/instances", methods=["GET"], strict_slashes=False)
    @_enveloped
    async def list_instances(self, request: IRequest) -> tuple[int, Any]:
        wanted = []
        for raw in request.args.get(b"tag", []):
            key, sep, value = raw.decode("utf-8", "replace").partition(":")
            if not sep or not key:
                raise ApiError("INVALID_REQUEST", 400, "tag filters look like ?tag=key:value")
            wanted.append((key, value))
        instances = [self.registry.describe(i) for i in self.registry.all(node_filter(request))
                     if all(i.tags.get(k) == v for k, v in wanted)]
        return 200, {"instances": instances}

    @app.route("/instances", methods=["POST"], strict_slashes=False)
    @_enveloped
    async def create_instance(self, request: IRequest) -> tuple[int, Any]:
        body = self._json_object(request)
        if not isinstance(body.get("url"), str):
            raise ApiError("INVALID_REQUEST", 400, "the body needs 'url' as a string")
        if "action" in body:
            raise ApiError("INVALID_REQUEST", 400, "'action' is for PUT on an instance")
        node = body.get("node")
        if "node" in body and not isinstance(node, str):
            raise ApiError("INVALID_REQUEST", 400, "'node' must be a node's id (a string)")
        given = self._metadata(body)
        instance = await self.registry.create(body["url"], given["alias"], given["tags"],
                                              bool(given["restart"]), given["peer"], node)
        return 201, self.registry.describe(instance)

    @app.route("/instances/<string:instance_id>", methods=["GET"], strict_slashes=False)
    @_enveloped
    async def get_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        return 200, self.registry.describe(self.registry.get(instance_id))

    @app.route("/instances/<string:instance_id>", methods=["PUT"], strict_slashes=False)
    @_enveloped
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
        if "node" in body:
            raise ApiError("INVALID_REQUEST", 400, "'node' is for POST: an instance stays on "
                                                   "the node that runs it")
        instance = await self.registry.control(instance, url=url, action=action, **given)
        data = self.registry.describe(instance)
        if action is None or action == "reset" or url is not None:
            return 200, data
        stamp = {"start": "started_at", "stop": "stopped_at", "restart": "restarted_at"}[action]
        data[stamp] = iso(getattr(instance, stamp))
        return 200, data

    @app.route("/instances/<string:instance_id>/traffic", methods=["GET"],
               strict_slashes=False)
    @_enveloped
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
                     "window": window,
                     "samples": await self.registry.traffic(instance, window)}

    @app.route("/instances/<string:instance_id>/logs", methods=["GET"], strict_slashes=False)
    @_enveloped
    async def instance_logs(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        raw = request.args.get(b"limit", [b"%d" % RECENT_LOGS])[0]
        if not raw.isdigit() or not 0 <= int(raw) <= RECENT_LOGS:
            raise ApiError("INVALID_REQUEST", 400,
                           f"limit must be a whole number from 0 to {RECENT_LOGS}")
        lines = self.registry.logs(instance, int(raw))
        return 200, {"id": instance.id, "logs": [
            {**line, "time": iso(line["time"])} for line in lines]}

    @app.route("/info", methods=["GET"], strict_slashes=False)
    @_enveloped
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
            "store": registry.store_status(),
        }

    @app.route("/nodes", methods=["GET"], strict_slashes=False)
    @_enveloped
    async def nodes(self, request: IRequest) -> tuple[int, Any]:
        return 200, {"nodes": self.registry.nodes()}

    def _error(self, request: IRequest, e: ApiError | InstanceError | BodyError) -> bytes:
        return self._reply(request, e.status, None, {"code": e.code, "message": e.message})

    @app.route("/metrics", methods=["GET"], strict_slashes=False)
    @_keyed
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return exposition(self.registry)

    @app.route("/events", methods=["GET"], strict_slashes=False)
    @_keyed
    def events(self, request: IRequest) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        registry = self.registry

        def snapshot(last_id: int) -> list[bytes]:
            instances = [registry.describe(i) for i in registry.all()]
            return [encode(last_id, "initial", {"instances": instances})]

        subscriber = registry.hub.subscribe(request, DIALECT, last_event_id(request), snapshot)
        return subscriber.finished

    @app.route("/instances/<string:instance_id>", methods=["DELETE"], strict_slashes=False)
    @_enveloped
    async def delete_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        instance = self.registry.get(instance_id)
        await self.registry.delete(instance)
        return 200, {"id": instance.id, "deleted": True}


add_preflight(MasterAPI.app)


def node_filter(request: IRequest) -> str | None:
    """``?node=ID``: one node's instances (an unknown node has none)."""
    raw = request.args.get(b"node", [None])[0]
    return raw.decode("utf-8", "replace") if raw is not None else None


def last_event_id(request: IRequest) -> int | None:
    """The ``Last-Event-ID`` a reconnecting browser sends, if it is one of ours."""
    raw = request.getHeader(b"last-event-id")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
