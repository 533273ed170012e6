"""The master's REST API in NodePass's own dialect (../shared/NODEPASS-API.md), so the
panels NodePass users already run (NodePassDash, NodePanel, the Apple app) drive this
master unchanged.

Raw JSON answers, ``{"error": ...}`` errors (with the same text in ``message``, which
NodePanel and the Apple app read), PATCH for actions, the API key as the
pseudo-instance ``********``, and SSE events all named ``instance``.  It serves the
same registry, key and events as the seed dialect, under ``{np}/v1``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nodepass import __version__, logs
from nodepass.master import metadata, sysinfo, web
from nodepass.master.api import last_event_id, node_filter
from nodepass.master.gate import unauthorized
from nodepass.master.instances import Instance, InstanceError
from nodepass.master.npopenapi import document
from nodepass.master.npview import (
    KEY_RECORD_ID,
    event_chunk,
    event_data,
    key_record,
    np_instance,
    opening,
)
from nodepass.master.registry import Registry
from nodepass.master.state import StateError
from nodepass.master.tcping import TcpPing, TooManyPingsError
from nodepass.url import URLError, parse_address

DIALECT = "nodepass"
API_LEVEL = "v1.14.0"  # the NodePass release whose API this dialect serves
ACTIONS = ("start", "stop", "restart", "reset")
POST_FIELDS = ("url", "alias", "restart", "meta", "node")
PATCH_FIELDS = ("action", "alias", "restart", "meta")
_PREFIXES = {"INVALID_URL": "Invalid URL", "INSTANCE_NOT_FOUND": "Instance not found",
             "CONFLICT": "Instance URL conflict"}


class NpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _answered(handler: Callable[..., Awaitable[tuple[int, Any]]]) -> Callable[..., Any]:
    """Authenticate, run the handler, and answer what it returns as NodePass does."""

    @functools.wraps(handler)
    async def guarded(self: NodePassAPI, request: IRequest, **kwargs: Any) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            status, data = await handler(self, request, **kwargs)
        except NpError as e:
            return self._fail(request, e.status, e.message)
        except InstanceError as e:
            prefix = _PREFIXES.get(e.code)
            return self._fail(request, e.status,
                              f"{prefix}: {e.message}" if prefix else e.message)
        except web.BodyError as e:
            return self._fail(request, e.status, f"Invalid request body: {e.message}")
        except Exception:
            self.log.failure("internal error serving {path}", Failure(),
                             path=request.path.decode("utf-8", "replace"))
            return self._fail(request, 500, "Internal error; see the master's log")
        return self._answer(request, status, data)

    return guarded


class NodePassAPI:
    """Routes relative to ``{np}/v1``, where web.mount puts them."""

    app = Klein()
    log = logs.logger("nodepass.master")

    def __init__(self, registry: Registry, prefix: str, keys: web.KeyCheck,
                 tcping: TcpPing) -> None:
        self.registry = registry
        self.base = f"{prefix}/v1"
        self.keys = keys
        self.tcping = tcping
        self.openapi = json.dumps(document(prefix), indent=1).encode()
        self.docs = web.SwaggerUI("nodepass master API (NodePass dialect)", self.openapi)
        registry.hub.add_dialect(DIALECT, self.render_event)

    # -- plumbing ----------------------------------------------------------

    def _refused(self, request: IRequest) -> bytes | None:
        """The gate refused a request without the key before its body; asked again here,
        a route never serves one even where no gate stands before it."""
        kind = self.keys.refusal(request)
        return None if kind is None else self.refuse(request, unauthorized(kind))

    def refuse(self, request: IRequest, refusal: web.Refusal) -> bytes:
        """The gate's refusal, as NodePass words it."""
        return self._fail(request, refusal.status, refusal.np_message)

    def _answer(self, request: IRequest, status: int, data: Any) -> bytes:
        request.setResponseCode(status)
        if data is None:
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(data, separators=(",", ":")).encode()

    def _fail(self, request: IRequest, status: int, message: str) -> bytes:
        return self._answer(request, status, {"error": message, "message": message})

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._fail(request, 404, f"Not found: no route "
                                        f"{request.path.decode('utf-8', 'replace')} (this API "
                                        f"lives under {self.base})")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return self.wrong_method(request, web.allowed_methods(request, failure))

    def wrong_method(self, request: IRequest, allowed: list[str]) -> bytes:
        """405, in this dialect's words (the Allow header is already set)."""
        return self._fail(request, 405, f"Method not allowed: {request.method.decode()} "
                                        f"(allowed: {', '.join(allowed)})")

    @staticmethod
    def _object(request: IRequest, fields: tuple[str, ...]) -> dict[str, Any]:
        """The JSON object in the body (any Content-Type, as NodePass reads it); a field
        NodePass does not define here is refused, so a typo is never ignored; ``null``
        means "not given", as Go reads it."""
        body = web.read_json(request, require_type=False)
        if not isinstance(body, dict):
            raise NpError(400, "Invalid request body: a JSON object is expected")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise NpError(400, f"Invalid request body: unknown field {unknown[0]!r} (allowed: "
                               f"{', '.join(fields)})")
        return {k: v for k, v in body.items() if v is not None}

    @staticmethod
    def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
        """alias, restart, and meta's peer and tags, checked (None: not given)."""
        given: dict[str, Any] = dict.fromkeys(("alias", "restart", "peer", "tags"))
        try:
            if "alias" in body:
                given["alias"] = metadata.alias(body["alias"])
            if "restart" in body:
                given["restart"] = metadata.restart(body["restart"])
            meta = body.get("meta", {})
            if not isinstance(meta, dict) or set(meta) - {"peer", "tags"}:
                raise metadata.MetadataError("'meta' must be an object of 'peer' and 'tags'")
            if meta.get("peer") is not None:
                given["peer"] = metadata.peer(meta["peer"])
            if meta.get("tags") is not None:
                given["tags"] = metadata.tags(meta["tags"])
        except metadata.MetadataError as e:
            raise NpError(400, f"Invalid request body: {e}") from None
        return given

    def _instance(self, instance_id: str) -> Instance:
        full = instance_id if instance_id.startswith("ins_") else f"ins_{instance_id}"
        return self.registry.get(full)

    def _view(self, instance: Instance) -> dict[str, Any]:
        return np_instance(self.registry, instance)

    def _key_record(self) -> dict[str, Any]:
        return key_record(self.registry, self.keys.key.value)

    def render_event(self, event_id: int, kind: str, instance: Instance | None,
                     fields: Mapping[str, Any]) -> bytes:
        record = self._view(instance) if instance is not None else None
        return event_chunk(event_id, event_data(self.registry, kind, record,
                                                fields.get("line", "")))

    # -- routes ------------------------------------------------------------

    @app.route("/instances", methods=["GET"], strict_slashes=False)
    @_answered
    async def list_instances(self, request: IRequest) -> tuple[int, Any]:
        return 200, [self._key_record(),
                     *(self._view(i) for i in self.registry.all(node_filter(request)))]

    @app.route("/instances", methods=["POST"], strict_slashes=False)
    @_answered
    async def create_instance(self, request: IRequest) -> tuple[int, Any]:
        body = self._object(request, POST_FIELDS)
        if not isinstance(body.get("url"), str) or not body["url"]:
            raise NpError(400, "Invalid request body: 'url' is required, as a string")
        given = self._metadata(body)
        restart = True if given["restart"] is None else given["restart"]  # as NodePass
        node = body.get("node")
        if node is not None and not isinstance(node, str):
            raise NpError(400, "Invalid request body: 'node' must be a node's id (a string)")
        instance = await self.registry.create(body["url"], given["alias"], given["tags"],
                                              restart, given["peer"], node)
        return 201, self._view(instance)

    @app.route("/instances/<string:instance_id>", methods=["GET"], strict_slashes=False)
    @_answered
    async def get_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        if instance_id == KEY_RECORD_ID:
            return 200, self._key_record()
        return 200, self._view(self._instance(instance_id))

    @app.route("/instances/<string:instance_id>", methods=["PATCH"], strict_slashes=False)
    @_answered
    async def patch_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        if instance_id == KEY_RECORD_ID:
            return await self._patch_key(request)
        instance = self._instance(instance_id)
        body = self._object(request, PATCH_FIELDS)
        action = body.get("action")
        if action is not None and action not in ACTIONS:
            raise NpError(400, f"Invalid action: {str(action)[:40]!r} (allowed: "
                               f"{', '.join(ACTIONS)})")
        given = self._metadata(body)
        instance = await self.registry.control(instance, action=action, **given)
        return 200, self._view(instance)

    async def _patch_key(self, request: IRequest) -> tuple[int, Any]:
        body = self._object(request, PATCH_FIELDS)
        if body and body != {"action": "restart"}:
            raise NpError(400, 'the API key record takes only {"action": "restart"}, which '
                               'makes a new key')
        if body:
            try:
                self.keys.key.rotate()
            except StateError as e:
                raise NpError(409, f"Conflict: {e}") from None
            self.log.warn("API key rotated through the API; the old key no longer works "
                          "(saved in {path})", path=str(self.keys.key.path))
            self.registry.hub.close_all()  # streams opened with the old key end now
        return 200, self._key_record()

    @app.route("/instances/<string:instance_id>", methods=["PUT"], strict_slashes=False)
    @_answered
    async def put_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        if instance_id == KEY_RECORD_ID:
            raise NpError(403, 'Forbidden: API Key (the key record cannot be replaced; '
                               'PATCH {"action": "restart"} makes a new key)')
        instance = self._instance(instance_id)
        body = self._object(request, ("url",))
        if not isinstance(body.get("url"), str) or not body["url"]:
            raise NpError(400, "Invalid request body: 'url' is required, as a string")
        instance = await self.registry.control(instance, url=body["url"])
        return 200, self._view(instance)

    @app.route("/instances/<string:instance_id>", methods=["DELETE"], strict_slashes=False)
    @_answered
    async def delete_instance(self, request: IRequest, instance_id: str) -> tuple[int, Any]:
        if instance_id == KEY_RECORD_ID:
            raise NpError(403, "Forbidden: API Key (the key record cannot be deleted)")
        await self.registry.delete(self._instance(instance_id))
        return 204, None

    def _info(self) -> dict[str, Any]:
        registry = self.registry
        master = registry.master
        now = registry.reactor.seconds()
        return {
            "alias": registry.alias,
            **sysinfo.figures(now),
            "ver": API_LEVEL,
            "version": __version__,
            "uptime": int(now - registry.started_at),
            "log": master.log,
            "tls": str(master.tls),
            "crt": master.crt or "",
            "key": master.key or "",
            "mid": registry.master_id,
            "store": registry.store_status(),
        }

    @app.route("/info", methods=["GET"], strict_slashes=False)
    @_answered
    async def info(self, request: IRequest) -> tuple[int, Any]:
        return 200, self._info()

    @app.route("/info", methods=["POST"], strict_slashes=False)
    @_answered
    async def set_info(self, request: IRequest) -> tuple[int, Any]:
        body = self._object(request, ("alias",))
        try:
            alias = metadata.alias(body.get("alias", ""))
        except metadata.MetadataError as e:
            raise NpError(400, f"Invalid request body: {e}") from None
        self.registry.set_alias(alias)
        return 200, self._info()

    @app.route("/tcping", methods=["GET"], strict_slashes=False)
    @_answered
    async def tcp_ping(self, request: IRequest) -> tuple[int, Any]:
        raw = request.args.get(b"target", [b""])[0].decode("utf-8", "replace")
        if not raw:
            raise NpError(400, "Target address required (?target=host:port)")
        try:
            target = parse_address(raw, "target")
        except URLError as e:
            raise NpError(400, f"Invalid target: {e}") from None
        try:
            result = await self.tcping.ping(target)
        except TooManyPingsError as e:
            raise NpError(429, str(e)) from None
        return 200, {"target": raw, **result}

    @app.route("/events", methods=["GET"], strict_slashes=False)
    def events(self, request: IRequest) -> Any:
        refused = self._refused(request)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        registry = self.registry

        def snapshot(last_id: int) -> list[bytes]:
            records = [self._key_record(), *(self._view(i) for i in registry.all())]
            return [event_chunk(last_id, event_data(registry, "initial", record))
                    for record in records]

        subscriber = registry.hub.subscribe(request, DIALECT, last_event_id(request), snapshot,
                                            opening())
        return subscriber.finished


web.add_preflight(NodePassAPI.app)
