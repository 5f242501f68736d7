"""Extensions: how features (locks, presence, forwarding...) plug into the app.

An extension contributes any of: control-message handlers, update guards,
room listeners (lifecycle hooks), HTTP routes, and start/stop/readiness
coroutines. ``create_app`` builds the rooms with the union of what every
extension contributes, in the order the extensions are listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from rooms.config import UpdateGuard
from rooms.room import ControlHandler

if TYPE_CHECKING:
    from collab.app import App


class Extension:
    """Base class with empty defaults; override what the feature needs."""

    name = "extension"

    def control_handlers(self) -> dict[str, ControlHandler]:
        return {}

    def guards(self) -> list[UpdateGuard]:
        return []

    def listeners(self) -> list[Any]:
        """Room listeners (objects with on_join/on_leave/on_awareness/on_config_change)."""
        return []

    def routes(self) -> list[BaseRoute]:
        """HTTP routes, each built with ``collab.gate.GatedRoute`` / ``GatedMount`` and its ``requires=``.

        The app refuses any other route when it is built: every route declares
        who may call it, and the gate checks that before the endpoint runs.
        """
        return []

    async def start(self, app: App) -> None:
        """Called once at startup, after the document store is open."""

    def closing(self) -> None:
        """The server is about to shut down: end long-lived HTTP streams now."""

    async def stop(self) -> None:
        """Called once at shutdown, after rooms are flushed, before the store closes."""

    def room_summary(self, workspace_id: str) -> dict[str, Any]:
        """What this feature adds to the admin API's summary of a room (public answers, no private fields)."""
        return {}

    async def check(self) -> str | None:
        """Raise if the extension cannot serve (reported by /readyz, which then answers 503).

        May return a short text to report instead of "ok" (e.g. a dependency
        that is down but not required).
        """
