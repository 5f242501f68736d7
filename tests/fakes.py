"""What unit tests stand in for: peers, identities, rooms, and one way to wait.

A room needs only peers with ``send(frame)`` and ``close(code, reason)``, an
identity with ``user_id``/``role``, and a store; these builders give real
rooms over a real SQLite store in a temp dir, with fake peers that decode
every frame through the real codec (so a room that sent an invalid frame
fails the test that made it).
"""

from __future__ import annotations

import asyncio

from clocks import ManualClock  # noqa: F401  (time for tests: see docs/testing.md)
from codec import protocol as p
from collab.auth import Identity
from rooms.peer import PeerState
from rooms.room import Room, RoomTuning
from tests.support import eventually  # noqa: F401  (the one way to wait for state with no event)


class FakePeer:
    """Records what the room sends; decoding every frame also checks the room only sends valid frames."""

    def __init__(self, name: str = "peer", on_send=None) -> None:
        self.name = name
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.on_send = on_send

    def send(self, frame: bytes) -> None:
        assert isinstance(frame, bytes)
        self.frames.append(frame)
        if self.on_send is not None:
            self.on_send(self, p.decode_message(frame))

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def messages(self) -> list[p.Message]:
        return [p.decode_message(f) for f in self.frames]

    def take(self) -> list[p.Message]:
        """The messages received so far; forget them."""
        out = self.messages()
        self.frames.clear()
        return out

    def __repr__(self) -> str:
        return f"FakePeer({self.name})"


def identity(user: str, role: str = "editor", **kw) -> Identity:
    """An authenticated user as the gate would bind it."""
    return Identity(user_id=user, name=kw.pop("name", user.title()), color=kw.pop("color", "#000000"), role=role, **kw)


def peer_state(user: str = "alice", epoch: int = 1, role: str = "editor", hello: bool = True) -> PeerState:
    """What a room remembers of a connection, without a room (for the room's parts tested alone)."""
    return PeerState(peer=FakePeer(user), epoch=epoch, identity=identity(user, role), wants_control=hello)


async def open_room(store, workspace: str = "ds-1", clock=None, **tuning) -> Room:
    """A loaded room over ``store`` (a real store), tuned by keyword; ``clock``: e.g. a clocks.ManualClock."""
    room = Room(workspace, store, RoomTuning(**tuning), clock=clock)
    await asyncio.wait_for(room.load(), 10)
    return room


async def settle(room: Room) -> None:
    """Flush and wait (bounded) until everything received is durable."""
    await asyncio.wait_for(room.drain(), 10)
