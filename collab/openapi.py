"""The OpenAPI description of the HTTP endpoints, served at ``/openapi.json``.

Built from the app's routes: every registered HTTP route is in it, with the
methods it really accepts. What each endpoint does, its parameters and its
answers are written here by hand (``OPERATIONS``); a route added without an
entry still appears, described by its endpoint's docstring, and a test
fails until it gets one. The websocket (``/ws/{workspace_id}``) is not an
HTTP operation: see docs/protocol.md (linked from ``info``).
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.routing import BaseRoute, Mount, Route

JSON = "application/json"

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, {"$ref": "#/components/schemas/Error"})


_AUTH = {
    "401": _error("no credentials, or invalid ones"),
    "403": _error("the credentials do not grant the role this needs"),
}
_WORKSPACE_READ = {**_AUTH}
_ADMIN = {**_AUTH}
_SERVER_ADMIN_NOTE = 'Needs `"*": "admin"` in the token (in development mode: `?role=admin`, from loopback only).'
_ROOM_ADMIN_NOTE = (
    'Needs the admin role for the workspace (`{"<id>": "admin"}` or `"*": "admin"`; in development mode: '
    "`?role=admin`, from loopback only)."
)
_WORKSPACE_NOTE = "Needs a token with any role for the workspace (in development mode: none)."

# (path, method) -> OpenAPI operation (without path parameters, which are added from the route).
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/healthz", "get"): {
        "summary": "Liveness: the process answers",
        "tags": ["operations"],
        "responses": {
            "200": _json(
                "alive",
                {
                    "type": "object",
                    "properties": {"status": {"type": "string", "enum": ["ok"]}, "version": {"type": "string"}},
                },
            )
        },
    },
    ("/readyz", "get"): {
        "summary": "Readiness: the store, Redis (when configured) and the data-source backend (when forwarding) answer",
        "description": "Each check is `ok` or `error: ...`. 503 while any required check fails or the server is "
        "shutting down: take the node out of the load balancer.",
        "tags": ["operations"],
        "responses": {
            "200": _json("ready", {"$ref": "#/components/schemas/Readiness"}),
            "503": _json("not ready", {"$ref": "#/components/schemas/Readiness"}),
        },
    },
    ("/metrics", "get"): {
        "summary": "Prometheus metrics (text exposition format 0.0.4)",
        "description": "`Authorization: Bearer <COLLAB_METRICS_TOKEN>`, or a token with `\"*\": \"admin\"`. "
        "In development mode without a metrics token: open.",
        "tags": ["operations"],
        "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": _error("neither the metrics token nor a valid token"),
            "403": _error("a valid token without the server-wide admin role"),
        },
    },
    ("/openapi.json", "get"): {
        "summary": "This description",
        "tags": ["operations"],
        "responses": {"200": _json("the OpenAPI document")},
    },
    ("/admin/stats", "get"): {
        "summary": "Connection counts and refusals (origin, limits, authentication, rate)",
        "description": _SERVER_ADMIN_NOTE,
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("counts"), **_ADMIN},
    },
    ("/", "get"): {
        "summary": "Landing page: what runs here, links to the participants panel, the console, /metrics, the docs",
        "description": "HTML; names no workspace and no user.",
        "tags": ["pages"],
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}},
    },
    ("/admin", "get"): {
        "summary": "The operator console (HTML): rooms, participants, locks, forwarding, dead letters, audit",
        "description": _SERVER_ADMIN_NOTE
        + " The page passes its own query string (`?token=`, or `?user=&role=admin`) to the requests it makes.",
        "tags": ["admin", "pages"],
        "security": [{"bearer": []}],
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}, **_ADMIN},
    },
    ("/api/admin/console", "get"): {
        "summary": "Everything the console shows, in one document (polled by /admin)",
        "description": _SERVER_ADMIN_NOTE
        + " `rooms`: the admin API's room reports plus `nodes`; `forwarding.workspaces`: per workspace with an "
        "open room, pending changes, or named in `?watch=a,b`: the forwarding status with `lag_seconds`, its "
        "dead letters (`dead`) and its latest audit entries (`audit`); `forwarding.totals`: the whole store.",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "parameters": [
            {
                "name": "watch",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "comma-separated workspaces to include though not open on this node",
            }
        ],
        "responses": {"200": _json("the console document"), **_ADMIN},
    },
    ("/docs/{name}", "get"): {
        "summary": "A document of docs/ (Markdown), when the server runs from a source checkout",
        "tags": ["pages"],
        "responses": {
            "200": {"description": "Markdown", "content": {"text/markdown": {}}},
            "404": _error("no such document"),
        },
    },
    ("/api/admin/rooms", "get"): {
        "summary": "The rooms in memory on this node, with peer counts",
        "description": _SERVER_ADMIN_NOTE,
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {
            "200": _json(
                "rooms",
                {
                    "type": "object",
                    "properties": {
                        "node": {"type": "string"},
                        "rooms": {"type": "array", "items": {"$ref": "#/components/schemas/RoomSummary"}},
                        "loading": {"type": "array", "items": {"type": "string"}},
                        "peers": {"type": "integer"},
                    },
                },
            ),
            **_ADMIN,
        },
    },
    ("/api/admin/rooms/{workspace_id}", "get"): {
        "summary": "A room: its peers on this node, its participants and its locks (every node's)",
        "description": _ROOM_ADMIN_NOTE + " Answers for a room that is not open here too (`open: false`).",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("the room"), **_ADMIN, "404": _error("invalid workspace id")},
    },
    ("/api/admin/rooms/{workspace_id}/config", "get"): {
        "summary": "The current configuration as JSON (secret-looking values masked as ***)",
        "description": _ROOM_ADMIN_NOTE + " From the room in memory, else read from the store without opening it.",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {
            "200": _json(
                "configuration",
                {
                    "type": "object",
                    "properties": {
                        "workspace": {"type": "string"},
                        "source": {"type": "string", "enum": ["memory", "store"]},
                        "seq": {"type": "integer"},
                        "config": {"type": "object"},
                    },
                },
            ),
            **_ADMIN,
            "404": _error("nothing stored for this workspace, or an invalid id"),
        },
    },
    ("/api/admin/rooms/{workspace_id}/consistency", "get"): {
        "summary": "Whether the document this room hands out would load in a Yjs client",
        "description": _ROOM_ADMIN_NOTE + " Walks the encoded state of the room in memory (`memory`, when open "
        "here) and of its stored history replayed (`store`): each lists its problems (a struct that does not "
        "decode, clocks that disagree with the content, half a surrogate pair); `well_formed` is true when "
        "neither has any.",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {
            "200": _json(
                "the check",
                {
                    "type": "object",
                    "properties": {
                        "workspace": {"type": "string"},
                        "well_formed": {"type": "boolean"},
                        "memory": {"type": "object"},
                        "store": {"type": "object"},
                    },
                },
            ),
            **_ADMIN,
            "404": _error("nothing stored and no open room for this workspace, or an invalid id"),
        },
    },
    ("/api/admin/rooms/{workspace_id}/locks/{path}/release", "post"): {
        "summary": "Force-release the lock on exactly this configuration path",
        "description": _ROOM_ADMIN_NOTE + " The room's peers (the holder too) get `lock.released` with reason "
        "`forced`.",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "responses": {
            "200": _json("the lease that was released"),
            **_ADMIN,
            "404": _error("nobody holds this lock, or locks are disabled"),
            "503": _error("the lock backend is unavailable"),
        },
    },
    ("/api/admin/rooms/{workspace_id}/close", "post"): {
        "summary": "Close every connection of the room (1012 by default), then evict it from memory",
        "description": _ROOM_ADMIN_NOTE + " Clients reconnect and load the document afresh from the store.",
        "tags": ["admin"],
        "security": [{"bearer": []}],
        "requestBody": {
            "required": False,
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "code": {
                                "type": "integer",
                                "description": "1000, 1001, 1012, 1013 or 4000-4999",
                                "default": 1012,
                            },
                            "reason": {"type": "string"},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": _json(
                "what was done",
                {
                    "type": "object",
                    "properties": {
                        "closed": {"type": "integer"},
                        "evicted": {"type": "boolean"},
                        "open": {"type": "boolean"},
                    },
                },
            ),
            "400": _error("invalid body"),
            **_ADMIN,
        },
    },
    ("/admin/locks/stats", "get"): {
        "summary": "Lock counters of this node (no lock contents)",
        "description": _SERVER_ADMIN_NOTE,
        "tags": ["locks", "admin"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("counters"), **_ADMIN},
    },
    ("/api/workspaces/{workspace_id}/participants", "get"): {
        "summary": "The workspace's participants (every node's)",
        "description": _WORKSPACE_NOTE,
        "tags": ["presence"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("roster"), **_WORKSPACE_READ, "503": _error("presence registry unavailable")},
    },
    ("/api/workspaces/{workspace_id}/participants/events", "get"): {
        "summary": "Participants as Server-Sent Events: a snapshot, then diffs",
        "description": _WORKSPACE_NOTE,
        "tags": ["presence"],
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_WORKSPACE_READ,
        },
    },
    ("/api/events", "get"): {
        "summary": "A workspace's events (CloudEvents 1.0 JSON) as Server-Sent Events; resumable with Last-Event-ID",
        "description": _WORKSPACE_NOTE + " The workspace is the `workspace` query parameter. See docs/events.md.",
        "tags": ["events"],
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "workspace", "in": "query", "required": True, "schema": {"type": "string"}},
            {
                "name": "last_event_id",
                "in": "query",
                "schema": {"type": "string"},
                "description": "resume after this event id (as the Last-Event-ID header)",
            },
        ],
        "responses": {
            "200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            "400": _error("a Last-Event-ID that is not an event id of the workspace"),
            "404": _error("invalid workspace id"),
            **_WORKSPACE_READ,
        },
    },
    ("/api/events/dead-letters", "get"): {
        "summary": "Events the webhooks gave up on, per webhook URL",
        "description": "Needs the editor role for the workspace (the `workspace` query parameter).",
        "tags": ["events"],
        "security": [{"bearer": []}],
        "parameters": [{"name": "workspace", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json("dead letters"), "404": _error("invalid workspace id"), **_WORKSPACE_READ},
    },
    ("/workspaces/{workspace_id}", "get"): {
        "summary": "The participant panel (HTML)",
        "tags": ["presence"],
        "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}},
    },
    ("/presence/static/{path}", "get"): {
        "summary": "Static files of the participant panel",
        "tags": ["presence"],
        "responses": {"200": {"description": "a file"}, "404": {"description": "no such file"}},
    },
    ("/api/workspaces/{workspace_id}/history", "get"): {
        "summary": "The audit trail of configuration changes, newest first",
        "description": _WORKSPACE_NOTE,
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "parameters": [
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
            },
            {"name": "before", "in": "query", "schema": {"type": "integer"}, "description": "entry id to page from"},
        ],
        "responses": {"200": _json("entries"), "400": _error("bad paging parameters"), **_WORKSPACE_READ},
    },
    ("/api/workspaces/{workspace_id}/forwarding", "get"): {
        "summary": "Delivery status of the workspace's changes to the data-source backend",
        "description": _WORKSPACE_NOTE,
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("status"), **_WORKSPACE_READ},
    },
    ("/api/workspaces/{workspace_id}/dead-letters", "get"): {
        "summary": "Changes that could not be delivered",
        "description": _WORKSPACE_NOTE,
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("dead letters"), **_WORKSPACE_READ},
    },
    ("/api/workspaces/{workspace_id}/dead-letters/{key}/retry", "post"): {
        "summary": "Queue a dead letter for delivery again",
        "description": "Needs the editor role for the workspace.",
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("requeued rows"), **_WORKSPACE_READ, "404": _error("no such dead letter")},
    },
    ("/api/workspaces/{workspace_id}/dead-letters/{key}", "delete"): {
        "summary": "Discard a dead letter (recorded in the audit trail)",
        "description": "Needs the editor role for the workspace.",
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("discarded rows"), **_WORKSPACE_READ, "404": _error("no such dead letter")},
    },
    ("/api/workspaces/{workspace_id}/backend-changes", "post"): {
        "summary": "The backend's change hook: a data source changed outside the server",
        "description": "Called by the data-source backend (`Authorization: Bearer <COLLAB_BACKEND_TOKEN>`, or a "
        'JWT with `"role": "service"`) with the data source\'s whole `config` and its `version`. The '
        "difference from the known backend state is applied to the document as one server change authored "
        "`backend` (broadcast, stored, audited, not forwarded back); locked paths too (the holder gets "
        "`lock.overridden`). An integer version older than the known one is ignored. See "
        "docs/backend-contract.md.",
        "tags": ["forwarding"],
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "required": ["config"],
                        "properties": {"config": {"type": "object"}, "version": {"type": ["string", "integer"]}},
                    }
                }
            },
        },
        "responses": {
            "200": _json(
                "merged (`paths`: what changed in the document; `applied: false`: an older version)",
                {
                    "type": "object",
                    "properties": {
                        "workspace": {"type": "string"},
                        "version": {"type": ["string", "null"]},
                        "applied": {"type": "boolean"},
                        "paths": {"type": "array", "items": {"type": "string"}},
                    },
                },
            ),
            "400": _error("not {config, version}"),
            "401": _error("not the backend"),
            "503": _error("the workspace cannot be opened now (retry)"),
        },
    },
    ("/api/workspaces/{workspace_id}/config", "get"): {
        "summary": "The workspace's configuration, with its change sequence number as ETag",
        "description": _WORKSPACE_NOTE + " Opens the workspace if needed (evicted again after the grace).",
        "tags": ["edits"],
        "security": [{"bearer": []}],
        "responses": {"200": _json('`{workspace, seq, config}`; header `ETag: "<seq>"`'), **_WORKSPACE_READ},
    },
    ("/api/workspaces/{workspace_id}/config", "patch"): {
        "summary": "Edit the configuration with a JSON Merge Patch (RFC 7396)",
        "description": "Needs the editor role. Applied as one server change under the rules of a websocket "
        "edit: locks (409 naming the holder, unless `X-Lock-Token` is the lock's token, from `lock.granted`), "
        "validation (422, the shape of `rejected`), audit with the caller as author, forwarding, broadcast. "
        '`If-Match: "<seq>"` makes it conditional. Works whether or not the workspace is open.',
        "tags": ["edits"],
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "X-Lock-Token", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/merge-patch+json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "200": _json('applied: `{workspace, seq, config, paths}`; header `ETag: "<seq>"`'),
            "400": _error("not a JSON object"),
            **_AUTH,
            "409": _json("a path is locked by someone else: `{error, paths, path, holder, user_id, name}`"),
            "412": _json("`If-Match` is not the current seq: `{error, seq}`"),
            "415": _error("not application/merge-patch+json or application/json"),
            "422": _json("invalid: `{paths, reason, errors}` as in `rejected`; nothing stored"),
            "503": _error("the workspace cannot be opened now (retry)"),
        },
    },
    ("/api/bulk", "post"): {
        "summary": "Start a bulk job: one merge patch for many workspaces",
        "description": "Needs the editor role in every workspace named. Body: `{workspaces: [...], patch, "
        "batch_size (50), parallelism (4), rollback_on_failure (false)}`. The job is stored and survives a "
        "restart; each item is applied like a PATCH; with `rollback_on_failure` a refused item stops the job "
        "and the applied items are undone by compensating changes.",
        "tags": ["edits"],
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
        "responses": {"202": _json("`{job, state, status, events}`"), "400": _error("bad request"), **_AUTH},
    },
    ("/api/bulk/{job}", "get"): {
        "summary": "A bulk job's state and every workspace's outcome",
        "description": "Item states: pending, applying, applied, refused (with `reason`), rolled_back, skipped.",
        "tags": ["edits"],
        "security": [{"bearer": []}],
        "responses": {"200": _json("`{id, state, counts, total, items}`"), **_AUTH, "404": _error("no such job")},
    },
    ("/api/bulk/{job}/events", "get"): {
        "summary": "Server-sent events of a bulk job",
        "description": "`job` and `item` events (the current state first, then each change), then `end`.",
        "tags": ["edits"],
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_AUTH,
            "404": _error("no such job"),
        },
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "Readiness": {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "RoomSummary": {
        "type": "object",
        "properties": {
            "workspace": {"type": "string"},
            "peers": {"type": "integer"},
            "users": {"type": "integer"},
            "participants": {"type": ["integer", "null"]},
            "locks": {"type": ["integer", "null"]},
            "loaded": {"type": "boolean"},
            "failed": {"type": ["string", "null"]},
            "size_bytes": {"type": "integer"},
            "durable_seq": {"type": "integer"},
        },
    },
}


def http_operations(routes: list[BaseRoute]) -> list[tuple[str, str, Any]]:
    """(OpenAPI path, lower-case method, endpoint) for every HTTP route; mounts as ``{path}``."""
    out = []
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    out.append((route.path, method.lower(), route.endpoint))
        elif isinstance(route, Mount):
            out.append((route.path.rstrip("/") + "/{path}", "get", route.app))
    return out


def _requirements(routes: list[BaseRoute]) -> dict[tuple[str, str], Any]:
    """(path, method) -> the requirement the gate enforces (``collab.gate``)."""
    from collab.gate import UngatedRoute, route_table

    try:
        table = route_table(routes)
    except UngatedRoute:  # not a server's routes (the app refuses those): nothing to add
        return {}
    return {(path, method.lower()): requires for path, method, requires in table if method != "WEBSOCKET"}


def build(routes: list[BaseRoute], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    requirements = _requirements(routes)
    for path, method, endpoint in http_operations(routes):
        operation = dict(OPERATIONS.get((path, method)) or _from_docstring(endpoint))
        requires = requirements.get((path, method))
        if requires is not None:
            # The answers of the gate, from the same declaration it enforces.
            operation["x-requires"] = requires.describe()
            responses = dict(operation.get("responses", {}))
            if not requires.public:
                operation.setdefault("security", [{"bearer": []}])
                responses.setdefault("401", _error("no credentials, a bad token, or an expired one"))
                responses.setdefault("403", _error("the credentials do not grant the role this needs"))
            if "{workspace_id}" in path:
                responses.setdefault("404", _error("invalid workspace id"))
            operation["responses"] = responses
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in _path_params(path)
        ]
        if params or "parameters" in operation:
            operation["parameters"] = params + list(operation.get("parameters", []))
        operation.setdefault("operationId", f"{method}_{_slug(path)}")
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "datasource-collab",
            "version": version,
            "description": "HTTP endpoints of the collaboration server. Clients edit through the websocket "
            "`/ws/{workspace_id}` (Yjs sync and awareness, plus control messages; see docs/protocol.md). "
            'Errors are JSON objects `{"error": "..."}`.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A token as in docs/security.md (`workspaces` claim gives the role per workspace).",
                }
            },
        },
    }


def _path_params(path: str) -> list[str]:
    import re

    return re.findall(r"{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?}", path)


def _slug(path: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"


def _from_docstring(endpoint: Any) -> dict[str, Any]:
    doc = inspect.getdoc(endpoint) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else "(undocumented)"
    return {"summary": summary, "x-undocumented": True, "responses": {"200": {"description": "see the summary"}}}
