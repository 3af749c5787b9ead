"""The SQLite backend: one database file per server, one table keyed by (room, key).

A single thread owns the connection: rooms hand it jobs (reads, commits) through a queue, it
runs everything queued in one transaction (group commit across rooms) and then wakes the
rooms, so the event loop never touches the disk. Jobs run in queue order, so a read always
sees every write that the same room submitted before it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from .storage import AlarmChange, AlarmRows, Done, ListResult, StorageError, jobs_in_flight

log = logging.getLogger("rooms.storage")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    room  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (room, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarms (
    room  TEXT PRIMARY KEY,
    at    REAL NOT NULL,
    name  TEXT
) WITHOUT ROWID;
"""

_BATCH_MAX = 1024  # jobs per transaction: bounds the latency of the first job in a batch


class _Job:
    __slots__ = ("deliver", "error", "result", "run")

    def __init__(
        self, run: Callable[[sqlite3.Connection], Any], deliver: Callable[[_Job], None]
    ) -> None:
        self.run = run
        self.deliver = deliver
        self.result: Any = None
        self.error: BaseException | None = None


class SqliteBackend:
    """SQLite in WAL mode behind one writer thread with group commit.

    ``synchronous="NORMAL"`` (default) makes a commit survive the process being killed;
    ``"FULL"`` also survives power loss, at the cost of an fsync per transaction.
    ``path=":memory:"`` keeps everything in memory (tests).
    """

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = str(path)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._in_flight = jobs_in_flight()
        self._closed = False
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, args=(synchronous.upper(), ready), name="rooms-storage", daemon=True
        )
        self._thread.start()
        error = ready.get()
        if error is not None:
            raise StorageError(f"cannot open the database {self.path!r}: {error}") from error

    # -- the thread ---------------------------------------------------------------------

    def _open(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA)
        return db

    def _main(self, synchronous: str, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            db = self._open(synchronous)
        except Exception as exc:
            ready.put(exc)
            return
        ready.put(None)
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _BATCH_MAX:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._run_batch(db, batch)
                if stop:
                    return
        finally:
            db.close()

    def _run_batch(self, db: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            try:
                # Fast path: the whole batch in one transaction, one statement per job.
                db.execute("BEGIN")
                for job in batch:
                    job.result = job.run(db)
                db.execute("COMMIT")
            except Exception:
                # Some job failed: nothing is committed; run the batch again with each job
                # in its own savepoint, so that the bad one fails alone.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._run_isolated(db, batch)
        except sqlite3.Error as exc:
            log.error("storage commit failed for %d queued operations: %s", len(batch), exc)
            if db.in_transaction:
                db.execute("ROLLBACK")
            for job in batch:
                job.error = job.error or exc
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._deliver_batch, batch)

    @staticmethod
    def _run_isolated(db: sqlite3.Connection, batch: list[_Job]) -> None:
        db.execute("BEGIN")
        for job in batch:
            job.result = None
            db.execute("SAVEPOINT job")
            try:
                job.result = job.run(db)
            except Exception as exc:
                # One bad job (a value over SQLite's size limit, say) fails alone, and
                # never the thread: every room's storage depends on it.
                db.execute("ROLLBACK TO job")
                job.error = exc
            db.execute("RELEASE job")
        db.execute("COMMIT")

    def _deliver_batch(self, batch: list[_Job]) -> None:
        self._in_flight[0] -= len(batch)
        for job in batch:
            job.deliver(job)

    # -- the interface ------------------------------------------------------------------

    def _submit(
        self, run: Callable[[sqlite3.Connection], Any], deliver: Callable[[_Job], None]
    ) -> None:
        if self._closed:
            raise StorageError("storage is closed (the server is shutting down)")
        self._in_flight[0] += 1
        self._jobs.put(_Job(run, deliver))

    async def _call(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        finished = trio.Event()
        outcome: list[_Job] = []

        def deliver(job: _Job) -> None:
            outcome.append(job)
            finished.set()

        self._submit(run, deliver)
        with trio.CancelScope(shield=True):
            # The thread will answer; leaving early would only orphan the answer.
            await finished.wait()
        job = outcome[0]
        if job.error is not None:
            raise StorageError(f"storage read failed: {job.error}") from job.error
        return job.result

    async def get_many(self, room: str, keys: list[str]) -> dict[str, bytes]:
        def run(db: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT key, value FROM kv WHERE room = ? AND key IN ({marks})", (room, *chunk)
                )
                found.update(rows)
            return found

        result: dict[str, bytes] = await self._call(run)
        return result

    async def list(
        self,
        room: str,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> ListResult:
        where, params = ["room = ?"], [room]
        if prefix:
            where.append("key >= ?")
            params.append(prefix)
            upper = _prefix_upper_bound(prefix)
            if upper is not None:
                where.append("key < ?")
                params.append(upper)
        if start is not None:
            where.append("key >= ?")
            params.append(start)
        if end is not None:
            where.append("key < ?")
            params.append(end)
        sql = f"SELECT key, value FROM kv WHERE {' AND '.join(where)} ORDER BY key"
        sql += " DESC" if reverse else ""
        if limit is not None:
            sql += f" LIMIT {int(limit)}"

        def run(db: sqlite3.Connection) -> ListResult:
            return list(db.execute(sql, params))

        result: ListResult = await self._call(run)
        return result

    def commit(
        self,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        done: Done,
        alarm: AlarmChange | None = None,
    ) -> None:
        puts = [(room, k, v) for k, v in writes.items() if v is not None]
        deletes = [(room, k) for k, v in writes.items() if v is None]

        def run(db: sqlite3.Connection) -> None:
            if delete_all:
                db.execute("DELETE FROM kv WHERE room = ?", (room,))
            if deletes:
                db.executemany("DELETE FROM kv WHERE room = ? AND key = ?", deletes)
            if puts:
                db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", puts)
            if alarm is not None:
                at, name = alarm
                if at is None:
                    db.execute("DELETE FROM alarms WHERE room = ?", (room,))
                else:
                    db.execute("INSERT OR REPLACE INTO alarms VALUES (?, ?, ?)", (room, at, name))

        def deliver(job: _Job) -> None:
            done(StorageError(f"commit failed: {job.error}") if job.error else None)

        self._submit(run, deliver)

    async def get_alarm(self, room: str) -> float | None:
        def run(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT at FROM alarms WHERE room = ?", (room,)).fetchone()
            return None if row is None else float(row[0])

        at: float | None = await self._call(run)
        return at

    async def alarms(self) -> AlarmRows:
        def run(db: sqlite3.Connection) -> AlarmRows:
            return list(db.execute("SELECT room, at, name FROM alarms"))

        rows: AlarmRows = await self._call(run)
        return rows

    async def aclose(self) -> None:
        """Finish every queued job, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            chars[-1] = chr(last + 1)
            return "".join(chars)
        chars.pop()
    return None
