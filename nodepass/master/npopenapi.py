"""The one source of the NodePass dialect's OpenAPI 3.1 document (npapi.py)."""

from __future__ import annotations

from typing import Any

from nodepass import __version__
from nodepass.master.openapi import documentation_paths, plain

_COUNTS = ("mode", "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx")
_PEER = {
    "type": "object", "required": ["sid", "type", "alias"], "additionalProperties": False,
    "properties": {
        "sid": {"type": "string", "description": "a UUID, or \"\""},
        "type": {"type": "string", "enum": ["", "0", "1", "2"],
                 "description": "0 single-end, 1 NAT traversal, 2 tunnel forwarding"},
        "alias": {"type": "string", "maxLength": 256},
    },
}
_TAGS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 256},
         "maxProperties": 64, "description": "replaces the stored tags (keys without ':')"}
_INSTANCE = {
    "type": "object",
    "required": ["id", "alias", "type", "status", "url", "config", "restart", "meta",
                 *_COUNTS],
    "properties": {
        "id": {"type": "string", "description": "8 hex digits; ******** is the API key record",
               "example": "3f9a1c2e"},
        "alias": {"type": "string", "description": "\"\" when unset, never null"},
        "type": {"type": "string", "enum": ["server", "client", ""]},
        "status": {"type": "string", "enum": ["running", "stopped", "error", ""]},
        "url": {"type": "string", "description": "the URL, with the master's log and tls "
                                                 "filled in (the key record: the API key)"},
        "config": {"type": "string", "description": "the URL with every parameter written "
                                                    "out (the key record: the master id)"},
        "restart": {"type": "boolean", "description": "restart when it exits on its own"},
        "meta": {"type": "object", "required": ["peer", "tags"],
                 "properties": {"peer": _PEER, "tags": _TAGS}},
        "mode": {"type": "integer", "enum": [0, 1, 2],
                 "description": "the run mode in force (while running, mode=0 resolved)"},
        "ping": {"type": "integer", "minimum": 0, "description": "ms"},
        "pool": {"type": "integer", "minimum": 0, "description": "idle pooled connections"},
        "tcps": {"type": "integer", "minimum": 0, "description": "active TCP connections"},
        "udps": {"type": "integer", "minimum": 0, "description": "active UDP sessions"},
        **{name: {"type": "integer", "minimum": 0, "description": text} for name, text in (
            ("tcprx", "TCP bytes read from the local socket (user or target)"),
            ("tcptx", "TCP bytes written to the local socket"),
            ("udprx", "UDP bytes read from the local socket"),
            ("udptx", "UDP bytes written to the local socket"))},
        "node": {"type": "string", "description": "ours: the master (node) that runs it, its "
                                                  "mid (docs/fleet.md)"},
        "stale": {"type": "boolean", "description": "ours: its node is offline; shown as "
                                                    "that node last told it"},
    },
}
_INFO = {
    "type": "object",
    "properties": {
        **{name: {"type": "string"} for name in ("alias", "os", "arch", "name", "log", "crt",
                                                  "key", "mid")},
        "cpu": {"type": "integer", "minimum": -1, "maximum": 100,
                "description": "percent; -1 unknown"},
        **{name: {"type": "integer", "minimum": 0} for name in (
            "mem_total", "mem_used", "swap_total", "swap_used", "netrx", "nettx", "diskr",
            "diskw", "sysup", "uptime")},
        "ver": {"type": "string", "description": "the NodePass API level served",
                "example": "v1.14.0"},
        "version": {"type": "string", "description": "this nodepass's own version"},
        "tls": {"type": "string", "enum": ["0", "1", "2"]},
        "store": {"type": "object", "description": "ours: where the state is kept and "
                                                   "whether it can be written now "
                                                   "(status ok or degraded; docs/fleet.md)"},
    },
}
_REF = {"$ref": "#/components/schemas/Instance"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "example": "3f9a1c2e"}
_META_BODY = {"type": "object", "additionalProperties": False,
              "properties": {"peer": {**_PEER, "required": []}, "tags": _TAGS}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": "#/components/responses/Error"} for s in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document(prefix: str) -> dict[str, Any]:
    """OpenAPI 3.1 for every route under ``prefix``/v1 in the NodePass dialect."""
    base = f"{prefix}/v1"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nodepass master API, NodePass dialect",
            "version": __version__,
            "description": "The API NodePass masters serve (v1.14), so NodePass panels drive "
                           "this master unchanged: raw JSON, {\"error\": ...} errors, PATCH "
                           "for actions, SSE events named 'instance'.",
        },
        "servers": [{"url": "/"}],
        "security": [{"ApiKey": []}],
        "paths": {
            f"{base}/instances": {
                "get": {"summary": "Every instance (a fleet's: every node's), after the "
                                   "API key record",
                        "operationId": "npListInstances",
                        "parameters": [{"name": "node", "in": "query", "required": False,
                                        "schema": {"type": "string"},
                                        "description": "ours: only this node's instances"}],
                        "responses": {"200": _json("The records", {"type": "array",
                                                                    "items": _REF}),
                                      **_errors(401)}},
                "post": {"summary": "Create and start an instance (restart defaults to true)",
                         "operationId": "npCreateInstance",
                         "requestBody": _body({
                             "type": "object", "required": ["url"],
                             "additionalProperties": False,
                             "properties": {"url": {"type": "string"},
                                            "alias": {"type": "string", "maxLength": 256},
                                            "restart": {"type": "boolean", "default": True},
                                            "meta": _META_BODY,
                                            "node": {"type": "string", "description":
                                                     "ours: the fleet node to run it on"}}}),
                         "responses": {"201": _json("Created", _REF),
                                       **_errors(400, 401, 404, 413, 503, 504)}},
            },
            f"{base}/instances/{{id}}": {
                "parameters": [_ID],
                "get": {"summary": "One instance (or the API key record)",
                        "operationId": "npGetInstance",
                        "responses": {"200": _json("The instance", _REF),
                                      **_errors(401, 404)}},
                "patch": {"summary": "Act (start, stop, restart, reset) and change alias, "
                                     "restart policy, meta; on ******** restart makes a new "
                                     "API key",
                          "operationId": "npPatchInstance",
                          "requestBody": _body({
                              "type": "object", "additionalProperties": False,
                              "properties": {
                                  "action": {"type": "string",
                                             "enum": ["start", "stop", "restart", "reset"]},
                                  "alias": {"type": "string", "maxLength": 256},
                                  "restart": {"type": "boolean"},
                                  "meta": _META_BODY}}),
                          "responses": {"200": _json("The instance afterwards", _REF),
                                        **_errors(400, 401, 404, 409)}},
                "put": {"summary": "Replace the URL and restart under the same id",
                        "operationId": "npPutInstance",
                        "requestBody": _body({"type": "object", "required": ["url"],
                                              "additionalProperties": False,
                                              "properties": {"url": {"type": "string"}}}),
                        "responses": {"200": _json("The instance afterwards", _REF),
                                      **_errors(400, 401, 403, 404, 409)}},
                "delete": {"summary": "Stop and remove an instance",
                           "operationId": "npDeleteInstance",
                           "responses": {"204": {"description": "Removed"},
                                         **_errors(401, 403, 404)}},
            },
            f"{base}/info": {
                "get": {"summary": "The master and its host", "operationId": "npInfo",
                        "responses": {"200": _json("Master information", _INFO),
                                      **_errors(401)}},
                "post": {"summary": "Set the master's alias", "operationId": "npSetInfo",
                         "requestBody": _body({"type": "object", "additionalProperties": False,
                                               "properties": {"alias": {
                                                   "type": "string", "maxLength": 256}}}),
                         "responses": {"200": _json("Master information", _INFO),
                                       **_errors(400, 401)}},
            },
            f"{base}/tcping": {
                "get": {"summary": "A TCP connect test from the master's host",
                        "operationId": "npTcping",
                        "parameters": [{"name": "target", "in": "query", "required": True,
                                        "schema": {"type": "string"},
                                        "example": "127.0.0.1:8080"}],
                        "responses": {
                            "200": _json("The result", {
                                "type": "object",
                                "required": ["target", "connected", "latency", "error"],
                                "properties": {
                                    "target": {"type": "string"},
                                    "connected": {"type": "boolean"},
                                    "latency": {"type": "integer", "description": "ms"},
                                    "error": {"type": ["string", "null"]}}}),
                            **_errors(400, 401, 429)}},
            },
            f"{base}/events": {
                "get": {"summary": "Server-Sent Events, each named 'instance': "
                                   "{type, time, instance, logs}",
                        "operationId": "npEvents",
                        "responses": {"200": plain("An event stream", "text/event-stream"),
                                      **_errors(401)}},
            },
            **documentation_paths(base, "np"),
        },
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header",
                                           "name": "X-API-Key"}},
            "schemas": {"Instance": _INSTANCE},
            "responses": {"Error": _json("An error", {
                "type": "object", "required": ["error"],
                "properties": {"error": {"type": "string"},
                               "message": {"type": "string",
                                           "description": "the same text"}}})},
        },
    }
