"""One authorization gate for every route of the server.

Every HTTP route and the websocket declare, where they are registered, what
they need (a :class:`Requirement`): nothing (``PUBLIC``), a role in the
workspace of the path (``workspace_role("viewer")``), a server-wide role
(``server_role("admin")``: only a token's ``"*"`` grant counts) or a service
credential (``service("metrics")``: that service's shared token, or a
server-wide admin, or a JWT with the claim role "service"). Routes are built with :class:`GatedRoute`,
:class:`GatedMount` and :class:`GatedWebSocketRoute`, whose ``requires`` is a
required keyword; the app refuses, when it is built, any route that is not
one of them (:func:`requirement_of`). One :class:`Gate` then checks every
request before its endpoint runs:

* a ``{workspace_id}`` in the path that is not a valid workspace id: 404;
* no credentials, a bad or an expired token: 401 (``WWW-Authenticate: Bearer``);
* a valid token without the role (wrong workspace, too low a role): 403;

always as JSON ``{"error": "..."}``. The endpoint finds who asked in
``request.state.identity`` and the checked workspace id in
``request.state.workspace_id``. The websocket authenticates in its own way
(a token may come in the first message), then calls :meth:`Gate.authorize`,
the same function, whose refusals become close codes 4401 / 4403.

The route table in docs/security.md is rendered from these declarations
(``python -m collab.security_doc``), and tests/test_gate.py walks every route
of the app with every kind of token.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from collab.auth import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, ROLE_RANK, ROLES, AuthError, Identity, bearer_token

if TYPE_CHECKING:
    from collab.auth import Authenticator
    from collab.settings import Settings

# Workspace ids are path segments: letters, digits and . _ : - (case-sensitive).
WORKSPACE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

SCOPES = ("none", "workspace", "server")


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a route needs: ``role`` (``public``, a role of ``ROLES``, or ``service``) and where it counts."""

    role: str
    scope: str = "none"  # "workspace": in the path's workspace; "server": the "*" grant
    service: str | None = None  # for role "service": whose shared token

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}")
        if self.role == "public":
            if self.scope != "none":
                raise ValueError("a public route has no scope")
        elif self.role == "service":
            if not self.service or self.scope != "server":
                raise ValueError("a service requirement names its service and is server-wide")
        elif self.role not in ROLES or self.scope == "none":
            raise ValueError(f"role {self.role!r} needs a known role and a scope (workspace or server)")

    @property
    def public(self) -> bool:
        return self.role == "public"

    def describe(self) -> str:
        """Short text for the route table in docs/security.md."""
        if self.public:
            return "public"
        if self.role == "service":
            return f"{self.service} token, a service JWT, or server admin"
        if self.scope == "server":
            return f'{self.role} (server-wide, `"*"` grant)'
        return f"{self.role} in the workspace" if self.role == "admin" else f"{self.role} or higher in the workspace"


PUBLIC = Requirement("public")


def workspace_role(role: str) -> Requirement:
    """At least ``role`` in the workspace named by the path."""
    return Requirement(role, "workspace")


def server_role(role: str = "admin") -> Requirement:
    """At least ``role`` in every workspace (a token's ``"*"`` grant)."""
    return Requirement(role, "server")


def service(name: str) -> Requirement:
    """The shared token configured for service ``name`` (e.g. ``COLLAB_METRICS_TOKEN``), or a server admin."""
    return Requirement("service", "server", name)


class UngatedRoute(TypeError):
    """A route registered without a declared requirement."""


def _checked(requires: Any, path: str) -> Requirement:
    if not isinstance(requires, Requirement):
        raise UngatedRoute(f"route {path!r} must declare requires=<Requirement>, got {requires!r}")
    return requires


class GatedRoute(Route):
    """A Starlette ``Route`` whose endpoint runs only after the gate let the request through."""

    def __init__(self, path: str, endpoint: Any, *, requires: Requirement, methods: list[str] | None = None) -> None:
        self.requires = _checked(requires, path)
        self.gate: Gate | None = None

        @functools.wraps(endpoint)
        async def gated(request: Request) -> Any:
            if self.gate is None:  # never served without a gate: fail closed
                raise HTTPException(500, "route not bound to the authorization gate")
            await self.gate.check(request, self.requires)
            return await endpoint(request)

        super().__init__(path, gated, methods=methods, name=getattr(endpoint, "__name__", None))


class GatedMount(Mount):
    """A mounted ASGI app (static files). Only public mounts: files behind a role belong in a route."""

    def __init__(self, path: str, app: Any, *, requires: Requirement, name: str | None = None) -> None:
        self.requires = _checked(requires, path)
        if not self.requires.public:
            raise ValueError(f"mount {path!r}: only public mounts are supported")
        self.gate: Gate | None = None
        super().__init__(path, app=app, name=name)


class GatedWebSocketRoute(WebSocketRoute):
    """The websocket route; its endpoint authenticates and then calls ``Gate.authorize``."""

    def __init__(self, path: str, endpoint: Any, *, requires: Requirement) -> None:
        self.requires = _checked(requires, path)
        if self.requires.public or self.requires.scope != "workspace":
            raise ValueError("a websocket joins a workspace: it needs a workspace role")
        self.gate: Gate | None = None
        super().__init__(path, endpoint)


GATED = (GatedRoute, GatedMount, GatedWebSocketRoute)


def requirement_of(route: BaseRoute) -> Requirement:
    """The declared requirement of a route; raises :class:`UngatedRoute` for any other route."""
    if not isinstance(route, GATED):
        raise UngatedRoute(
            f"route {getattr(route, 'path', route)!r} was registered without a requirement: "
            "build it with collab.gate.GatedRoute / GatedMount / GatedWebSocketRoute(requires=...)"
        )
    return route.requires


def route_table(routes: list[BaseRoute]) -> list[tuple[str, str, Requirement]]:
    """``(path, method, requirement)`` for every route, in registration order."""
    table: list[tuple[str, str, Requirement]] = []
    for route in routes:
        requires = requirement_of(route)
        if isinstance(route, GatedWebSocketRoute):
            table.append((route.path, "WEBSOCKET", requires))
        elif isinstance(route, GatedMount):
            table.append((route.path.rstrip("/") + "/{path}", "GET", requires))
        else:
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    table.append((route.path, method, requires))
    return table


class GateError(Exception):
    """Refused: ``status`` is 401, 403 or 404 (HTTP); ``close_code`` is what a websocket gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @property
    def close_code(self) -> int:
        return CLOSE_UNAUTHENTICATED if self.status == 401 else CLOSE_FORBIDDEN

    def http(self) -> HTTPException:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return HTTPException(self.status, self.reason, headers=headers)


def check_workspace_id(workspace_id: str) -> str:
    """The one workspace-id check of the server: 404 for anything that can't be one."""
    if not isinstance(workspace_id, str) or not WORKSPACE_ID.fullmatch(workspace_id):
        raise GateError(404, "invalid workspace id")
    return workspace_id


def loopback(conn: HTTPConnection) -> bool:
    """The request comes from this machine (after X-Forwarded-For from a trusted proxy)."""
    host = conn.client.host if conn.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def acts_as_service(identity: Identity, name: str) -> bool:
    """A verified JWT issued to a service: claim role "service" (and claim service = name, if it names one).

    Such a token still needs a "*" grant (of any role) to be verified for
    server-wide routes; the claim is what makes it that service's credential.
    """
    claims = getattr(identity, "claims", None) or {}
    named = claims.get("service")
    return claims.get("role") == "service" and (named is None or named == name)


class Gate:
    """Authenticates and authorizes every request against its route's requirement."""

    def __init__(self, authenticator: Authenticator, settings: Settings) -> None:
        self.authenticator = authenticator
        self.development = settings.auth_mode == "development"
        metrics = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else ""
        self.service_tokens: dict[str, str] = {"metrics": metrics}

    def bind(self, routes: list[BaseRoute]) -> list[BaseRoute]:
        """Check that every route declares a requirement (raises otherwise) and serve it through this gate."""
        for route in routes:
            requirement_of(route)
            route.gate = self  # type: ignore[union-attr]
        return routes

    async def check(self, conn: HTTPConnection, requires: Requirement) -> Identity | None:
        """Authenticate and authorize one HTTP request; raise HTTPException (JSON error) if refused."""
        try:
            workspace_id = self._workspace_of(conn)
            conn.state.workspace_id = workspace_id
            if requires.public:
                conn.state.identity = None
                return None
            if requires.role == "service":
                identity = await self._service(conn, requires)
            else:
                identity = await self._authenticate(conn, workspace_id if requires.scope == "workspace" else None)
                self.authorize(identity, requires, conn)
        except GateError as exc:
            raise exc.http() from None
        conn.state.identity = identity
        return identity

    def authorize(self, identity: Identity | None, requires: Requirement, conn: HTTPConnection) -> None:
        """Does ``identity`` (already authenticated for the right scope) meet ``requires``? GateError if not.

        The one authorization rule, for HTTP routes and the websocket alike.
        """
        if requires.public:
            return
        if identity is None:
            raise GateError(401, "bearer token required")
        role = requires.role if requires.role != "service" else "admin"
        if ROLE_RANK.get(getattr(identity, "role", None), -1) < ROLE_RANK[role]:
            raise GateError(403, f"the {role} role is required")
        if getattr(identity, "development", False) and role == "admin" and not loopback(conn):
            # Development identities are made up from the query string: never
            # let one administer the server from another machine.
            raise GateError(403, "development mode: admin endpoints answer loopback clients only")

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _workspace_of(conn: HTTPConnection) -> str | None:
        if "workspace_id" not in conn.path_params:
            return None
        return check_workspace_id(conn.path_params["workspace_id"])

    async def _authenticate(self, conn: HTTPConnection, workspace_id: str | None) -> Identity | None:
        try:
            return await self.authenticator.authenticate(conn, workspace_id)
        except AuthError as exc:
            raise GateError(403 if exc.code == CLOSE_FORBIDDEN else 401, exc.reason) from None

    async def _service(self, conn: HTTPConnection, requires: Requirement) -> Identity | None:
        """The service's own token, or a verified (not development) server admin.

        Development mode without a configured token leaves the service open,
        as the rest of development mode is.
        """
        secret = self.service_tokens.get(requires.service or "", "")
        try:
            presented = bearer_token(conn)
        except AuthError as exc:
            raise GateError(401, exc.reason) from None
        if secret and presented is not None and hmac.compare_digest(presented.encode(), secret.encode()):
            return None
        if not secret and self.development:
            return None
        if presented is None:
            raise GateError(401, f"{requires.service} token (or an admin token) required")
        identity = await self._authenticate(conn, None)
        if identity is None or getattr(identity, "development", False):
            raise GateError(401, f"{requires.service} token (or an admin token) required")
        if acts_as_service(identity, requires.service or ""):
            return identity
        self.authorize(identity, requires, conn)
        return identity
