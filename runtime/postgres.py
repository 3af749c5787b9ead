"""The PostgreSQL backend (cluster mode): every node's rooms in one database, each commit
fenced by the ownership epoch of its room.

It runs on its own thread (``storage.ThreadedBackend``) with one connection: psycopg 3's
sync API, since psycopg has no trio support. The commits queued together are written by one
statement, one implicit transaction and one round trip (``_WRITE``: what they end as,
``writer.Merged``), the last write of each key winning. It locks the ownership rows of the
rooms it commits for ``FOR SHARE`` and writes the rows of the rooms this node still holds at
the epoch each commit was made under; the other commits fail with ``FencedError`` and write
nothing. The lock makes a takeover (an update of that row) wait until the statement is over, and a
takeover that came first makes it see the new epoch. ``FOR KEY SHARE`` would not block the
takeover's update: a stale write could then commit after the new owner loaded its state.

A lost connection fails the jobs in flight (``StorageError``: the rooms restart from storage)
and is opened again for the next batch. The schema is versioned (``rooms_schema``); the first
node to start creates or migrates it, under an advisory lock so that nodes starting together
agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import psycopg

from .storage import (
    AlarmRows,
    Done,
    FencedError,
    Job,
    ListResult,
    Size,
    StorageError,
    ThreadedBackend,
    earlier_failure,
    groups,
)
from .writer import AlarmChange, Commit, Held, Merged, range_query

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
        done = 0
        try:
            conn = link.get()
            for group in groups(batch):
                self._run_group(conn, group)
                done += len(group)
        except psycopg.Error as exc:
            # The connection is gone: the outcome of the statement in flight is unknown to
            # us, so its jobs and the rest fail and their rooms restart from storage.
            log.error("cluster storage: %d jobs failed: %s", len(batch) - done, exc)
            if link.conn is None or link.conn.broken:
                link.lost()
            for job in batch[done:]:
                job.error = StorageError(f"the cluster database: {exc}")

    def _run_group(self, conn: Conn, group: list[Job[Conn]]) -> None:
        """A read alone, or consecutive commits in one statement; if that statement fails,
        each commit alone, so that the bad one fails alone (and never the thread: every
        room needs it)."""
        group = [job for job in group if not self._failed_earlier(job)]
        if len(group) <= 1:
            if group:
                self._run_alone(conn, group[0])
            return
        commits = [job.run for job in group if isinstance(job.run, _Commit)]
        try:
            held = _write(conn, self.directory.node_id, commits)
        except Exception:
            if conn.broken:
                raise
            for job in group:
                self._run_alone(conn, job)
            return
        for job in group:
            _outcome(job, held)

    @staticmethod
    def _failed_earlier(job: Job[Conn]) -> bool:
        """Whether ``job`` fails for its room's failed previous commit (left unwritten)."""
        job.error = earlier_failure(job)
        return job.error is not None

    def _run_alone(self, conn: Conn, job: Job[Conn]) -> None:
        if self._failed_earlier(job):
            return
        try:
            result = job.run(conn)
        except Exception as exc:
            if conn.broken:
                raise
            job.result, job.error = None, exc
            return
        if isinstance(job.run, _Commit):
            _outcome(job, result)
        else:
            job.result, job.error = result, None

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
        # (A prefix's keys: from it to it + 0xFF, a byte UTF-8 never has.)
        upper = prefix.encode() + b"\xff" if prefix else None
        sql, params = range_query(
            "rooms_kv",
            "%s",
            room,
            [bound.encode() for bound in (prefix or None, start) if bound is not None],
            [b for b in (upper, None if end is None else end.encode()) if b is not None],
            reverse,
            limit,
        )

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
        after: Any = None,
    ) -> Job[Conn]:
        if epoch is None:
            raise StorageError(f"room {room}: a cluster commit needs the room's epoch")

        def deliver(job: Job[Conn]) -> None:
            error = job.error
            if error is not None and not isinstance(error, StorageError):
                error = StorageError(f"commit failed: {error}")
            done(error)

        commit = _Commit(self.directory, room, writes, delete_all, alarm, epoch)
        return self._submit(commit, deliver, fence=(room, epoch), after=after)

    async def get_alarm(self, room: str) -> float | None:
        def run(db: Conn) -> float | None:
            row = db.execute("SELECT at FROM rooms_alarms WHERE room = %s", (room,)).fetchone()
            return None if row is None else float(row[0])

        at: float | None = await self._call(run)
        return at

    async def sizes(self, rooms: Sequence[str]) -> dict[str, Size]:
        def run(db: Conn) -> dict[str, Size]:
            rows = db.execute(
                "SELECT room, count(*), sum(length(key) + length(value)) FROM rooms_kv "
                "WHERE room = ANY(%s) GROUP BY room",
                ([*rooms],),
            )
            return {room: (keys, int(size)) for room, keys, size in rows}

        result: dict[str, Size] = await self._call(run)
        return result

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


def _outcome(job: Job[Conn], held: list[Held]) -> None:
    """A commit's outcome: written, or fenced if its (room, epoch) was not ``held``."""
    job.result, job.error = None, None
    if job.fence not in held:
        room, epoch = job.fence or ("?", 0)
        job.error = FencedError(f"room {room} is no longer held at epoch {epoch}")


class _Commit(Commit):
    """One room's commit under its epoch (``Commit``), written alone with this node's id."""

    __slots__ = ("node",)

    def __init__(
        self,
        node: Node,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        alarm: AlarmChange | None,
        epoch: int,
    ) -> None:
        super().__init__(room, writes, delete_all, alarm, epoch)
        self.node = node

    def __call__(self, db: Conn) -> list[Held]:
        return _write(db, self.node.node_id, [self])


# A batch's commits in one statement (so one implicit transaction, one round trip): ``held``
# locks the ownership rows of their rooms that this node holds FOR SHARE until it ends, so no
# takeover can come between, and every write joins it, so a row is written only where its
# room is held at its commit's epoch. The writes touch distinct rows (a statement's parts
# see one snapshot and must not change a row twice): a room wiped by delete_all loses the
# keys it does not put again, and only the keys it does put are upserted.
_WRITE = """
WITH held AS (
    SELECT room, epoch FROM rooms_owners
     WHERE room = ANY(%(rooms)s) AND node_id = %(node)s ORDER BY room FOR SHARE
), puts AS (
    SELECT * FROM unnest(%(put_room)s::text[], %(put_key)s::bytea[], %(put_value)s::bytea[],
                         %(put_epoch)s::bigint[]) AS p(room, key, value, epoch)
), wiped AS (
    DELETE FROM rooms_kv k
     USING unnest(%(wipe_room)s::text[], %(wipe_epoch)s::bigint[]) AS w(room, epoch), held o
     WHERE k.room = w.room AND o.room = w.room AND o.epoch = w.epoch
       AND NOT EXISTS (SELECT 1 FROM puts p WHERE p.room = k.room AND p.key = k.key)
), deleted AS (
    DELETE FROM rooms_kv k
     USING unnest(%(del_room)s::text[], %(del_key)s::bytea[], %(del_epoch)s::bigint[])
           AS d(room, key, epoch), held o
     WHERE k.room = d.room AND k.key = d.key AND o.room = d.room AND o.epoch = d.epoch
), put AS (
    INSERT INTO rooms_kv SELECT p.room, p.key, p.value FROM puts p
      JOIN held o ON o.room = p.room AND o.epoch = p.epoch
    ON CONFLICT (room, key) DO UPDATE SET value = excluded.value
), cleared AS (
    DELETE FROM rooms_alarms a
     USING unnest(%(clear_room)s::text[], %(clear_epoch)s::bigint[]) AS c(room, epoch), held o
     WHERE a.room = c.room AND o.room = c.room AND o.epoch = c.epoch
), alarmed AS (
    INSERT INTO rooms_alarms SELECT s.room, s.at, s.name
      FROM unnest(%(set_room)s::text[], %(set_at)s::float8[], %(set_name)s::text[],
                  %(set_epoch)s::bigint[]) AS s(room, at, name, epoch)
      JOIN held o ON o.room = s.room AND o.epoch = s.epoch
    ON CONFLICT (room) DO UPDATE SET at = excluded.at, name = excluded.name
)
SELECT room, epoch FROM held
"""


def _write(db: Conn, node_id: str, commits: list[_Commit]) -> list[Held]:
    """Write ``commits`` in their order, in one statement (``Merged``). The (room, epoch)
    this node held, whose commits were written. (Keys are encoded here, on the thread: one
    that cannot be fails the statement, and then each commit is written alone, so that it
    fails alone.)"""
    merged = Merged(commits)
    puts = [(r, k.encode(), v, e) for r, k, v, e in merged.puts()]
    deletes = [(r, k.encode(), e) for r, k, e in merged.deletes()]
    alarms = merged.alarms.items()
    set_ = [(r, at, name, e) for (r, e), (at, name) in alarms if at is not None]
    params: dict[str, Any] = {
        "rooms": sorted({commit.room for commit in commits}),
        "node": node_id,
        **_named("put", ("room", "key", "value", "epoch"), puts),
        **_named("wipe", ("room", "epoch"), list(merged.wiped)),
        **_named("del", ("room", "key", "epoch"), deletes),
        **_named("clear", ("room", "epoch"), [h for h, (at, _) in alarms if at is None]),
        **_named("set", ("room", "at", "name", "epoch"), set_),
    }
    held: list[Held] = db.execute(_WRITE, params).fetchall()
    return [(room, epoch) for room, epoch in held]


def _named(prefix: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Rows as named column lists (unnest's arguments): ``prefix_name``."""
    return {f"{prefix}_{name}": [row[i] for row in rows] for i, name in enumerate(names)}


def without_password(dsn: str) -> str:
    """``dsn`` fit for a log line."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unreadable connection string)"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **info)
