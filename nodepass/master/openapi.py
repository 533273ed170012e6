"""The one source of the master's OpenAPI document."""

from __future__ import annotations

from typing import Any

from nodepass import __version__

ERROR_CODES = [
    "INVALID_JSON", "INVALID_REQUEST", "INVALID_URL", "INVALID_ACTION", "INSTANCE_NOT_FOUND",
    "NOT_FOUND", "METHOD_NOT_ALLOWED", "UNAUTHORIZED", "UNSUPPORTED_MEDIA_TYPE",
    "PAYLOAD_TOO_LARGE", "CONFLICT", "INTERNAL", "MISDIRECTED_REQUEST", "ORIGIN_NOT_ALLOWED",
    "NODE_NOT_FOUND", "NODE_OFFLINE", "NODE_TIMEOUT", "FLEET_UNAVAILABLE", "INTERRUPTED",
]


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["success", "data", "error"],
        "properties": {
            "success": {"type": "boolean", "enum": [True]},
            "data": data,
            "error": {"type": "object", "nullable": True, "enum": [None]},
        },
    }


def _response(description: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _envelope(data)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


_PEER = {
    "type": "object", "additionalProperties": False,
    "description": "NodePass's meta.peer, shared with that dialect; a field left out keeps "
                   "its value, \"\" clears it",
    "properties": {
        "sid": {"type": "string", "description": "a UUID, or \"\""},
        "type": {"type": "string", "enum": ["", "0", "1", "2"],
                 "description": "0 single-end, 1 NAT traversal, 2 tunnel forwarding"},
        "alias": {"type": "string", "maxLength": 256},
    },
}
_METADATA = {
    "alias": {"type": "string", "maxLength": 256, "description": "a name for panels"},
    "tags": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 256},
             "maxProperties": 64,
             "description": "free key/value labels; filter with ?tag=key:value"},
    "restart": {"type": "boolean",
                "description": "restart the instance when it exits on its own"},
    "peer": _PEER,
}
_SAMPLE = {
    "type": "object",
    "properties": {
        "time": {"type": "string", "format": "date-time"},
        "timestamp": {"type": "number"},
        **{f"{n}_rate": {"type": "number", "description": "bytes per second"}
           for n in ("tcp_in", "tcp_out", "udp_in", "udp_out")},
        "connections": {"type": "integer"},
        "ping": {"type": "number", "nullable": True},
    },
}

_INSTANCE = {
    "type": "object",
    "required": ["id", "type", "url", "status", "created_at", "uptime", "connections",
                 "pool_size", "ping", "tcp_in", "tcp_out", "udp_in", "udp_out", "error"],
    "properties": {
        "id": {"type": "string", "pattern": "^ins_[0-9a-f]+$", "example": "ins_3f9a1c2e"},
        "type": {"type": "string", "enum": ["server", "client"]},
        "url": {"type": "string", "description": "canonical URL, inherited settings filled in",
                "example": "server://0.0.0.0:10101/0.0.0.0:8080?log=info&tls=1"},
        "status": {"type": "string", "enum": ["running", "stopped", "error"]},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "nullable": True, "format": "date-time"},
        "stopped_at": {"type": "string", "nullable": True, "format": "date-time"},
        "restarted_at": {"type": "string", "nullable": True, "format": "date-time"},
        "uptime": {"type": "integer", "minimum": 0, "description": "seconds while running"},
        "connections": {"type": "integer", "minimum": 0, "description": "active connections"},
        "pool_size": {"type": "integer", "minimum": 0, "description": "idle pooled connections"},
        "udp_sessions": {"type": "integer", "minimum": 0, "description": "active UDP sessions"},
        "ping": {"type": "number", "nullable": True,
                 "description": "last heartbeat round trip, ms"},
        "tunnel": {"type": "string", "nullable": True,
                   "enum": ["connected", "connecting", "waiting", "forwarding", None],
                   "description": "the tunnel session as the instance last reported it "
                                  "(forwarding: single-end mode, no tunnel)"},
        "mode": {"type": "string", "nullable": True,
                 "enum": ["reverse", "forward", "single-end", None],
                 "description": "the run mode in force (mode=0 resolved), while running"},
        "transport": {"type": "string", "nullable": True,
                      "enum": ["tcp", "quic", "websocket", "http2", None],
                      "description": "the pool's transport (type=), as the server chose it "
                                     "and the client learned it; null in single-end mode "
                                     "and while stopped"},
        "refused": {"type": "integer", "minimum": 0,
                    "description": "connections and UDP sessions refused by the slot limit "
                                   "(or notcp/noudp) since the instance started"},
        "pid": {"type": "integer", "nullable": True, "description": "the instance's process id"},
        "tcp_in": {"type": "integer", "minimum": 0},
        "tcp_out": {"type": "integer", "minimum": 0},
        "udp_in": {"type": "integer", "minimum": 0},
        "udp_out": {"type": "integer", "minimum": 0},
        "error": {"type": "string", "nullable": True, "description": "the last failure"},
        **_METADATA,
        "alias": {"type": "string", "nullable": True, "description": "a name for panels"},
        "restarts": {"type": "integer", "minimum": 0, "description": "automatic restarts"},
        "node": {"type": "string", "description": "the master (node) that runs it: its "
                                                  "master_id (docs/fleet.md)"},
        "stale": {"type": "boolean", "description": "true while its node is offline: shown "
                                                    "as that node last told it"},
    },
}
_INSTANCE["properties"]["peer"] = {**_PEER, "required": ["sid", "type", "alias"]}

_REF = {"$ref": "#/components/schemas/Instance"}
_NODE_FILTER = {"name": "node", "in": "query", "required": False,
                "schema": {"type": "string"},
                "description": "only the instances of this node (a master_id)"}
STORE = {
    "type": "object", "required": ["store", "node", "status"],
    "description": "where the state is kept and whether it can be written now",
    "properties": {
        "store": {"type": "string", "enum": ["sqlite", "memory", "postgresql"]},
        "node": {"type": "string", "description": "this master's node id (its master_id)"},
        "status": {"type": "string", "enum": ["ok", "degraded"],
                   "description": "degraded: the fleet database is unreachable; instances "
                                  "keep running and writes wait"},
        "database": {"type": "string", "description": "postgresql: where (no password)"},
        "error": {"type": "string", "nullable": True},
        "pending_writes": {"type": "integer", "minimum": 0},
        "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
    },
}
NODE = {
    "type": "object", "required": ["id", "online"],
    "properties": {
        "id": {"type": "string"}, "alias": {"type": "string"}, "version": {"type": "string"},
        "online": {"type": "boolean", "description": "false once silent for 3 heartbeats"},
        "self": {"type": "boolean", "description": "the master answering"},
        "last_heartbeat": {"type": "number", "description": "seconds since its heartbeat"},
        "heartbeat": {"type": "number", "nullable": True, "description": "its interval, s"},
    },
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "example": "ins_3f9a1c2e"}


def plain(description: str, content_type: str) -> dict[str, Any]:
    """A response that is not JSON."""
    return {"description": description, "content": {content_type: {}}}


def documentation_paths(base: str, operation_prefix: str = "") -> dict[str, Any]:
    """``openapi.json`` and ``docs`` under ``base``: the same in both dialects, public."""

    def public(summary: str, operation: str, response: dict[str, Any]) -> dict[str, Any]:
        if operation_prefix:  # npOpenapi, npDocs
            operation = operation_prefix + operation.capitalize()
        return {"get": {"summary": summary, "operationId": operation, "security": [],
                        "responses": {"200": response}}}

    return {
        f"{base}/openapi.json": public("This document", "openapi",
                                       plain("The OpenAPI document", "application/json")),
        f"{base}/docs": public("Swagger UI, served offline", "docs",
                               plain("An HTML page", "text/html")),
    }


def document(prefix: str) -> dict[str, Any]:
    """The OpenAPI 3.0 description of every route under ``prefix``/v1 (3.0, not 3.1:
    the bundled Swagger UI renders 3.0)."""
    base = f"{prefix}/v1"
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "nodepass master API",
            "version": __version__,
            "description": "Create, control and watch nodepass server and client instances. "
                           "Every response is the envelope {success, data, error}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"ApiKey": []}, {"Bearer": []}],
        "paths": {
            f"{base}/instances": {
                "get": {
                    "summary": "List all instances",
                    "operationId": "listInstances",
                    "parameters": [{"name": "tag", "in": "query", "required": False,
                                    "schema": {"type": "array", "items": {
                                        "type": "string", "pattern": "^[^:]+:.*$"}},
                                    "style": "form", "explode": True,
                                    "description": "key:value; every one given must match"},
                                   _NODE_FILTER],
                    "responses": {
                        "200": _response("The instances", {
                            "type": "object", "required": ["instances"],
                            "properties": {"instances": {"type": "array", "items": _REF}},
                        }),
                        **_errors(400, 401),
                    },
                },
                "post": {
                    "summary": "Create and start an instance",
                    "operationId": "createInstance",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["url"],
                            "additionalProperties": False,
                            "properties": {
                                "url": {"type": "string", "pattern": "^(server|client)://\\S+$",
                                        "example":
                                            "server://127.0.0.1:10101/127.0.0.1:8080?tls=1"},
                                **_METADATA,
                                "node": {"type": "string", "description": "the node to run "
                                         "it on (a fleet master's id; default: this one)"},
                            },
                        }}},
                    },
                    "responses": {
                        "201": _response("Created; status is what the instance reported",
                                         _REF),
                        **_errors(400, 401, 404, 413, 415, 503, 504),
                    },
                },
            },
            f"{base}/instances/{{id}}": {
                "parameters": [_ID],
                "get": {
                    "summary": "One instance",
                    "operationId": "getInstance",
                    "responses": {
                        "200": _response("The instance", _REF),
                        **_errors(401, 404),
                    },
                },
                "put": {
                    "summary": "Start, stop, restart an instance, reset its counters, change "
                               "its metadata or replace its URL",
                    "operationId": "controlInstance",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {
                            "type": "object", "additionalProperties": False,
                            "minProperties": 1,
                            "description": "an action or a new url (not both), metadata, or "
                                           "both; a new url restarts the instance under the "
                                           "same id",
                            "properties": {"action": {"type": "string",
                                                      "enum": ["start", "stop", "restart",
                                                               "reset"]},
                                           "url": {"type": "string",
                                                   "pattern": "^(server|client)://\\S+$"},
                                           **_METADATA},
                        }}},
                    },
                    "responses": {
                        "200": _response("The instance after the action",
                                         _REF),
                        **_errors(400, 401, 404, 409, 413, 415, 503, 504),
                    },
                },
                "delete": {
                    "summary": "Stop and remove an instance",
                    "operationId": "deleteInstance",
                    "responses": {
                        "200": _response("Removed", {
                            "type": "object", "required": ["id", "deleted"],
                            "properties": {"id": {"type": "string"},
                                           "deleted": {"type": "boolean"}},
                        }),
                        **_errors(401, 404, 503, 504),
                    },
                },
            },
            f"{base}/instances/{{id}}/traffic": {
                "parameters": [_ID],
                "get": {
                    "summary": "Traffic history: rates per REPORT_INTERVAL",
                    "operationId": "instanceTraffic",
                    "parameters": [{"name": "window", "in": "query", "required": False,
                                    "schema": {"type": "number", "default": 3600,
                                               "exclusiveMinimum": True, "minimum": 0,
                                               "maximum": 604800},
                                    "description": "seconds of history"}],
                    "responses": {
                        "200": _response("Samples, oldest first", {
                            "type": "object",
                            "properties": {"id": {"type": "string"},
                                           "interval": {"type": "number"},
                                           "window": {"type": "number"},
                                           "samples": {"type": "array", "items": _SAMPLE}},
                        }),
                        **_errors(400, 401, 404),
                    },
                },
            },
            f"{base}/instances/{{id}}/logs": {
                "parameters": [_ID],
                "get": {
                    "summary": "The instance's last log lines (200 are kept)",
                    "operationId": "instanceLogs",
                    "parameters": [{"name": "limit", "in": "query", "required": False,
                                    "schema": {"type": "integer", "default": 200,
                                               "minimum": 0, "maximum": 200},
                                    "description": "how many of the last lines"}],
                    "responses": {
                        "200": _response("Lines, oldest first", {
                            "type": "object", "required": ["id", "logs"],
                            "properties": {"id": {"type": "string"}, "logs": {
                                "type": "array", "items": {
                                    "type": "object",
                                    "required": ["time", "level", "message"],
                                    "properties": {"time": {"type": "string"},
                                                   "level": {"type": "string"},
                                                   "message": {"type": "string"}}}}},
                        }),
                        **_errors(400, 401, 404),
                    },
                },
            },
            f"{base}/events": {
                "get": {
                    "summary": "Server-Sent Events: initial, create, update, delete, log, "
                               "shutdown",
                    "operationId": "events",
                    "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False,
                                    "schema": {"type": "integer"},
                                    "description": "resume after this event"}],
                    "responses": {"200": plain("An event stream", "text/event-stream"),
                                  **_errors(401)},
                },
            },
            f"{base}/metrics": {
                "get": {
                    "summary": "Prometheus text exposition",
                    "operationId": "metrics",
                    "responses": {"200": plain("Metrics", "text/plain"), **_errors(401)},
                },
            },
            f"{base}/info": {
                "get": {
                    "summary": "The master: version, uptime, platform, state, counts",
                    "operationId": "info",
                    "responses": {
                        "200": _response("About the master", {
                            "type": "object",
                            "properties": {
                                "version": {"type": "string"},
                                "uptime": {"type": "integer"},
                                "started_at": {"type": "string", "format": "date-time"},
                                "platform": {"type": "string"},
                                "python": {"type": "string"},
                                "state_dir": {"type": "string", "nullable": True},
                                "persist": {"type": "boolean"},
                                "instances": {"type": "object",
                                              "additionalProperties": {"type": "integer"}},
                                "alias": {"type": "string", "description": "the master's "
                                          "alias (set in the NodePass dialect)"},
                                "master_id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                                "bases": {"type": "object", "description": "where each API "
                                          "dialect lives",
                                          "properties": {"seed": {"type": "string"},
                                                         "nodepass": {"type": "string"}}},
                                "store": STORE,
                            },
                        }),
                        **_errors(401),
                    },
                },
            },
            f"{base}/nodes": {
                "get": {
                    "summary": "The fleet's masters (nodes), this one first",
                    "operationId": "listNodes",
                    "responses": {
                        "200": _response("The nodes", {
                            "type": "object", "required": ["nodes"],
                            "properties": {"nodes": {"type": "array", "items": {
                                "$ref": "#/components/schemas/Node"}}}}),
                        **_errors(401),
                    },
                },
            },
            **documentation_paths(base),
        },
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Instance": _INSTANCE,
                "Node": NODE,
                "Error": {
                    "type": "object",
                    "required": ["success", "data", "error"],
                    "properties": {
                        "success": {"type": "boolean", "enum": [False]},
                        "data": {"type": "object", "nullable": True, "enum": [None]},
                        "error": {
                            "type": "object", "required": ["code", "message"],
                            "properties": {"code": {"type": "string", "enum": ERROR_CODES},
                                           "message": {"type": "string"}},
                        },
                    },
                },
            },
            "responses": {
                f"E{s}": {"description": d, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}
                for s, d in ((400, "Bad request"), (401, "Missing or wrong API key"),
                             (403, "A web page's origin not allowed (any route)"),
                             (404, "Not found"), (405, "Method not allowed"),
                             (409, "Conflict"), (413, "Body too large"),
                             (415, "Body is not application/json"),
                             (421, "A Host this master does not answer to (any route)"),
                             (500, "Internal error"),
                             (503, "The fleet database is unreachable (FLEET_UNAVAILABLE)"),
                             (504, "The node that runs it is offline (NODE_OFFLINE: the "
                                   "command is queued) or did not answer in time "
                                   "(NODE_TIMEOUT)"))
            },
        },
    }
