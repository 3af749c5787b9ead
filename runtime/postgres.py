"""The PostgreSQL backend (cluster mode): every node's rooms in one database, each commit
fenced by the ownership epoch of its room.

Like the SQLite backend it runs on its own thread (``storage.ThreadedBackend``) with one
connection: psycopg 3's sync API, since psycopg has no trio support. A batch is one
transaction (group commit across rooms). It first locks the ownership rows of the rooms it
commits for ``FOR SHARE`` and keeps the writes of the rooms this node still holds at the epoch
each was made under; the others fail with ``FencedError`` and write nothing. The lock makes a
takeover (an update of that row) wait until the batch is over, and a takeover that came first
makes the batch see the new epoch. ``FOR KEY SHARE`` would not block the takeover's update: a
stale write could then commit after the new owner loaded its state. The commits of a batch are
merged (the last write of each key wins) and written in a few array statements, whatever the
number of rooms and commits: per statement, psycopg costs more than the database does.

A lost connection fails the batch (``StorageError``: the rooms restart from storage) and is
opened again for the next one. The schema is versioned (``rooms_schema``); the first node to
start creates or migrates it, under an advisory lock so that nodes starting together agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import psycopg

from .storage import (
    AlarmChange,
    AlarmRows,
    Done,
    FencedError,
    Job,
    ListResult,
    StorageError,
    ThreadedBackend,
)

log = logging.getLogger("rooms.storage")

Conn = psycopg.Connection[Any]

SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x726F6F6D73  # pg_advisory_xact_lock key of migrations ("rooms")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rooms_schema (version integer NOT NULL)",
    # One row per node process (an incarnation); writers never lock it, so renewals never
    # wait for a batch. The lease is judged by the database's clock only.
    """CREATE TABLE IF NOT EXISTS rooms_nodes (
        node_id     text PRIMARY KEY,
        address     text NOT NULL,
        status      text NOT NULL CHECK (status IN ('alive', 'left', 'dead')),
        lease_until timestamptz NOT NULL,
        started_at  timestamptz NOT NULL DEFAULT now()
    )""",
    # The fence: one row per room ever claimed; the epoch goes up at every change of hands.
    """CREATE TABLE IF NOT EXISTS rooms_owners (
        room       text PRIMARY KEY,
        node_id    text,
        epoch      bigint NOT NULL,
        claimed_at timestamptz NOT NULL
    ) WITH (fillfactor = 80)""",
    # Keys as UTF-8 bytes: their order is code point order, as Python sorts them
    # (RoomStorage.list merges both), and unlike text they may hold NUL, as in SQLite.
    """CREATE TABLE IF NOT EXISTS rooms_kv (
        room  text NOT NULL,
        key   bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (room, key)
    ) WITH (fillfactor = 80)""",
    """CREATE TABLE IF NOT EXISTS rooms_alarms (
        room text PRIMARY KEY,
        at   double precision NOT NULL,
        name text
    )""",
)

# Every connection of a node: a paused owner's open transaction (and its FOR SHARE locks) is
# killed before the lease runs out, so it cannot block a takeover; nothing waits forever; a
# vanished peer or server is noticed in seconds (TCP keepalives, tcp_user_timeout).
_SESSION = (
    "SET idle_in_transaction_session_timeout = '2s'",
    "SET lock_timeout = '2s'",
    "SET statement_timeout = '5s'",
)
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,
    "connect_timeout": 5,
}


def connect(dsn: str) -> Conn:
    """A connection with the session settings cluster mode relies on (autocommit: every
    transaction is explicit)."""
    conn = psycopg.connect(dsn, autocommit=True, **_KEEPALIVES)
    for statement in _SESSION:
        conn.execute(statement)
    return conn


def migrate(conn: Conn) -> None:
    """Create the schema, or check that this node can use the one there."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(statement)
        row = conn.execute("SELECT version FROM rooms_schema").fetchone()
        if row is None:
            conn.execute("INSERT INTO rooms_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise StorageError(
                f"the database's schema is version {row[0]}, newer than this node's "
                f"({SCHEMA_VERSION}): upgrade this node before it joins the cluster"
            )


class _Link:
    """The writer's connection, opened again after it was lost."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Conn | None = None
        self.failed_at = 0.0

    def get(self) -> Conn:
        if self.conn is None or self.conn.closed:
            wait = self.failed_at + 0.5 - time.monotonic()  # do not spin on a dead server
            if wait > 0:
                time.sleep(wait)
            try:
                self.conn = connect(self.dsn)
            except psycopg.Error:
                self.failed_at = time.monotonic()
                raise
        return self.conn

    def lost(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.failed_at = None, time.monotonic()


class Node(Protocol):
    """The node whose commits a backend fences (``cluster.Cluster``)."""

    node_id: str


class PgBackend(ThreadedBackend[Conn]):
    """Cluster storage for this node (``directory``: whose ``node_id`` a commit's rooms must
    be held by; it changes when the node joins again). See the module's docstring."""

    name = "postgres"

    def __init__(self, dsn: str, directory: Node) -> None:
        self.dsn = dsn
        self.directory = directory
        self.path = without_password(dsn)
        super().__init__()

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot use the cluster database {self.path}: {error}"

    # -- the thread ---------------------------------------------------------------------

    def _open(self) -> Conn:
        self._link = _Link(self.dsn)
        conn = self._link.get()
        migrate(conn)
        return conn

    def _close(self, db: Conn) -> None:
        if self._link.conn is not None:
            self._link.conn.close()

    def _run_batch(self, db: Conn, batch: list[Job[Conn]]) -> None:
        link = self._link  # (``db`` is the first connection; a lost one is opened again)
        try:
            conn = link.get()
            try:
                with conn.pipeline():  # the writes and the COMMIT in one round trip
                    self._run_in_one(conn, batch, isolated=False)
            except Exception:
                if conn.broken:
                    raise
                # One job failed: nothing is committed; again, each job in a savepoint, so
                # that the bad one fails alone (and never the thread: every room needs it).
                self._run_in_one(conn, batch, isolated=True)
        except psycopg.Error as exc:
            # The connection is gone (or the server refused the batch): its outcome is
            # unknown to us, so every job of it fails and the rooms restart from storage.
            log.error("cluster storage batch of %d jobs failed: %s", len(batch), exc)
            if link.conn is None or link.conn.broken:
                link.lost()
            for job in batch:
                job.error = job.error or StorageError(f"the cluster database: {exc}")

    def _run_in_one(self, conn: Conn, batch: list[Job[Conn]], isolated: bool) -> None:
        with conn.transaction():
            fenced = self._fenced(conn, [job.fence for job in batch if job.fence is not None])
            commits: list[_Commit] = []  # consecutive commits, written together
            for job in batch:
                job.result, job.error = None, None
                if job.fence is not None and job.fence in fenced:
                    room, epoch = job.fence
                    job.error = FencedError(f"room {room} is no longer held at epoch {epoch}")
                    continue
                if not isolated and isinstance(job.run, _Commit):
                    commits.append(job.run)
                    continue
                _write(conn, commits)  # (before a read that may follow them)
                commits = []
                if not isolated:
                    job.result = job.run(conn)
                    continue
                try:
                    with conn.transaction():  # a savepoint
                        job.result = job.run(conn)
                except Exception as exc:
                    if conn.broken:
                        raise
                    job.error = exc
            _write(conn, commits)

    def _fenced(self, conn: Conn, fences: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """The (room, epoch) of ``fences`` this node does not hold: their rows are locked
        FOR SHARE until the transaction ends, so no takeover can come between."""
        if not fences:
            return set()
        rooms = sorted({room for room, _ in fences})
        held = dict(
            conn.execute(
                "SELECT room, epoch FROM rooms_owners WHERE room = ANY(%s) AND node_id = %s "
                "ORDER BY room FOR SHARE",
                (rooms, self.directory.node_id),
            ).fetchall()
        )
        return {(room, epoch) for room, epoch in fences if held.get(room) != epoch}

    # -- the interface ------------------------------------------------------------------

    async def get_many(self, room: str, keys: list[str]) -> dict[str, bytes]:
        wanted = [key.encode() for key in keys]

        def run(db: Conn) -> dict[str, bytes]:
            rows = db.execute(
                "SELECT key, value FROM rooms_kv WHERE room = %s AND key = ANY(%s)", (room, wanted)
            )
            return {bytes(key).decode(): bytes(value) for key, value in rows}

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
        where, params = ["room = %s"], list[str | bytes]([room])
        if prefix:
            # The keys that start with it: from it to it + 0xFF (a byte UTF-8 never has).
            where.append("key >= %s AND key < %s")
            params += [prefix.encode(), prefix.encode() + b"\xff"]
        if start is not None:
            where.append("key >= %s")
            params.append(start.encode())
        if end is not None:
            where.append("key < %s")
            params.append(end.encode())
        sql = f"SELECT key, value FROM rooms_kv WHERE {' AND '.join(where)} ORDER BY key"
        sql += " DESC" if reverse else ""
        if limit is not None:
            sql += f" LIMIT {int(limit)}"

        def run(db: Conn) -> ListResult:
            return [(bytes(key).decode(), bytes(value)) for key, value in db.execute(sql, params)]

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
    ) -> None:
        if epoch is None:
            raise StorageError(f"room {room}: a cluster commit needs the room's epoch")

        def deliver(job: Job[Conn]) -> None:
            error = job.error
            if error is not None and not isinstance(error, StorageError):
                error = StorageError(f"commit failed: {error}")
            done(error)

        self._submit(_Commit(room, writes, delete_all, alarm), deliver, fence=(room, epoch))

    async def get_alarm(self, room: str) -> float | None:
        def run(db: Conn) -> float | None:
            row = db.execute("SELECT at FROM rooms_alarms WHERE room = %s", (room,)).fetchone()
            return None if row is None else float(row[0])

        at: float | None = await self._call(run)
        return at

    async def alarms(self) -> AlarmRows:
        """The alarms of the rooms this node holds (the others fire where they live, or are
        claimed by whichever node finds them due: ``cluster.Cluster.due_alarms``)."""

        def run(db: Conn) -> AlarmRows:
            rows = db.execute(
                "SELECT a.room, a.at, a.name FROM rooms_alarms a JOIN rooms_owners o "
                "USING (room) WHERE o.node_id = %s",
                (self.directory.node_id,),
            )
            return [(room, float(at), name) for room, at, name in rows]

        rows: AlarmRows = await self._call(run)
        return rows


class _Commit:
    """One room's commit, as a job's ``run`` (alone, in a savepoint, when its batch failed
    once); a batch writes its consecutive commits together (``_write``)."""

    __slots__ = ("alarm", "delete_all", "room", "writes")

    def __init__(
        self,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        alarm: AlarmChange | None,
    ) -> None:
        self.room, self.writes, self.delete_all, self.alarm = room, writes, delete_all, alarm

    def __call__(self, db: Conn) -> None:
        _write(db, [self])


def _write(db: Conn, commits: list[_Commit]) -> None:
    """Write ``commits`` in their order: what each key ends as, in at most five statements.
    (Keys are encoded here, on the thread: one that cannot be fails the batch, which then
    runs each commit alone, so that it fails alone.)"""
    if not commits:
        return
    wiped: list[str] = []
    final: dict[str, dict[bytes, bytes | None]] = {}  # room -> key -> value (None: deleted)
    alarms: dict[str, AlarmChange] = {}
    for commit in commits:
        if commit.delete_all:
            wiped.append(commit.room)
            final[commit.room] = {}
        keys = final.setdefault(commit.room, {})
        for key, value in commit.writes.items():
            keys[key.encode()] = value
        if commit.alarm is not None:
            alarms[commit.room] = commit.alarm
    puts = [(room, k, v) for room, keys in final.items() for k, v in keys.items() if v is not None]
    deletes = [(room, k) for room, keys in final.items() for k, v in keys.items() if v is None]
    cursor = db.cursor()
    if wiped:
        cursor.execute("DELETE FROM rooms_kv WHERE room = ANY(%s)", (wiped,))
    if deletes:
        cursor.execute(
            "DELETE FROM rooms_kv k USING unnest(%s::text[], %s::bytea[]) AS d(room, key) "
            "WHERE k.room = d.room AND k.key = d.key",
            _columns(deletes, 2),
        )
    if puts:
        cursor.execute(
            "INSERT INTO rooms_kv SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[]) "
            "ON CONFLICT (room, key) DO UPDATE SET value = excluded.value",
            _columns(puts, 3),
        )
    cleared = [room for room, (at, _) in alarms.items() if at is None]
    if cleared:
        cursor.execute("DELETE FROM rooms_alarms WHERE room = ANY(%s)", (cleared,))
    set_ = [(room, at, name) for room, (at, name) in alarms.items() if at is not None]
    if set_:
        cursor.execute(
            "INSERT INTO rooms_alarms SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[]) "
            "ON CONFLICT (room) DO UPDATE SET at = excluded.at, name = excluded.name",
            _columns(set_, 3),
        )


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (unnest's arguments)."""
    return [[row[i] for row in rows] for i in range(width)]


def without_password(dsn: str) -> str:
    """``dsn`` fit for a log line."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unreadable connection string)"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **info)
