"""Leases on configuration paths: the model every lock backend implements.

A *lease* is a time-limited lock on one configuration path of one workspace,
held by one *holder* (an opaque id: one connection of one user). A lease on
``connection`` covers ``connection.host``; leases of different holders on
overlapping paths conflict. Every grant carries a *fencing token* (``fence``):
a per-workspace counter that only ever increases, also across a loss of the
backend's data (see :class:`locks.fence.FenceKeeper`).

Each lease has its own random ``token``. Renewing or releasing needs the token,
so a holder can only ever touch its own lease -- never one granted later to
someone else for the same path (the mistake redis-py's ``Lock`` makes by keeping
its token in a thread-local shared by every asyncio task).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from rooms.config import overlaps

__all__ = [
    "Lease",
    "LeaseManager",
    "LockError",
    "LockConflict",
    "LockUnavailable",
    "LockNotHeld",
    "LockEvent",
    "new_token",
    "overlaps",
]


def new_token() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Lease:
    workspace: str
    path: str
    holder: str  # opaque holder id: one connection
    user_id: str
    fence: int
    expires_at: float  # unix seconds
    token: str  # secret of this lease; needed to renew or release it
    name: str = ""  # display name of the user, for "locked by ..."
    ttl: float = 0.0  # seconds the last grant or renewal asked for

    def public(self) -> dict[str, Any]:
        """What any participant may see (everything but the token)."""
        return {
            "path": self.path,
            "holder": self.holder,
            "user_id": self.user_id,
            "name": self.name,
            "fence": self.fence,
            "expires_at": round(self.expires_at, 3),
        }

    def with_expiry(self, expires_at: float, ttl: float | None = None) -> Lease:
        return replace(self, expires_at=expires_at, ttl=self.ttl if ttl is None else ttl)


class LockError(Exception):
    """Base class of lock failures; ``code`` is the wire error code."""

    code = "error"


class LockConflict(LockError):
    """Someone else holds an overlapping path (or is queued ahead for one).

    ``lease`` is the conflicting lease when one is known (its token blanked);
    ``queued`` is True when the path is free but earlier waiters come first.
    """

    code = "conflict"

    def __init__(self, path: str, lease: Lease | None = None, queued_path: str | None = None) -> None:
        self.path = path
        self.lease = replace(lease, token="") if lease is not None else None
        self.queued_path = queued_path
        if lease is not None:
            msg = f"{path!r} conflicts with {lease.path!r} held by {lease.user_id} until {lease.expires_at:.3f}"
        else:
            msg = f"{path!r} is free but waiters for {queued_path!r} come first"
        super().__init__(msg)

    @property
    def queued(self) -> bool:
        return self.lease is None

    @property
    def expires_at(self) -> float | None:
        return self.lease.expires_at if self.lease is not None else None


class LockUnavailable(LockError):
    """The lock backend cannot be reached (fail fast, nothing was granted)."""

    code = "unavailable"


class LockNotHeld(LockError):
    """The lease is not (or no longer) held under this token.

    ``reason``: ``gone`` (expired or released), ``taken`` (another lease holds
    the path now).
    """

    code = "not_held"

    def __init__(self, message: str, reason: str = "gone") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LockEvent:
    """A change of lock state a backend reports to subscribers.

    ``kind``: acquired, released, forced (admin release), lost (a holder found
    its lease gone), expired (seen lapsing), reset (events may have been
    missed: re-read everything).
    """

    workspace: str
    kind: str
    path: str = ""
    holder: str = ""
    fence: int = 0


LockListener = Callable[[LockEvent], None]


@runtime_checkable
class LeaseManager(Protocol):
    """What a lock backend offers. Every method may raise LockUnavailable."""

    async def start(self) -> None:
        """Connect; called once before use."""

    async def close(self) -> None:
        """Disconnect; leases already granted are left to their TTL."""

    async def acquire(
        self,
        workspace: str,
        path: str,
        holder: str,
        user_id: str,
        ttl: float,
        wait: float = 0.0,
        *,
        name: str = "",
        token: str | None = None,
    ) -> Lease:
        """Grant a lease on ``path`` or raise LockConflict.

        With ``wait`` > 0, queue (first come, first served among waiters of
        overlapping paths) for up to ``wait`` seconds before giving up. If the
        same holder already holds exactly this path, that lease is returned
        with its TTL extended. Overlapping paths of the same holder do not
        conflict with each other.
        """

    async def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        """Extend the lease to ``ttl`` from now; LockNotHeld if it was lost."""

    async def release(self, lease: Lease) -> None:
        """Release the lease; LockNotHeld if it was not held under its token."""

    async def list(self, workspace: str) -> list[Lease]:
        """The live leases of a workspace (tokens blanked)."""

    async def force_release(self, workspace: str, path: str) -> Lease | None:
        """Administrative release of whatever lease is on exactly ``path``."""

    def subscribe(self, listener: LockListener) -> None:
        """Call ``listener(event)`` on every change of lock state seen."""

    async def check(self) -> None:
        """Raise LockUnavailable if the backend cannot serve."""
