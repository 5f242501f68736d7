"""A room's view of a connection: anything that can queue a frame and close, and what the room remembers of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from codec import protocol as p


class Peer(Protocol):
    """What a room needs of a connection."""

    def send(self, frame: bytes) -> None:
        """Queue a frame; never blocks. Closes the peer itself on overflow."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection (idempotent)."""


@dataclass(eq=False, slots=True)
class PeerState:
    """What the room remembers about one connected peer."""

    peer: Peer
    epoch: int
    identity: Any = None  # collab.auth.Identity when joined through the server
    wants_control: bool = False
    client_ids: set[int] = field(default_factory=set)
    updates_received: int = 0
    updates_acked: int = 0
    alive: bool = True
    last_seen: float = 0.0  # room.clock.monotonic() of the last message received (liveness of lock holders)
    remote: str | None = None  # node id: stands for the clients of another node (scale-out relay)

    @property
    def read_only(self) -> bool:
        """A viewer: its updates are refused (and compensated), the rest works."""
        return getattr(self.identity, "role", None) == "viewer"

    def control(self, body: dict[str, Any]) -> None:
        """Send a control message, only if the peer opted in with hello."""
        if self.wants_control and self.alive:
            self.peer.send(p.encode_control(body))
