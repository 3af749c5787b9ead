"""The PostgreSQL backend's database (cluster mode), as its writer process runs it: every
node's rooms in one database, each commit fenced by the ownership epoch of its room
(``python -m runtime.postgres FD``, the DSN in ``ROOMS_CLUSTER_DSN``; the server's side is
``storage.PgBackend``, the process's loop ``writer.Writer``). Trio-free: ``cluster`` uses
``connect`` and ``migrate`` too.

One connection, psycopg 3's sync API. The commits queued together are written by one
statement, one implicit transaction and one round trip (``_WRITE``: what they end as,
``writer.Merged``), the last write of each key winning. It locks the ownership rows of the
rooms it commits for ``FOR SHARE`` and writes the rows of the rooms this node still holds at
the epoch each commit was made under; the other commits fail as fenced and write nothing.
The lock makes a takeover (an update of that row) wait until the statement is over, and a
takeover that came first makes it see the new epoch. ``FOR KEY SHARE`` would not block the
takeover's update: a stale write could then commit after the new owner loaded its state.

A lost connection fails the jobs in flight (the rooms restart from storage) and is opened
again for the next batch. The schema is versioned (``rooms_schema``); the first node to start
creates or migrates it, under an advisory lock so that nodes starting together agree.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .writer import FENCED, Held, Job, Merged, StorageError, range_query, runs, serve

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


class PgStore:
    """The writer's side of the backend (see the module's docstring)."""

    def __init__(self, dsn: str) -> None:
        self._link = _Link(dsn)
        migrate(self._link.get())
        self.info: dict[str, Any] = {}

    def close(self) -> None:
        if self._link.conn is not None:
            self._link.conn.close()

    def run_batch(
        self,
        batch: list[Job],
        failed: Callable[[Job], str | None],
        before_commit: Callable[[bool], None],
    ) -> None:
        link = self._link
        done = 0
        try:
            conn = link.get()
            for run in runs(batch):
                self._run(conn, run, failed)
                done += len(run)
        except psycopg.Error as exc:
            # The connection is gone: the outcome of the statement in flight is unknown to
            # us, so its jobs and the rest fail and their rooms restart from storage.
            log.error("cluster storage: %d jobs failed: %s", len(batch) - done, exc)
            if link.conn is None or link.conn.broken:
                link.lost()
            for job in batch[done:]:
                job.error = f"the cluster database: {exc}"

    def _run(self, conn: Conn, run: list[Job], failed: Callable[[Job], str | None]) -> None:
        """A read alone, or consecutive commits in one statement; if that statement fails,
        each commit alone, so that the bad one fails alone (and never the writer: every
        room needs it)."""
        for job in run:
            job.error = failed(job)
        run = [job for job in run if job.error is None]
        if len(run) <= 1:
            if run:
                self._run_alone(conn, run[0])
            return
        try:
            held = _write(conn, run)
        except Exception:
            if conn.broken:
                raise
            for job in run:
                self._run_alone(conn, job)
            return
        for job in run:
            _outcome(job, held)

    def _run_alone(self, conn: Conn, job: Job) -> None:
        try:
            if job.commit is not None:
                _outcome(job, _write(conn, [job]))
            else:
                job.result = getattr(self, "_read_" + job.what)(conn, *job.args)
        except Exception as exc:
            if conn.broken:
                raise
            job.result, job.error = None, f"{type(exc).__name__}: {exc}"

    # -- reads --------------------------------------------------------------------------

    def _read_get_many(self, conn: Conn, room: str, keys: list[str]) -> dict[str, bytes]:
        rows = conn.execute(
            "SELECT key, value FROM rooms_kv WHERE room = %s AND key = ANY(%s)",
            (room, [key.encode() for key in keys]),
        )
        return {bytes(key).decode(): bytes(value) for key, value in rows}

    def _read_list(
        self,
        conn: Conn,
        room: str,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> list[tuple[str, bytes]]:
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
        return [(bytes(key).decode(), bytes(value)) for key, value in conn.execute(sql, params)]

    def _read_get_alarm(self, conn: Conn, room: str) -> float | None:
        row = conn.execute("SELECT at FROM rooms_alarms WHERE room = %s", (room,)).fetchone()
        return None if row is None else float(row[0])

    def _read_sizes(self, conn: Conn, rooms: list[str]) -> dict[str, tuple[int, int]]:
        rows = conn.execute(
            "SELECT room, count(*), sum(length(key) + length(value)) FROM rooms_kv "
            "WHERE room = ANY(%s) GROUP BY room",
            (rooms,),
        )
        return {room: (keys, int(size)) for room, keys, size in rows}

    def _read_alarms(self, conn: Conn, node_id: str) -> list[tuple[str, float, str | None]]:
        """The alarms of the rooms ``node_id`` holds (the others fire where they live, or
        are claimed by whichever node finds them due: ``cluster.Cluster.due_alarms``)."""
        rows = conn.execute(
            "SELECT a.room, a.at, a.name FROM rooms_alarms a JOIN rooms_owners o "
            "USING (room) WHERE o.node_id = %s",
            (node_id,),
        )
        return [(room, float(at), name) for room, at, name in rows]

    def test(self, what: str, args: Any) -> None:
        raise ValueError(f"no such fault: {what!r}")


def _outcome(job: Job, held: list[Held]) -> None:
    """A commit's outcome: written, or fenced if its (room, epoch) was not ``held``."""
    commit = job.commit
    assert commit is not None
    job.result, job.error = None, None
    if (commit.room, commit.epoch) not in held:
        job.error = f"{FENCED}room {commit.room} is no longer held at epoch {commit.epoch}"


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


def _write(db: Conn, jobs: list[Job]) -> list[Held]:
    """Write the commits of ``jobs`` in their order, in one statement (``Merged``), as the
    node the last one names (``Commit.node``: a batch that spans a rejoin writes as the new
    incarnation, whose rooms were claimed at new epochs, so the old one's commits are fenced).
    The (room, epoch) that node held, whose commits were written. (Keys are encoded here:
    one that cannot be fails the statement, and then each commit is written alone, so that
    it fails alone.)"""
    commits = [job.commit for job in jobs if job.commit is not None]
    merged = Merged(commits)
    puts = [(r, k.encode(), v, e) for r, k, v, e in merged.puts()]
    deletes = [(r, k.encode(), e) for r, k, e in merged.deletes()]
    alarms = merged.alarms.items()
    set_ = [(r, at, name, e) for (r, e), (at, name) in alarms if at is not None]
    params: dict[str, Any] = {
        "rooms": sorted({commit.room for commit in commits}),
        "node": commits[-1].node,
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


if __name__ == "__main__":
    serve(int(sys.argv[1]), lambda: PgStore(os.environ["ROOMS_CLUSTER_DSN"]))
