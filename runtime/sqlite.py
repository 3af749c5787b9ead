"""The SQLite backend's database (embedded mode), as its writer process runs it: one file per
server, one table keyed by (room, key), WAL mode (``python -m runtime.sqlite FD PATH SYNC``;
the server's side is ``storage.SqliteBackend``, the process's loop ``writer.Writer``)."""

from __future__ import annotations

import functools
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .writer import Job, Merged, range_query, runs, serve

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


class SqliteStore:
    """One connection, in WAL mode. ``synchronous="NORMAL"`` makes a commit survive the
    process being killed; ``"FULL"`` also survives power loss, at the cost of an fsync per
    transaction. ``path=":memory:"`` keeps everything in memory (tests)."""

    def __init__(self, path: str, synchronous: str) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        if path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # (the checkpointer's job)
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA)
        self.db = db
        self.info = {
            "synchronous": db.execute("PRAGMA synchronous").fetchone()[0],
            "journal_mode": db.execute("PRAGMA journal_mode").fetchone()[0],
        }
        self._checkpointer = None if path == ":memory:" else _Checkpointer(path)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.db.close()

    def run_batch(
        self,
        batch: list[Job],
        failed: Callable[[Job], str | None],
        before_commit: Callable[[bool], None],
    ) -> None:
        db = self.db
        wrote = any(job.commit is not None for job in batch)
        try:
            try:
                # Fast path: the whole batch in one transaction, each run of consecutive
                # commits written together (``Merged``), each read alone, in queue order.
                db.execute("BEGIN")
                for run in runs(batch):
                    if any(failed(job) for job in run):
                        raise _Dependent  # (sorted out one job at a time, below)
                    self._run(run)
                self._commit(wrote, before_commit)
            except Exception:
                # Some job failed: nothing is committed; run the batch again with each job
                # in its own savepoint, so that the bad one fails alone.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._run_isolated(batch, failed)
                self._commit(wrote, before_commit)
        except sqlite3.Error as exc:
            # (the database itself fails: a full disk, a corrupt file)
            if db.in_transaction:
                db.execute("ROLLBACK")
            for job in batch:
                job.error = job.error or f"{type(exc).__name__}: {exc}"

    def _commit(self, wrote: bool, before_commit: Callable[[bool], None]) -> None:
        before_commit(wrote)
        self.db.execute("COMMIT")
        if wrote and self._checkpointer is not None:
            self._checkpointer.wrote.set()

    def _run_isolated(self, batch: list[Job], failed: Callable[[Job], str | None]) -> None:
        db = self.db
        db.execute("BEGIN")
        for job in batch:
            job.result, job.error = None, failed(job)
            if job.error is not None:
                continue
            db.execute("SAVEPOINT job")
            try:
                self._run([job])
            except Exception as exc:
                # One bad job (a value over SQLite's size limit, say) fails alone, and
                # never the writer: every room's storage depends on it.
                db.execute("ROLLBACK TO job")
                job.error = f"{type(exc).__name__}: {exc}"
            db.execute("RELEASE job")

    def _run(self, run: list[Job]) -> None:
        """Consecutive commits, written together; or one read."""
        if run[0].commit is not None:
            _write(self.db, Merged(job.commit for job in run if job.commit is not None))
            return
        job = run[0]
        job.result = getattr(self, "_read_" + job.what)(*job.args)

    # -- reads --------------------------------------------------------------------------

    def _read_get_many(self, room: str, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for chunk, marks in _in_chunks(keys):
            rows = self.db.execute(
                f"SELECT key, value FROM kv WHERE room = ? AND key IN ({marks})", (room, *chunk)
            )
            found.update(rows)
        return found

    def _read_list(
        self,
        room: str,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> list[tuple[str, bytes]]:
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
        return list(self.db.execute(sql, params))

    def _read_get_alarm(self, room: str) -> float | None:
        row = self.db.execute("SELECT at FROM alarms WHERE room = ?", (room,)).fetchone()
        return None if row is None else float(row[0])

    def _read_sizes(self, rooms: list[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for chunk, marks in _in_chunks(rooms):
            rows = self.db.execute(
                "SELECT room, count(*), sum(length(CAST(key AS BLOB)) + length(value)) "
                f"FROM kv WHERE room IN ({marks}) GROUP BY room",
                chunk,
            )
            found.update((room, (keys, size)) for room, keys, size in rows)
        return found

    def _read_alarms(self) -> list[tuple[str, float, str | None]]:
        return list(self.db.execute("SELECT room, at, name FROM alarms"))

    # -- faults, for tests ---------------------------------------------------------------

    def test(self, what: str, args: Any) -> None:
        """``limit_length`` N: SQLite refuses longer values; ``slow_selects`` S: each SELECT
        takes S seconds more (a busy machine)."""
        if what == "limit_length":
            self.db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, args)
        elif what == "slow_selects":
            self.db.set_trace_callback(
                lambda statement: time.sleep(args) if statement.startswith("SELECT") else None
            )
        else:
            raise ValueError(f"no such fault: {what!r}")


class _Checkpointer:
    """Copies the WAL into the database file on a thread and a connection of its own, at
    most every ``period`` seconds while there are commits: a checkpoint syncs the file, and
    run by the writer at the end of a commit (SQLite's default, every 1,000 pages) it held
    up every room's commits behind it for up to 10 ms. A passive checkpoint never blocks the
    writer, which starts the WAL over once a checkpoint has caught up."""

    def __init__(self, path: str, period: float = 0.2) -> None:
        self.wrote = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, args=(path, period), name="rooms-sqlite-checkpoints", daemon=True
        )
        self._thread.start()

    def _run(self, path: str, period: float) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            while not self._stopping:
                self.wrote.wait()
                self.wrote.clear()
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                time.sleep(period)
        except sqlite3.Error as exc:
            # (the writer's commits will fail too, and say why; the WAL keeps growing)
            log.error("SQLite checkpoints stopped (the WAL file will grow): %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping = True
        self.wrote.set()
        self._thread.join()


def _write(db: sqlite3.Connection, merged: Merged) -> None:
    """Write what a run of commits ends as with a statement per kind and per chunk of rows,
    not per row: per statement, the driver costs more than SQLite does."""
    for chunk, marks in _in_chunks([room for room, _ in merged.wiped]):
        db.execute(f"DELETE FROM kv WHERE room IN ({marks})", chunk)
    deletes = [(room, key) for room, key, _ in merged.deletes()]
    for rows, values in _row_chunks(deletes, 2):
        db.execute(f"DELETE FROM kv WHERE (room, key) IN (VALUES {values})", rows)
    puts = [(room, key, value) for room, key, value, _ in merged.puts()]
    for rows, values in _row_chunks(puts, 3):
        db.execute(f"INSERT OR REPLACE INTO kv VALUES {values}", rows)
    for (room, _), (at, name) in merged.alarms.items():
        if at is None:
            db.execute("DELETE FROM alarms WHERE room = ?", (room,))
        else:
            db.execute("INSERT OR REPLACE INTO alarms VALUES (?, ?, ?)", (room, at, name))


def _row_chunks(rows: Sequence[tuple[Any, ...]], width: int) -> Iterator[tuple[list[Any], str]]:
    """``rows`` in chunks of a power of two rows, at most 256 (so few distinct statements,
    each prepared once and cached by the driver), each flattened with its ``(?,?),(?,?)``."""
    start = 0
    while start < len(rows):
        size = min(256, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + size]
        yield [value for row in chunk for value in row], _values(size, width)
        start += size


@functools.cache
def _values(rows: int, width: int) -> str:
    one = "(" + ",".join("?" * width) + ")"
    return ",".join([one] * rows)


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


if __name__ == "__main__":
    fd, path, synchronous = sys.argv[1:4]
    serve(int(fd), lambda: SqliteStore(path, synchronous))
