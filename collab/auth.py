"""Who is connecting: the authentication hook.

Every connection is bound to an :class:`Identity` before it joins a room.
Deployments plug in their own :class:`Authenticator`; the default one is for
development only: it trusts ``?user=alice&name=Alice`` from the query string
(or makes up an anonymous user) and gives everyone the editor role.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import HTTPConnection

ROLES = ("viewer", "editor", "admin")
_USER_ID = re.compile(r"[A-Za-z0-9._@:-]{1,128}")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    name: str
    color: str
    role: str = "editor"  # role in the workspace being joined
    development: bool = False  # made up by the development authenticator
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    def public(self) -> dict[str, Any]:
        """What other participants may see."""
        return {"id": self.user_id, "name": self.name, "color": self.color, "role": self.role}


class AuthError(Exception):
    """Authentication (4401) or authorization (4403) failed."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Authenticator(Protocol):
    async def authenticate(self, conn: HTTPConnection, workspace_id: str) -> Identity:
        """Return the identity for this connection or raise AuthError."""


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
    """DEVELOPMENT ONLY: believes whatever the query string says."""

    def __init__(self) -> None:
        self._anon = itertools.count(1)

    async def authenticate(self, conn: HTTPConnection, workspace_id: str) -> Identity:
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
        return Identity(user_id=user, name=name, color=color_for(user), role=role, development=True)
