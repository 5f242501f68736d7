"""SQLite document store: the embedded default.

One database file under the data directory, in WAL mode. All database work
runs on one dedicated thread, so the event loop never blocks on disk. Appends
from every room are committed together (group commit): the appends of one
event-loop turn, across all rooms, reach the writer thread as one batch, so
one transaction and one fsync cover them (and whatever queued while the
previous commit ran). Each caller's future resolves only after the commit
that holds its updates; the futures of one commit are resolved by one
callback on the loop, not one cross-thread wake-up each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persistence.base import StoredDocument, StoreError
from persistence.outbox import OUTBOX_SCHEMA, ChangeRecord, SQLiteChangeLogMixin, SQLiteOutboxMixin, write_batch

log = logging.getLogger("collab.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    workspace    TEXT PRIMARY KEY,
    snapshot     BLOB,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    last_seq     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    workspace TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (workspace, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    workspace TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (workspace, key)
) WITHOUT ROWID;
"""

_STOP = object()


class _Append:
    __slots__ = ("workspace", "updates", "future", "loop", "outbox")

    def __init__(
        self, workspace: str, updates: list[bytes], future: asyncio.Future, loop, outbox: list | None = None
    ) -> None:
        self.workspace = workspace
        self.updates = updates
        self.future = future
        self.loop = loop
        self.outbox = outbox


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future, loop) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


class _Grouped(_Call):
    """A small write committed together with the appends of its group (one fsync for all)."""

    __slots__ = ()


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        _resolve(future, result, error)


def _post(outcomes: list[tuple[Any, asyncio.Future, Any, BaseException | None]]) -> None:
    """Hand (loop, future, result, error) outcomes back: one wake-up per loop."""
    by_loop: dict[Any, list] = {}
    for loop, future, result, error in outcomes:
        by_loop.setdefault(loop, []).append((future, result, error))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


class SQLiteDocumentStore(SQLiteOutboxMixin, SQLiteChangeLogMixin):
    """DocumentStore on one SQLite file; see the module docstring.

    Also an ``OutboxStore`` (persistence/outbox.py): outbox and audit rows
    passed to ``append`` commit in the same transaction as the updates.
    """

    def __init__(self, path: str | Path, synchronous: str = "FULL", max_batch: int = 4096) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        # Sequence numbers are kept in memory by the writer thread so an
        # append needs no read; they are loaded lazily per workspace.
        self._last_seq: dict[str, int] = {}
        # Appends of the current event-loop turn (every room's), handed to the
        # writer thread as one batch at the start of the next turn.
        self._turn: list[_Append] | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="sqlite-store", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._open_error is not None:
            raise StoreError(f"cannot open {self.path}: {self._open_error}") from self._open_error

    async def close(self) -> None:
        if self._thread is None:
            return
        self._submit_turn()
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    # ----------------------------------------------------------- operations

    async def load(self, workspace_id: str) -> StoredDocument:
        return await self._call(lambda db: self._load(db, workspace_id))

    async def append(
        self, workspace_id: str, updates: list[bytes], outbox: list[ChangeRecord] | None = None
    ) -> int:
        return await self.append_nowait(workspace_id, list(updates), list(outbox) if outbox else None)

    def append_nowait(
        self, workspace_id: str, updates: list[bytes], outbox: list[ChangeRecord] | None = None
    ) -> asyncio.Future:
        """``append`` without a coroutine: a future of the last sequence number, set once committed.

        The lists are taken over (the caller must not change them). Every
        append of this event-loop turn joins one batch (one commit).
        """
        if self._thread is None:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        turn = self._turn
        if turn is None:
            turn = self._turn = []
            loop.call_soon(self._submit_turn)
        turn.append(_Append(workspace_id, updates, future, loop, outbox or None))
        return future

    def _submit_turn(self) -> None:
        turn, self._turn = self._turn, None
        if turn:
            self._queue.put(turn)

    async def compact(self, workspace_id: str, snapshot: bytes, upto_seq: int) -> None:
        await self._call(lambda db: self._compact(db, workspace_id, snapshot, upto_seq))

    async def check(self) -> None:
        await self._call(lambda db: db.execute("SELECT 1").fetchone())

    # Per-workspace metadata (e.g. the lock fence high-water mark, the known
    # backend state). A put joins the next group commit: durable when the call
    # returns, without a commit (an fsync) of its own.

    async def get_meta(self, workspace_id: str, key: str) -> bytes | None:
        def get(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM meta WHERE workspace=? AND key=?", (workspace_id, key)).fetchone()
            return bytes(row[0]) if row else None

        return await self._call(get)

    async def put_meta(self, workspace_id: str, key: str, value: bytes) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO meta (workspace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(workspace, key) DO UPDATE SET value=excluded.value",
                (workspace_id, key, bytes(value)),
            )

        await self._grouped(put)

    async def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._thread is None:
            raise StoreError("store is closed")
        self._submit_turn()  # keep queue order: appends made before this call run first
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Call(fn, future, loop))
        return await future

    async def _grouped(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` inside the next group commit (no BEGIN/COMMIT of its own; a savepoint isolates it)."""
        if self._thread is None:
            raise StoreError("store is closed")
        self._submit_turn()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Grouped(fn, future, loop))
        return await future

    # ------------------------------------------------------- writer thread

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        db.executescript(OUTBOX_SCHEMA)
        return db

    def _run(self) -> None:
        try:
            db = self._connect()
        except BaseException as exc:  # reported to open()
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            appends: list[_Append | _Grouped] = []
            for item in batch:
                if item is _STOP:
                    stop = True
                elif type(item) is list:  # one event-loop turn's appends
                    appends.extend(item)
                elif isinstance(item, _Append | _Grouped):
                    appends.append(item)
                else:
                    # Keep order: commit appends queued before this call first.
                    self._commit_appends(db, appends)
                    appends = []
                    self._run_call(db, item)
            self._commit_appends(db, appends)
        db.close()

    def _run_call(self, db: sqlite3.Connection, item: _Call) -> None:
        try:
            result = item.fn(db)
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            error = exc if isinstance(exc, StoreError) else StoreError(str(exc))
            item.loop.call_soon_threadsafe(_resolve, item.future, None, error)
        else:
            item.loop.call_soon_threadsafe(_resolve, item.future, result)

    def _seq(self, db: sqlite3.Connection, workspace: str) -> int:
        seq = self._last_seq.get(workspace)
        if seq is None:
            row = db.execute("SELECT last_seq FROM documents WHERE workspace=?", (workspace,)).fetchone()
            seq = row[0] if row else 0
            self._last_seq[workspace] = seq
        return seq

    def _commit_appends(self, db: sqlite3.Connection, items: list[_Append | _Grouped]) -> None:
        if not items:
            return
        appends = [item for item in items if isinstance(item, _Append)]
        grouped = [item for item in items if isinstance(item, _Grouped)]
        done: list[tuple[_Grouped, Any, BaseException | None]] = []
        results: list[int] = []
        touched: dict[str, int] = {}
        recorded: list = []
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = []
            for item in appends:
                seq = touched.get(item.workspace)
                if seq is None:
                    seq = self._seq(db, item.workspace)
                for data in item.updates:
                    seq += 1
                    rows.append((item.workspace, seq, data))
                touched[item.workspace] = seq
                results.append(seq)
            db.executemany("INSERT INTO updates (workspace, seq, data) VALUES (?, ?, ?)", rows)
            db.executemany(
                "INSERT INTO documents (workspace, last_seq) VALUES (?, ?) "
                "ON CONFLICT(workspace) DO UPDATE SET last_seq=excluded.last_seq",
                list(touched.items()),
            )
            change_seqs: dict[str, int] = {}
            records = [(item.workspace, rec) for item in appends if item.outbox for rec in item.outbox]
            if records:
                recorded = write_batch(db, records, change_seqs)
            for op in grouped:
                db.execute("SAVEPOINT grouped")
                try:
                    done.append((op, op.fn(db), None))
                except Exception as exc:  # only this op fails
                    db.execute("ROLLBACK TO grouped")
                    done.append((op, None, StoreError(str(exc))))
                db.execute("RELEASE grouped")
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for workspace in touched:
                self._last_seq.pop(workspace, None)  # re-read after a failure
            log.error("append failed: %s", exc)
            error = StoreError(f"append failed: {exc}")
            _post([(item.loop, item.future, None, error) for item in items])
            return
        self._last_seq.update(touched)
        for record, change_seq, audit_id in recorded:
            record.seq, record.audit_id = change_seq, audit_id
        outcomes = [(item.loop, item.future, seq, None) for item, seq in zip(appends, results)]
        outcomes += [(op.loop, op.future, result, error) for op, result, error in done]
        _post(outcomes)

    def _load(self, db: sqlite3.Connection, workspace: str) -> StoredDocument:
        row = db.execute(
            "SELECT snapshot, snapshot_seq, last_seq FROM documents WHERE workspace=?", (workspace,)
        ).fetchone()
        if row is None:
            return StoredDocument()
        snapshot, snapshot_seq, last_seq = row
        updates = [
            bytes(r[0])
            for r in db.execute(
                "SELECT data FROM updates WHERE workspace=? AND seq>? ORDER BY seq", (workspace, snapshot_seq)
            )
        ]
        self._last_seq[workspace] = last_seq
        return StoredDocument(
            snapshot=bytes(snapshot) if snapshot is not None else None,
            snapshot_seq=snapshot_seq,
            updates=updates,
            last_seq=last_seq,
        )

    def _compact(self, db: sqlite3.Connection, workspace: str, snapshot: bytes, upto_seq: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO documents (workspace, snapshot, snapshot_seq, last_seq) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(workspace) DO UPDATE SET snapshot=excluded.snapshot, "
            "snapshot_seq=excluded.snapshot_seq, last_seq=MAX(documents.last_seq, excluded.last_seq)",
            (workspace, snapshot, upto_seq, upto_seq),
        )
        db.execute("DELETE FROM updates WHERE workspace=? AND seq<=?", (workspace, upto_seq))
        db.execute("COMMIT")
