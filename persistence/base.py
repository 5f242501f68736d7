"""The document store interface.

A document is a snapshot (one Yjs update holding the whole state up to
``snapshot_seq``) plus a tail of updates numbered ``snapshot_seq+1 ..
last_seq``. Updates are idempotent, so a snapshot that already contains some
tail updates is harmless: loading applies the snapshot, then the tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class StoreError(Exception):
    """The store could not do what was asked (disk full, database gone...)."""


@dataclass(slots=True)
class StoredDocument:
    snapshot: bytes | None = None
    snapshot_seq: int = 0
    updates: list[bytes] = field(default_factory=list)
    last_seq: int = 0
    # The chain token of the entry at ``last_seq`` (Redis): a relay reading on
    # from here checks that the next entry names it (scaleout/relay.py).
    tip: bytes | None = None

    @property
    def is_new(self) -> bool:
        return self.snapshot is None and not self.updates and self.last_seq == 0


@runtime_checkable
class DocumentStore(Protocol):
    async def open(self) -> None:
        """Prepare the store (create files, tables, connections)."""

    async def close(self) -> None:
        """Finish pending writes and release resources."""

    async def load(self, workspace_id: str) -> StoredDocument:
        """The stored snapshot and update tail of a workspace (empty if new)."""

    async def append(self, workspace_id: str, updates: list[bytes], outbox: list | None = None) -> int:
        """Durably append updates; return the sequence number of the last one.

        When this returns, the updates survive a crash of the process.
        ``outbox``: ChangeRecords (persistence/outbox.py) to write in the
        same transaction; only passed to stores that are OutboxStores.
        """

    async def compact(self, workspace_id: str, snapshot: bytes, upto_seq: int) -> None:
        """Replace updates up to ``upto_seq`` by ``snapshot``.

        The snapshot must contain at least every update up to ``upto_seq``.
        """

    async def check(self) -> None:
        """Raise StoreError if the store cannot serve requests (for /readyz)."""

    async def get_meta(self, workspace_id: str, key: str) -> bytes | None:
        """A small per-workspace metadata value (None if never set)."""

    async def put_meta(self, workspace_id: str, key: str, value: bytes) -> None:
        """Durably set a per-workspace metadata value (survives a crash when this returns)."""


@runtime_checkable
class BatchingStore(Protocol):
    """A store that batches appends itself: no task per append on the caller's side."""

    def append_nowait(self, workspace_id: str, updates: list[bytes], outbox: list | None = None) -> Any:
        """Like ``append``, without a coroutine: returns an asyncio future of the last sequence number.

        The lists are taken over. The future is set once the append is durable.
        """
