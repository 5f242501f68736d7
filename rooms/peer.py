"""A room's view of a connection: anything that can queue a frame and close, and what the room remembers of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from codec import protocol as p


class Peer(Protocol):
    """What a room needs of a connection."""

    def send(self, frame: bytes) -> None:
        """Queue a frame; never blocks. Closes the peer itself on overflow."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection (idempotent)."""


T = TypeVar("T")


class Slot(Generic[T]):
    """A typed place for one extension's state about one connection, kept on its ``PeerState``.

    Each feature makes its slot once (``_LOCKS = Slot[LockConnection]("locks")``);
    the state lives and dies with the connection's record instead of in a
    side table keyed by it, and no feature can read another's by accident.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"

    def get(self, ps: PeerState) -> T | None:
        slots = ps.slots
        return slots.get(self) if slots else None

    def set(self, ps: PeerState, value: T) -> None:
        if ps.slots is None:
            ps.slots = {}
        ps.slots[self] = value

    def pop(self, ps: PeerState) -> T | None:
        slots = ps.slots
        return slots.pop(self, None) if slots else None


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
    slots: dict[Slot[Any], Any] | None = None  # each extension's state about this connection (see Slot)

    @property
    def read_only(self) -> bool:
        """A viewer: its updates are refused (and compensated), the rest works."""
        return getattr(self.identity, "role", None) == "viewer"

    def control(self, body: dict[str, Any]) -> None:
        """Send a control message, only if the peer opted in with hello."""
        if self.wants_control and self.alive:
            self.peer.send(p.encode_control(body))
