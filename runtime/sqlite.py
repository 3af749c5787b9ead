"""The SQLite backend (embedded mode): one database file per server, one table keyed by
(room, key), run on its own thread with group commit (``storage.ThreadedBackend``)."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .config import ConfigError
from .storage import (
    AlarmChange,
    AlarmRows,
    Done,
    Job,
    ListResult,
    Size,
    StorageError,
    ThreadedBackend,
    earlier_failure,
    range_query,
)

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


class SqliteBackend(ThreadedBackend[sqlite3.Connection]):
    """SQLite in WAL mode behind one writer thread with group commit.

    ``synchronous="NORMAL"`` (default) makes a commit survive the process being killed;
    ``"FULL"`` also survives power loss, at the cost of an fsync per transaction.
    ``path=":memory:"`` keeps everything in memory (tests).
    """

    name = "sqlite"

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = str(path)
        self._synchronous = synchronous.upper()
        self._lock = None if self.path == ":memory:" else _lock(self.path + ".lock")
        try:
            super().__init__()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (the lock goes with the file descriptor)
            self._lock = None

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open the database {self.path!r}: {error}"

    # -- the thread ---------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(_SCHEMA)
        return db

    def _close(self, db: sqlite3.Connection) -> None:
        db.close()
        self._unlock()

    def _run_batch(self, db: sqlite3.Connection, batch: list[Job[sqlite3.Connection]]) -> None:
        try:
            try:
                # Fast path: the whole batch in one transaction, one statement per job.
                db.execute("BEGIN")
                for job in batch:
                    if earlier_failure(job):
                        raise _Dependent  # (sorted out one job at a time, below)
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

    @staticmethod
    def _run_isolated(db: sqlite3.Connection, batch: list[Job[sqlite3.Connection]]) -> None:
        db.execute("BEGIN")
        for job in batch:
            job.result, job.error = None, earlier_failure(job)
            if job.error is not None:
                continue
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

    # -- the interface ------------------------------------------------------------------

    async def get_many(self, room: str, keys: list[str]) -> dict[str, bytes]:
        def run(db: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for chunk, marks in _in_chunks(keys):
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
        upper = _prefix_upper_bound(prefix) if prefix else None
        sql, params = range_query(
            "kv",
            "?",
            room,
            [bound for bound in (prefix or None, start) if bound is not None],
            [bound for bound in (upper, end) if bound is not None],
            reverse,
            limit,
        )

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
        epoch: int | None = None,
        after: Any = None,
    ) -> Job[sqlite3.Connection]:
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

        def deliver(job: Job[sqlite3.Connection]) -> None:
            done(StorageError(f"commit failed: {job.error}") if job.error else None)

        return self._submit(run, deliver, after=after)

    async def get_alarm(self, room: str) -> float | None:
        def run(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT at FROM alarms WHERE room = ?", (room,)).fetchone()
            return None if row is None else float(row[0])

        at: float | None = await self._call(run)
        return at

    async def sizes(self, rooms: Sequence[str]) -> dict[str, Size]:
        def run(db: sqlite3.Connection) -> dict[str, Size]:
            found: dict[str, Size] = {}
            for chunk, marks in _in_chunks(rooms):
                rows = db.execute(
                    "SELECT room, count(*), sum(length(CAST(key AS BLOB)) + length(value)) "
                    f"FROM kv WHERE room IN ({marks}) GROUP BY room",
                    chunk,
                )
                found.update((room, (keys, size)) for room, keys, size in rows)
            return found

        result: dict[str, Size] = await self._call(run)
        return result

    async def alarms(self) -> AlarmRows:
        def run(db: sqlite3.Connection) -> AlarmRows:
            return list(db.execute("SELECT room, at, name FROM alarms"))

        rows: AlarmRows = await self._call(run)
        return rows


def _in_chunks(values: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``values`` in chunks of 500 (under SQLite's limit on parameters), each with its
    ``?,?,...`` for an ``IN (...)``."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield chunk, ",".join("?" * len(chunk))


class _Dependent(Exception):
    """A job of the batch depends on a failed commit: the batch runs one job at a time."""


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


def _lock(path: str) -> IO[str] | None:
    """This process's claim on a database: SQLite would let a second server open the file
    too, and both would then serve the same rooms. Released when the process ends, however
    it ends."""
    try:
        file = open(path, "a+")  # noqa: SIM115 (held as long as the backend)
    except OSError:
        return None  # (no such folder: opening the database says so)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        folder = os.path.dirname(path) or "."
        raise ConfigError(
            f"setting 'data_dir': {folder!r} is in use by another rooms server ({holder} holds "
            f"{path}); stop it, or give this server its own data_dir"
        ) from None
    file.truncate(0)
    file.write(f"pid {os.getpid()}\n")
    file.flush()
    return file
