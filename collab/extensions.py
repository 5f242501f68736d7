"""The extension contract: how features (locks, presence, forwarding, the relay...) plug into the server.

Every hook is declared once, on ``Extension``, with empty defaults; a feature
overrides what it needs. An extension contributes control messages (each
with the workspace role its sender needs), update guards, room listeners
(``rooms.room.RoomListener``), HTTP routes, start/stop/readiness coroutines,
metrics and admin summaries. It sees the server only through ``Host`` (never
the app module), and the server reads it only through these hooks (never its
private fields). ``collab.app.default_extensions`` is the one place that
composes the default set, in hook order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import Metric
from starlette.routing import BaseRoute

from codec import protocol as p
from collab.auth import has_role
from rooms.config import UpdateGuard
from rooms.room import ControlHandler, PeerState, Room

if TYPE_CHECKING:
    from collab.auth import Authenticator
    from collab.gate import Gate
    from collab.settings import Settings
    from persistence.base import DocumentStore
    from rooms.manager import RoomManager


class Host(Protocol):
    """What an extension may use of the server it runs in (given to ``Extension.start``)."""

    settings: Settings
    store: DocumentStore
    rooms: RoomManager
    gate: Gate
    authenticator: Authenticator
    extensions: list[Extension]


@dataclass(frozen=True, slots=True)
class ControlRoute:
    """A control message type, its handler, and the workspace role its sender needs.

    The role is checked before the handler runs; a sender without it gets
    ``{"type": error_type, "code": "forbidden", ...}`` with the request's
    ``id`` and ``path``, and the handler never sees the message.
    """

    type: str
    handler: ControlHandler
    requires: str | None = None  # "viewer" | "editor" | "admin"; None: any participant
    error_type: str = "error"  # e.g. "lock.error", so clients match refusals to their requests

    def guarded(self) -> ControlHandler:
        """The handler, behind the role check."""
        if self.requires is None:
            return self.handler
        role, handler, route_type, error_type = self.requires, self.handler, self.type, self.error_type

        def check_role(room: Room, ps: PeerState, message: p.Control) -> None:
            if has_role(ps.identity, role):
                handler(room, ps, message)
                return
            body: dict[str, Any] = {
                "type": error_type,
                "code": "forbidden",
                "message": f"{route_type} needs the {role} role",
            }
            if "id" in message.body:
                body["id"] = message.body["id"]
            if isinstance(message.body.get("path"), str):
                body["path"] = message.body["path"]
            ps.control(body)

        return check_role


class Extension:
    """Base class with empty defaults; override what the feature needs."""

    name = "extension"

    # -- what the feature adds to every room

    def control_routes(self) -> list[ControlRoute]:
        """Control messages this feature answers (``hello``/``ping`` belong to the room)."""
        return []

    def guards(self) -> list[UpdateGuard]:
        """Checks on every change to ``config``, in order (``rooms.config.UpdateGuard``)."""
        return []

    def listeners(self) -> list[Any]:
        """Room listeners: objects implementing some of ``rooms.room.RoomListener``'s hooks."""
        return []

    def routes(self) -> list[BaseRoute]:
        """HTTP routes, each built with ``collab.gate.GatedRoute`` / ``GatedMount`` and its ``requires=``.

        The app refuses any other route when it is built: every route declares
        who may call it, and the gate checks that before the endpoint runs.
        """
        return []

    # -- lifetime

    async def start(self, host: Host) -> None:
        """Called once at startup, after the document store is open."""

    def closing(self) -> None:
        """The server is about to shut down: end long-lived HTTP streams now."""

    async def stop(self) -> None:
        """Called once at shutdown, after rooms are flushed, before the store closes."""

    async def check(self) -> str | None:
        """Raise if the extension cannot serve (reported by /readyz, which then answers 503).

        May return a short text to report instead of "ok" (e.g. a dependency
        that is down but not required).
        """
        return None

    # -- what the server reads of it (public answers, no private fields)

    def room_summary(self, workspace_id: str) -> dict[str, Any]:
        """What this feature adds to the admin API's summary of a room."""
        return {}

    async def room_report(self, workspace_id: str) -> dict[str, Any]:
        """What this feature adds to the admin API's full report on one room (``GET /api/admin/rooms/{id}``).

        May ask its backend (bounded); answers what this node knows when that fails.
        """
        return {}

    def admin_summary(self) -> dict[str, Any]:
        """This feature's state on this node, for the admin API's node summary (``GET /api/admin/rooms``)."""
        return {}

    def metrics(self) -> Iterable[Metric]:
        """Prometheus metric families of this feature (collected at each scrape)."""
        return ()

    def error_counts(self) -> dict[str, int]:
        """Errors of this feature by kind, added to ``collab_errors``."""
        return {}


def control_handlers(extensions: Iterable[Extension]) -> dict[str, ControlHandler]:
    """Every extension's control routes, each behind its role check, for a room.

    A type claimed by two extensions is a wiring error, raised at startup.
    """
    handlers: dict[str, ControlHandler] = {}
    for ext in extensions:
        for route in ext.control_routes():
            if route.type in handlers or route.type in ("hello", "ping", "auth"):
                raise ValueError(f"control message type {route.type!r} is claimed twice (again by {ext.name})")
            handlers[route.type] = route.guarded()
    return handlers
