"""Who is connecting: the authentication hook.

Every connection is bound to an :class:`Identity` before it joins a room.
Deployments plug in their own :class:`Authenticator` (``COLLAB_AUTHENTICATOR=
module:factory``, or ``create_app(authenticator=...)``). Two come with the
server:

* :class:`JWTAuthenticator` (``COLLAB_AUTH_MODE=jwt``, production): signed
  tokens, HS256 with a shared secret or RS256/ES256 with a public key, read
  from ``Authorization: Bearer``, the ``token`` query parameter, or the first
  control message ``{"type": "auth", "token": ...}``.
* :class:`DevelopmentAuthenticator` (the default, ``make run``): trusts
  ``?user=alice&name=Alice&role=editor`` from the query string, or makes up
  an anonymous editor. Never expose it to a network.

Token claims (see docs/security.md)::

    {"sub": "u-42", "name": "Alice", "exp": 1767225600,
     "workspaces": {"ds-1": "editor", "ds-2": "viewer", "*": "viewer"}}

``workspaces`` may also be a list of ``{"id": ..., "role": ...}``; ``"*"``
grants a role in every workspace not listed by name.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from collab.settings import Settings

ROLES = ("viewer", "editor", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_USER_ID = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
COLOR = re.compile(r"#[0-9A-Fa-f]{6}")  # a token's `color` claim

CLOSE_UNAUTHENTICATED = 4401  # no token, a bad one, or it expired
CLOSE_FORBIDDEN = 4403  # a valid token without access to this workspace


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    name: str
    color: str
    role: str = "editor"  # role in the workspace being joined
    development: bool = False  # made up by the development authenticator
    claims: dict[str, Any] = field(default_factory=dict, compare=False)
    expires_at: float | None = None  # unix time the credentials expire (token `exp`)
    # Which of name/color the authenticator really knows (a token's `name` claim, a
    # configured colour). Only these overwrite what a client puts in its awareness
    # `user`; made-up ones (a default name, a colour derived from the id) don't.
    vouched: frozenset[str] = frozenset({"name"})

    def public(self) -> dict[str, Any]:
        """What other participants may see."""
        return {"id": self.user_id, "name": self.name, "color": self.color, "role": self.role}

    def has_role(self, role: str) -> bool:
        """At least ``role`` in this workspace (viewer < editor < admin)."""
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]


def has_role(identity: Any, role: str) -> bool:
    """``identity`` (or a PeerState's ``identity``) holds at least ``role``.

    The one role comparison of the server: the gate (``collab.gate``), the
    app's control-message check (``collab.app.CONTROL_ROLES``) and the lock
    handlers (``"editor"`` before acquiring, ``"admin"`` before
    force-releasing) all use it. A peer without an identity (rooms built in
    tests) counts as an editor.
    """
    if identity is None:
        return ROLE_RANK["editor"] >= ROLE_RANK[role]
    return ROLE_RANK.get(getattr(identity, "role", None), -1) >= ROLE_RANK[role]


class AuthError(Exception):
    """Authentication (4401) or authorization (4403) failed."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Authenticator(Protocol):
    async def authenticate(self, conn: HTTPConnection, workspace_id: str | None) -> Identity | None:
        """The identity for this connection (websocket handshake or HTTP request).

        Raise AuthError to refuse. Return None when the handshake carries no
        credentials at all: a websocket then has ``COLLAB_PREAUTH_TIMEOUT``
        seconds to send ``{"type": "auth", "token": ...}`` as its first
        control message, handed to ``authenticate_token`` (if the
        authenticator has one). ``workspace_id`` is None for requests not
        about one workspace (global admin endpoints).
        """


class TokenAuthenticator(Authenticator, Protocol):
    async def authenticate_token(self, token: str, workspace_id: str | None) -> Identity:
        """Verify a token sent in a control message (first message or refresh)."""


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of ``Authorization: Bearer``, else of the ``token`` query parameter."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError(CLOSE_UNAUTHENTICATED, "Authorization header must be 'Bearer <token>'")
        return value.strip()
    token = conn.query_params.get("token")
    return token or None


def role_in(grants: Any, workspace_id: str | None) -> str | None:
    """The role a ``workspaces`` claim gives in a workspace (None: no access).

    For ``workspace_id=None`` (global endpoints) only the ``"*"`` grant counts.
    """
    if isinstance(grants, list):
        table: dict[str, Any] = {}
        for entry in grants:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                table[entry["id"]] = entry.get("role")
        grants = table
    if not isinstance(grants, dict):
        return None
    role = grants.get(workspace_id) if workspace_id is not None else None
    if role is None:
        role = grants.get("*")
    return role if role in ROLES else None


class JWTAuthenticator:
    """Signed tokens (PyJWT). The key and algorithms come from the settings.

    HMAC and public-key algorithms are never mixed (the settings refuse it),
    so a token signed with the public key as an HMAC secret cannot pass.
    ``exp`` and ``sub`` are required.
    """

    def __init__(
        self,
        key: Any,
        algorithms: list[str],
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        import jwt  # PyJWT

        self._jwt = jwt
        self.key = key
        self.algorithms = list(algorithms)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> JWTAuthenticator:
        return cls(
            settings.jwt_key(),
            settings.jwt_algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway,
        )

    async def authenticate(self, conn: HTTPConnection, workspace_id: str | None) -> Identity | None:
        token = bearer_token(conn)
        if token is None:
            return None
        return self.verify(token, workspace_id)

    async def authenticate_token(self, token: str, workspace_id: str | None) -> Identity:
        if not isinstance(token, str) or not token:
            raise AuthError(CLOSE_UNAUTHENTICATED, "auth message needs a string 'token'")
        return self.verify(token, workspace_id)

    def decode(self, token: str) -> dict[str, Any]:
        jwt = self._jwt
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        try:
            return jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CLOSE_UNAUTHENTICATED, "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(CLOSE_UNAUTHENTICATED, f"invalid token ({type(exc).__name__})") from None

    def verify(self, token: str, workspace_id: str | None) -> Identity:
        claims = self.decode(token)
        return identity_from_claims(claims, workspace_id)


def identity_from_claims(claims: dict[str, Any], workspace_id: str | None) -> Identity:
    """Build the identity of verified claims for one workspace (4403 if none)."""
    user = claims.get("sub")
    if not isinstance(user, str) or not user or len(user) > 256:
        raise AuthError(CLOSE_UNAUTHENTICATED, "token 'sub' must be a non-empty string")
    role = role_in(claims.get("workspaces"), workspace_id)
    if role is None:
        where = f"workspace {workspace_id!r}" if workspace_id is not None else "this endpoint"
        raise AuthError(CLOSE_FORBIDDEN, f"token grants no access to {where}")
    name, color = claims.get("name"), claims.get("color")
    vouched = set()
    if isinstance(name, str) and name:
        vouched.add("name")
    if isinstance(color, str) and COLOR.fullmatch(color):
        vouched.add("color")
    name = name[:80] if "name" in vouched else user[:80]
    color = color if "color" in vouched else color_for(user)
    exp = claims.get("exp")
    return Identity(
        user_id=user,
        name=name,
        color=color,
        role=role,
        claims=claims,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        vouched=frozenset(vouched),
    )


def color_for(user_id: str) -> str:
    """A stable, readable colour per user (same user, same colour everywhere)."""
    hue = int(hashlib.sha256(user_id.encode()).hexdigest()[:4], 16) % 360
    return _hsl_to_hex(hue, 0.65, 0.45)


def _hsl_to_hex(h: float, s: float, lightness: float) -> str:
    c = (1 - abs(2 * lightness - 1)) * s
    x = c * (1 - abs((h / 60) % 2 - 1))
    m = lightness - c / 2
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h // 60) % 6]
    return "#" + "".join(f"{round((v + m) * 255):02x}" for v in (r, g, b))


class DevelopmentAuthenticator:
    """DEVELOPMENT ONLY: believes whatever the query string says.

    With a ``jwt`` authenticator (a key configured in development mode), a
    connection that presents a token is verified like in production; one
    without a token still gets an identity from the query string.
    """

    def __init__(self, jwt: JWTAuthenticator | None = None) -> None:
        self._anon = itertools.count(1)
        self.jwt = jwt

    async def authenticate_token(self, token: str, workspace_id: str | None) -> Identity:
        if self.jwt is None:
            raise AuthError(CLOSE_UNAUTHENTICATED, "no token verifier configured (development mode)")
        return await self.jwt.authenticate_token(token, workspace_id)

    async def authenticate(self, conn: HTTPConnection, workspace_id: str | None) -> Identity:
        if self.jwt is not None:
            identity = await self.jwt.authenticate(conn, workspace_id)
            if identity is not None:
                return identity
        params = conn.query_params
        user = params.get("user")
        if user is None:
            user = f"anonymous-{next(self._anon)}"
        elif not _USER_ID.fullmatch(user):
            raise AuthError(4401, "invalid development user id")
        name = (params.get("name") or user)[:80]
        role = params.get("role", "editor")
        if role not in ROLES:
            raise AuthError(4401, f"unknown role {role!r}")
        # Only an explicit ?name= names the user; the made-up rest never overrides a client's own.
        vouched = frozenset({"name"}) if params.get("name") else frozenset()
        return Identity(user_id=user, name=name, color=color_for(user), role=role, development=True, vouched=vouched)


def authenticator_from_settings(settings: Settings) -> Authenticator:
    """The authenticator the settings ask for (a plug-in, jwt, or development)."""
    if settings.authenticator:
        module_name, _, attr = settings.authenticator.partition(":")
        if not attr:
            raise ValueError("COLLAB_AUTHENTICATOR must be 'module:callable'")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(settings)
    jwt_auth = JWTAuthenticator.from_settings(settings) if settings.jwt_key() else None
    if settings.auth_mode == "jwt":
        assert jwt_auth is not None  # the settings refuse jwt mode without a key
        return jwt_auth
    return DevelopmentAuthenticator(jwt_auth)
