"""Durable outbox and audit trail, written with the updates they stem from.

A room stages :class:`ChangeRecord`\\ s while it handles updates; its next
flush hands them to ``DocumentStore.append(workspace, updates, outbox=...)``
together with the raw updates, and the store writes both **in one
transaction**: an accepted change is in the outbox if and only if the update
that made it is stored.

Each record becomes one audit row. An accepted change that is to be
forwarded (``forward=True``) also becomes one outbox row, numbered by a
per-workspace sequence (1, 2, 3... with no gaps) assigned at commit time, in
commit order. The forwarder reads pending rows back in that order, sends
them, and finishes them: a finished row leaves the outbox and its audit row
records how (delivered, refused by the backend, dead-lettered...).

This module holds the data types, the protocol a store implements, and the
SQLite implementation (a mixin of :class:`persistence.sqlite.SQLiteDocumentStore`
that uses the same writer thread and the same database file, in tables of
its own).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Audit kinds.
ACCEPTED = "accepted"  # a change the room accepted (forwarded if a backend is configured)
REJECTED = "rejected"  # a change a guard refused (validation, lock...): undone, never forwarded
SEEDED = "seeded"  # the initial state fetched from the backend
BACKEND_REFUSED = "backend_refused"  # the backend answered 4xx to a forwarded change
DEAD_LETTERED = "dead_lettered"  # delivery gave up after the configured time

# Forward status of an accepted change (audit column ``forward_status``).
PENDING = "pending"
DELIVERED = "delivered"  # the backend took it (applied, or already had it)
REFUSED = "refused"  # 4xx: not retried
DEAD = "dead"  # in the dead-letter list
DISCARDED = "discarded"  # dead letter dropped by an operator
NOT_FORWARDED = "not_forwarded"


# Record keys: unique without a syscall per change (uuid4() reads the kernel's
# random source each time, a measurable share of a busy room's CPU). A random
# per-process prefix plus a counter is unique across processes and restarts.
_KEY_PREFIX = os.urandom(8).hex()
_key_counter = itertools.count(1)


def _new_key() -> str:
    return f"{_KEY_PREFIX}{next(_key_counter):016x}"


def group_dead_letters(rows: Any) -> list[dict[str, Any]]:
    """Dead outbox rows (in seq order) grouped by the request (batch) they belong to."""
    batches: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = batches.setdefault(
            row.batch or row.key,
            {
                "key": row.batch or row.key,
                "first_seq": row.seq,
                "seq": row.seq,
                "first_attempt_at": row.first_attempt_at,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "paths": [],
                "changes": 0,
            },
        )
        entry["seq"] = row.seq
        entry["changes"] += 1
        for change in row.changes:
            if change["path"] not in entry["paths"]:
                entry["paths"].append(change["path"])
    return list(batches.values())


@dataclass(slots=True)
class ChangeRecord:
    """One audit entry; also an outbox entry when ``forward`` is set."""

    kind: str
    author: dict[str, Any] | None
    changes: list[dict[str, Any]]  # [{"path", "old"?, "new"?}]; a missing key = the path did not exist
    config: dict[str, Any] | None = None  # the whole configuration after the change
    # ``config`` as JSON, when the author keeps it incrementally (only the
    # touched sections re-encoded): the store then writes it as is.
    config_json: str | None = None
    fence: int | None = None
    reason: str | None = None
    details: dict[str, Any] | None = None
    forward: bool = False
    at: float = field(default_factory=time.time)
    key: str = field(default_factory=lambda: _new_key())
    seed_seq: int | None = None  # SEEDED: the backend's sequence; ours continues after it
    # Set by the store once the transaction holding the record committed:
    seq: int | None = None
    audit_id: int | None = None

    @property
    def paths(self) -> list[str]:
        return [c["path"] for c in self.changes]


@dataclass(slots=True)
class OutboxRow:
    workspace: str
    seq: int
    key: str
    created_at: float
    author: dict[str, Any] | None
    changes: list[dict[str, Any]]
    config: dict[str, Any]
    fence: int | None
    state: str
    batch: str | None
    first_attempt_at: float | None
    attempts: int
    last_error: str | None


@runtime_checkable
class OutboxStore(Protocol):
    """What the forwarder, the seeding hook and the audit API need of a store."""

    async def outbox_workspaces(self) -> list[str]:
        """Workspaces with pending outbox rows."""

    async def outbox_pending(self, workspace: str, limit: int) -> list[OutboxRow]:
        """Pending rows of a workspace in sequence order (at least the whole first batch if claimed)."""

    async def outbox_claim(self, workspace: str, seqs: list[int], batch: str, at: float) -> None:
        """Bind rows to the request (idempotency key ``batch``) that carries them, before its first attempt."""

    async def outbox_failed_attempt(self, workspace: str, batch: str, error: str) -> None: ...

    async def outbox_finish(
        self, workspace: str, batch: str, status: str, at: float, audit: ChangeRecord | None = None
    ) -> list[int]:
        """Remove a batch from the outbox (delivered or refused); returns its sequence numbers."""

    async def outbox_dead(self, workspace: str, batch: str, at: float, audit: ChangeRecord) -> list[int]:
        """Move a batch to the dead-letter list."""

    async def dead_letters(self, workspace: str) -> list[dict[str, Any]]: ...

    async def dead_letter_retry(self, workspace: str, batch: str) -> int: ...

    async def dead_letter_discard(self, workspace: str, batch: str, at: float) -> int: ...

    async def forward_status(self, workspace: str) -> dict[str, Any]: ...

    async def history(self, workspace: str, before: int | None, limit: int) -> list[dict[str, Any]]: ...

    async def seed_status(self, workspace: str) -> dict[str, Any] | None: ...

    async def claim_seed(self, workspace: str, owner: str, ttl_ms: int) -> str:
        """Claim the right to seed a new workspace: ``claimed``, ``seeded`` (done already) or ``busy``.

        Atomic across every node sharing the store; the claim lapses after ``ttl_ms``.
        """
        ...

    async def release_seed(self, workspace: str, owner: str) -> None: ...


# ------------------------------------------------------------------ SQLite

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_state (
    workspace     TEXT PRIMARY KEY,
    last_seq      INTEGER NOT NULL DEFAULT 0,  -- last change sequence number given out
    delivered_seq INTEGER NOT NULL DEFAULT 0,  -- highest sequence number the backend took
    seeded_at     REAL,
    seed_status   TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    workspace        TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    key              TEXT NOT NULL,
    created_at       REAL NOT NULL,
    author           TEXT,
    changes          TEXT NOT NULL,
    config           TEXT NOT NULL,
    fence            INTEGER,
    state            TEXT NOT NULL DEFAULT 'pending',  -- pending | dead
    batch            TEXT,              -- Idempotency-Key of the request carrying this row
    first_attempt_at REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    PRIMARY KEY (workspace, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_by_batch ON outbox (workspace, batch);
CREATE TABLE IF NOT EXISTS audit (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace      TEXT NOT NULL,
    at             REAL NOT NULL,
    kind           TEXT NOT NULL,
    seq            INTEGER,
    author         TEXT,
    paths          TEXT NOT NULL,
    changes        TEXT NOT NULL,
    fence          INTEGER,
    reason         TEXT,
    details        TEXT,
    forward_status TEXT,
    forwarded_at   REAL
);
CREATE INDEX IF NOT EXISTS audit_by_workspace ON audit (workspace, id);
CREATE INDEX IF NOT EXISTS audit_by_seq ON audit (workspace, seq);
"""


# One encoder for every row (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_encode = _ENCODER.encode


def _dumps(value: Any) -> str | None:
    # default=str: a guard's rejection details must never make the append (and the room) fail.
    return None if value is None else _encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def config_text(rec: ChangeRecord) -> str:
    """The record's configuration as JSON (precomputed by the author when it has it: ``config_json``)."""
    return rec.config_json if rec.config_json is not None else _encode(rec.config or {})


def write_records(
    db: sqlite3.Connection, workspace: str, records: list[ChangeRecord], seqs: dict[str, int]
) -> list[tuple[ChangeRecord, int | None, int]]:
    """Write records inside the caller's transaction.

    ``seqs`` caches the last change sequence number per workspace for this
    transaction. Returns (record, seq, audit id) to apply once committed.
    """
    return write_batch(db, [(workspace, rec) for rec in records], seqs)


def write_batch(
    db: sqlite3.Connection, records: list[tuple[str, ChangeRecord]], seqs: dict[str, int]
) -> list[tuple[ChangeRecord, int | None, int]]:
    """Write (workspace, record) pairs of any workspaces inside the caller's transaction, in order.

    One statement per table for the whole batch (``executemany``), one
    ``forward_state`` row per workspace: a group commit of many rooms costs
    a few statements, not three per change. Audit ids follow the order of
    ``records`` (AUTOINCREMENT inside one write transaction hands out
    consecutive ids).
    """
    outbox_rows = []
    audit_rows = []
    forwarded: dict[str, int] = {}
    seq_of: list[int | None] = []
    authors: dict[int, tuple[Any, str | None]] = {}  # id(author) -> (author, its JSON): one peer, many changes
    for workspace, rec in records:
        seq = None
        if rec.kind == SEEDED:
            last = _last_seq(db, workspace, seqs)
            seqs[workspace] = max(last, rec.seed_seq or 0)
            db.execute(
                "INSERT INTO forward_state (workspace, last_seq, delivered_seq, seeded_at, seed_status) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(workspace) DO UPDATE SET "
                "last_seq=MAX(last_seq, excluded.last_seq), delivered_seq=MAX(delivered_seq, excluded.delivered_seq), "
                "seeded_at=excluded.seeded_at, seed_status=excluded.seed_status",
                (workspace, seqs[workspace], rec.seed_seq or 0, rec.at, rec.reason),
            )
        author = rec.author
        cached = authors.get(id(author))
        if cached is None or cached[0] is not author:
            cached = (author, _dumps(author))
            authors[id(author)] = cached
        author_text = cached[1]
        changes_text = _dumps(rec.changes)
        if rec.forward:
            seq = _last_seq(db, workspace, seqs) + 1
            seqs[workspace] = seq
            forwarded[workspace] = seq
            outbox_rows.append(
                (workspace, seq, rec.key, rec.at, author_text, changes_text, config_text(rec), rec.fence)
            )
        status = PENDING if rec.forward else (NOT_FORWARDED if rec.kind == ACCEPTED else None)
        audit_rows.append(
            (
                workspace,
                rec.at,
                rec.kind,
                seq if seq is not None else (rec.seq if rec.kind in (BACKEND_REFUSED, DEAD_LETTERED) else None),
                author_text,
                _dumps(rec.paths),
                changes_text,
                rec.fence,
                rec.reason,
                _dumps(rec.details),
                status,
            )
        )
        seq_of.append(seq)
    if forwarded:
        db.executemany(
            "INSERT INTO forward_state (workspace, last_seq) VALUES (?, ?) "
            "ON CONFLICT(workspace) DO UPDATE SET last_seq=MAX(last_seq, excluded.last_seq)",
            list(forwarded.items()),
        )
    if outbox_rows:
        db.executemany(
            "INSERT INTO outbox (workspace, seq, key, created_at, author, changes, config, fence) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            outbox_rows,
        )
    if not audit_rows:
        return []
    db.executemany(
        "INSERT INTO audit (workspace, at, kind, seq, author, paths, changes, fence, reason, details, "
        "forward_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        audit_rows,
    )
    last_id = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    first_id = last_id - len(audit_rows) + 1
    return [(rec, seq, first_id + i) for i, ((_, rec), seq) in enumerate(zip(records, seq_of))]


def _last_seq(db: sqlite3.Connection, workspace: str, seqs: dict[str, int]) -> int:
    seq = seqs.get(workspace)
    if seq is None:
        row = db.execute("SELECT last_seq FROM forward_state WHERE workspace=?", (workspace,)).fetchone()
        seq = row[0] if row else 0
        seqs[workspace] = seq
    return seq


_ROW_COLUMNS = (
    "workspace, seq, key, created_at, author, changes, config, fence, state, batch, first_attempt_at, "
    "attempts, last_error"
)


def _row(r: tuple) -> OutboxRow:
    return OutboxRow(
        workspace=r[0],
        seq=r[1],
        key=r[2],
        created_at=r[3],
        author=_loads(r[4]),
        changes=_loads(r[5]),
        config=_loads(r[6]),
        fence=r[7],
        state=r[8],
        batch=r[9],
        first_attempt_at=r[10],
        attempts=r[11],
        last_error=r[12],
    )


class SQLiteOutboxMixin:
    """OutboxStore on the SQLite document store (same thread, same file)."""

    # Provided by SQLiteDocumentStore: reads run alone; writes join the next group commit.
    async def _call(self, fn):
        raise NotImplementedError

    async def _grouped(self, fn):
        raise NotImplementedError

    async def outbox_workspaces(self) -> list[str]:
        return await self._call(
            lambda db: [r[0] for r in db.execute("SELECT DISTINCT workspace FROM outbox WHERE state='pending'")]
        )

    async def dead_letter_workspaces(self) -> list[str]:
        """Workspaces holding dead letters (the operator console lists them all)."""
        return await self._call(
            lambda db: [
                r[0] for r in db.execute("SELECT DISTINCT workspace FROM outbox WHERE state='dead' ORDER BY workspace")
            ]
        )

    async def outbox_totals(self) -> dict[str, Any]:
        """Rows per state across workspaces, and the oldest pending one (for /metrics)."""

        def run(db: sqlite3.Connection) -> dict[str, Any]:
            totals: dict[str, Any] = {"pending": 0, "dead": 0, "oldest_pending_at": None}
            rows = db.execute("SELECT state, COUNT(*), MIN(created_at) FROM outbox GROUP BY state")
            for state, count, oldest in rows:
                totals[state] = count
                if state == "pending":
                    totals["oldest_pending_at"] = oldest
            return totals

        return await self._call(run)

    async def outbox_pending(self, workspace: str, limit: int) -> list[OutboxRow]:
        def run(db: sqlite3.Connection) -> list[OutboxRow]:
            rows = [
                _row(r)
                for r in db.execute(
                    f"SELECT {_ROW_COLUMNS} FROM outbox WHERE workspace=? AND state='pending' ORDER BY seq LIMIT ?",
                    (workspace, limit),
                )
            ]
            if rows and rows[0].batch is not None and rows[-1].batch == rows[0].batch:
                # A claimed batch is re-sent whole, even if it is longer than ``limit``.
                rows = [
                    _row(r)
                    for r in db.execute(
                        f"SELECT {_ROW_COLUMNS} FROM outbox WHERE workspace=? AND batch=? AND state='pending' "
                        "ORDER BY seq",
                        (workspace, rows[0].batch),
                    )
                ]
            return rows

        return await self._call(run)

    async def outbox_claim(self, workspace: str, seqs: list[int], batch: str, at: float) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE outbox SET batch=?, first_attempt_at=COALESCE(first_attempt_at, ?) "
                "WHERE workspace=? AND seq=? AND (batch IS NULL OR batch=?)",
                [(batch, at, workspace, seq, batch) for seq in seqs],
            )

        await self._grouped(run)

    async def outbox_failed_attempt(self, workspace: str, batch: str, error: str) -> None:
        await self._grouped(
            lambda db: db.execute(
                "UPDATE outbox SET attempts=attempts+1, last_error=? WHERE workspace=? AND batch=?",
                (error[:1000], workspace, batch),
            )
        )

    async def outbox_finish(
        self, workspace: str, batch: str, status: str, at: float, audit: ChangeRecord | None = None
    ) -> list[int]:
        def run(db: sqlite3.Connection) -> list[int]:
            seqs = [
                r[0] for r in db.execute("SELECT seq FROM outbox WHERE workspace=? AND batch=?", (workspace, batch))
            ]
            db.execute("DELETE FROM outbox WHERE workspace=? AND batch=?", (workspace, batch))
            db.executemany(
                "UPDATE audit SET forward_status=?, forwarded_at=? WHERE workspace=? AND seq=? AND kind=?",
                [(status, at, workspace, seq, ACCEPTED) for seq in seqs],
            )
            if seqs and status == DELIVERED:
                db.execute(
                    "UPDATE forward_state SET delivered_seq=MAX(delivered_seq, ?) WHERE workspace=?",
                    (max(seqs), workspace),
                )
            if audit is not None:
                audit.seq = max(seqs) if seqs else audit.seq
                write_records(db, workspace, [audit], {})
            return seqs

        return await self._grouped(run)

    async def outbox_dead(self, workspace: str, batch: str, at: float, audit: ChangeRecord) -> list[int]:
        def run(db: sqlite3.Connection) -> list[int]:
            seqs = [
                r[0]
                for r in db.execute(
                    "SELECT seq FROM outbox WHERE workspace=? AND batch=? AND state='pending'", (workspace, batch)
                )
            ]
            db.execute("UPDATE outbox SET state='dead' WHERE workspace=? AND batch=?", (workspace, batch))
            db.executemany(
                "UPDATE audit SET forward_status=?, forwarded_at=NULL WHERE workspace=? AND seq=? AND kind=?",
                [(DEAD, workspace, seq, ACCEPTED) for seq in seqs],
            )
            audit.seq = max(seqs) if seqs else audit.seq
            write_records(db, workspace, [audit], {})
            return seqs

        return await self._grouped(run)

    async def dead_letters(self, workspace: str) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM outbox WHERE workspace=? AND state='dead' ORDER BY seq", (workspace,)
            )
            return group_dead_letters(_row(r) for r in rows)

        return await self._call(run)

    async def dead_letter_retry(self, workspace: str, batch: str) -> int:
        def run(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE outbox SET state='pending', first_attempt_at=NULL, attempts=0 "
                "WHERE workspace=? AND batch=? AND state='dead'",
                (workspace, batch),
            )
            seqs = [
                r[0] for r in db.execute("SELECT seq FROM outbox WHERE workspace=? AND batch=?", (workspace, batch))
            ]
            db.executemany(
                "UPDATE audit SET forward_status=? WHERE workspace=? AND seq=? AND kind=?",
                [(PENDING, workspace, seq, ACCEPTED) for seq in seqs],
            )
            return cur.rowcount

        return await self._grouped(run)

    async def dead_letter_discard(self, workspace: str, batch: str, at: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            seqs = [
                r[0]
                for r in db.execute(
                    "SELECT seq FROM outbox WHERE workspace=? AND batch=? AND state='dead'", (workspace, batch)
                )
            ]
            db.execute("DELETE FROM outbox WHERE workspace=? AND batch=? AND state='dead'", (workspace, batch))
            db.executemany(
                "UPDATE audit SET forward_status=?, forwarded_at=? WHERE workspace=? AND seq=? AND kind=?",
                [(DISCARDED, at, workspace, seq, ACCEPTED) for seq in seqs],
            )
            return len(seqs)

        return await self._grouped(run)

    async def forward_status(self, workspace: str) -> dict[str, Any]:
        def run(db: sqlite3.Connection) -> dict[str, Any]:
            state = db.execute(
                "SELECT last_seq, delivered_seq, seeded_at, seed_status FROM forward_state WHERE workspace=?",
                (workspace,),
            ).fetchone() or (0, 0, None, None)
            counts = dict(
                db.execute("SELECT state, COUNT(*) FROM outbox WHERE workspace=? GROUP BY state", (workspace,))
            )
            oldest = db.execute(
                "SELECT MIN(created_at) FROM outbox WHERE workspace=? AND state='pending'", (workspace,)
            ).fetchone()[0]
            return {
                "workspace": workspace,
                "recorded_seq": state[0],
                "delivered_seq": state[1],
                "pending": counts.get("pending", 0),
                "dead_letters": counts.get("dead", 0),
                "oldest_pending_at": oldest,
                "seeded_at": state[2],
                "seed_status": state[3],
            }

        return await self._call(run)

    async def history(self, workspace: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT id, at, kind, seq, author, paths, changes, fence, reason, details, forward_status, "
                "forwarded_at FROM audit WHERE workspace=? AND id<? ORDER BY id DESC LIMIT ?",
                (workspace, before if before is not None else 2**62, limit),
            ).fetchall()
            return [audit_entry(r) for r in rows]

        return await self._call(run)

    async def claim_seed(self, workspace: str, owner: str, ttl_ms: int) -> str:
        """One process owns a SQLite file, and its room manager loads a workspace once: a check suffices."""
        return "seeded" if await self.seed_status(workspace) is not None else "claimed"

    async def release_seed(self, workspace: str, owner: str) -> None:
        return None

    async def seed_status(self, workspace: str) -> dict[str, Any] | None:
        def run(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute(
                "SELECT seeded_at, seed_status FROM forward_state WHERE workspace=? AND seeded_at IS NOT NULL",
                (workspace,),
            ).fetchone()
            return None if row is None else {"seeded_at": row[0], "status": row[1]}

        return await self._call(run)


# ------------------------------------------------------------- change log


@runtime_checkable
class ChangeLog(Protocol):
    """Reading the audit trail forwards, in commit order (the events feature publishes it).

    An entry's ``id`` grows with commit order within a workspace (it may skip
    numbers); a reader keeps the last ``id`` it handled and asks for what
    follows. Entries have the shape of ``OutboxStore.history``'s.
    """

    async def changes_since(self, workspace: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Audit entries of ``workspace`` with ``id > after_id``, oldest first, at most ``limit``."""
        ...

    async def change_heads(self) -> dict[str, int]:
        """The newest audit ``id`` of every workspace that has an audit trail."""
        ...


def audit_entry(r: tuple) -> dict[str, Any]:
    """One audit row (the columns of ``history``) as a plain dict."""
    return {
        "id": r[0],
        "at": r[1],
        "kind": r[2],
        "seq": r[3],
        "author": _loads(r[4]),
        "paths": _loads(r[5]),
        "changes": _loads(r[6]),
        "fence": r[7],
        "reason": r[8],
        "details": _loads(r[9]),
        "forward_status": r[10],
        "forwarded_at": r[11],
    }


class SQLiteChangeLogMixin:
    """ChangeLog on the SQLite store, read through a connection of its own.

    The store's thread runs reads between group commits, so a read queued
    among appends splits their commit in two (one more fsync). The change log
    is read after nearly every commit (by every event sink), so it reads on
    a second, read-only connection in a thread of its own: WAL lets it see
    every committed transaction without waiting for the writer or holding it.
    """

    path: Any  # the database file (SQLiteDocumentStore)

    def _log_reader(self) -> Any:
        executor = getattr(self, "_changelog_executor", None)
        if executor is None:
            import concurrent.futures
            import threading

            local = threading.local()
            path = self.path

            def connection() -> sqlite3.Connection:
                db = getattr(local, "db", None)
                if db is None:
                    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
                    db.execute("PRAGMA busy_timeout=5000")
                    local.db = db
                return db

            executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="changelog")
            self._changelog_executor = executor
            self._changelog_connection = connection
        return executor

    async def _read_log(self, fn):
        import asyncio

        executor = self._log_reader()
        connection = self._changelog_connection
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(connection()))
        except sqlite3.Error as exc:
            from persistence.base import StoreError

            raise StoreError(str(exc)) from exc

    async def changes_since(self, workspace: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT id, at, kind, seq, author, paths, changes, fence, reason, details, forward_status, "
                "forwarded_at FROM audit WHERE workspace=? AND id>? ORDER BY id LIMIT ?",
                (workspace, after_id, limit),
            ).fetchall()
            return [audit_entry(r) for r in rows]

        return await self._read_log(run)

    async def changes_after(self, after_id: int | None, limit: int) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
        """Every workspace's audit entries with ``id > after_id`` (ids are global here), oldest first.

        Returns the highest id read (``after_id`` if none; the newest id if
        ``after_id`` is None, with no entries: where to start tailing).
        """

        def run(db: sqlite3.Connection) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
            if after_id is None:
                return db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0], []
            rows = db.execute(
                "SELECT workspace, id, at, kind, seq, author, paths, changes, fence, reason, details, forward_status, "
                "forwarded_at FROM audit WHERE id>? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            return (rows[-1][1] if rows else after_id), [(r[0], audit_entry(r[1:])) for r in rows]

        return await self._read_log(run)

    async def change_heads(self) -> dict[str, int]:
        return await self._read_log(
            lambda db: dict(db.execute("SELECT workspace, MAX(id) FROM audit GROUP BY workspace").fetchall())
        )

    async def forward_progress(self, workspace: str) -> dict[str, Any]:
        """What the forwarder got to: ``delivered_seq``, ``pending`` rows, and the first pending row (or None)."""

        def run(db: sqlite3.Connection) -> dict[str, Any]:
            state = db.execute("SELECT delivered_seq FROM forward_state WHERE workspace=?", (workspace,)).fetchone()
            head = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM outbox WHERE workspace=? AND state='pending' ORDER BY seq LIMIT 1",
                (workspace,),
            ).fetchone()
            return {
                "delivered_seq": state[0] if state else 0,
                "pending": 1 if head else 0,
                "head": _row(head) if head else None,
            }

        return await self._read_log(run)
