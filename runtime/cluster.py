"""Cluster mode's control plane, on PostgreSQL: which nodes are alive, which holds which room.

Membership. A node process is a new incarnation (a fresh id) with a lease in its row of
``rooms_nodes``, renewed every third of ``cluster_lease_seconds`` and judged by the
database's clock only. Every node declares dead the nodes whose lease ran out, in a statement
on the same row the renewal updates: a renewal and a declaration cannot both succeed. A node
that could not renew in time fences itself before anyone may take its rooms (it stops at the
send time of its last good renewal plus the lease, minus a margin: the database computed the
lease later than that): its rooms' clients are closed with 1012 and its activations dropped;
then it joins again as a new incarnation. A node whose peers lose its link, and whose database
session is gone too (its advisory lock can be taken), is declared dead at once.

Directory. A room is claimed by the node where its first event arrives, in one statement, with
no fallback on a timeout: concurrent first events through several nodes give one owner. The
room keeps its owner while that node lives. The claim's epoch is the fencing token of the
room's commits (``runtime.postgres``). Other nodes' rooms are cached here; a refusal by the
cached owner, or the loss of it, drops the entry.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from .config import ConfigError, Settings, node_address
from .metrics import Metrics
from .placement import ClusterUnavailable, Owner
from .postgres import Conn, connect, migrate, without_password
from .storage import StorageError

log = logging.getLogger("rooms.cluster")

_SELF_FENCE_MARGIN = 0.5  # seconds before the lease ends that a cut-off node stops
_DETECT_EVERY = 1.0  # seconds between looks for nodes whose lease ran out


class _Session:
    """One database connection used from worker threads, one call at a time. A call that is
    cancelled (a renewal past its deadline, a server stopping) abandons its connection: a
    database that stopped answering can hold a socket forever (its TCP peer still acks),
    and the next call must not queue behind it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Conn | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, work: Callable[[Conn], Any]) -> Any:
        def call() -> Any:
            conn = self.conn
            if conn is None or conn.closed:
                conn = self.conn = connect(self.dsn)
            try:
                return work(conn)
            except psycopg.OperationalError:
                if conn.broken:
                    conn.close()
                raise

        try:
            return await trio.to_thread.run_sync(
                call, limiter=self._limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            # (its thread ends when its socket does; the connection closes with it)
            self.conn, self._limiter = None, trio.CapacityLimiter(1)
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Cluster:
    """This node in the cluster (see the module's docstring). ``on_fenced`` is called when
    this node had to stop serving its rooms; ``on_node_dead`` with each node found dead."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.dsn = settings.cluster
        self.address = node_address(settings)
        self.ttl = settings.cluster_lease_seconds
        self.dead_within = self.ttl + _DETECT_EVERY  # (its lease, then the detector's look)
        self.metrics = metrics
        self.node_id = _new_node_id()
        self.epochs: dict[str, int] = {}  # the rooms this node holds, and their epoch
        self._owners: dict[str, Owner] = {}  # other nodes' rooms, as last seen
        self._lease = _Session(self.dsn)  # renewals only: never behind anything else
        self._directory = _Session(self.dsn)  # claims, lookups, the detector
        self._renewed_at = -1e9  # (monotonic) when the last good renewal was sent
        self.registered = False
        self._left = False  # (after ``leave``: not joining again)
        self.on_fenced: Callable[[], None] = lambda: None
        self.on_node_dead: Callable[[str], None] = lambda node_id: None

    # -- membership ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create or check the schema, then join as a new incarnation (ConfigError if the
        database cannot be used)."""
        try:
            await self._directory.run(migrate)
            await self._register()
        except (psycopg.Error, StorageError) as exc:
            raise ConfigError(
                f"setting 'cluster': cannot use the cluster database "
                f"{without_password(self.dsn)}: {str(exc).strip()}"
            ) from None

    async def _register(self) -> None:
        node_id, address, ttl = self.node_id, self.address, self.ttl

        def register(conn: Conn) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO rooms_nodes (node_id, address, status, lease_until) "
                    "VALUES (%s, %s, 'alive', now() + make_interval(secs => %s))",
                    (node_id, address, ttl),
                )
            # Held by this session as long as it lives: a peer that can take it knows this
            # node's session (and the node, most likely) is gone.
            conn.execute("SELECT pg_advisory_lock(%s)", (_lock_key(node_id),))

        sent = trio.current_time()
        await self._lease.run(register)
        self._renewed_at = sent
        self.registered = True
        self.metrics.cluster_registrations_total += 1
        log.info("joined the cluster as node %s at %s", node_id, address)

    async def run(self) -> None:
        """Renew the lease, find dead nodes, fence this node if it is cut off; forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renewals)
            nursery.start_soon(self._detector)

    async def _renewals(self) -> None:
        while not self._left:
            if self.registered:
                deadline = self._renewed_at + self.ttl - _SELF_FENCE_MARGIN
                with trio.move_on_at(deadline):
                    await self._renew()
                if trio.current_time() >= deadline and self.registered:
                    self._fence("no lease renewal reached the cluster database in time")
            else:
                await self._rejoin()
            await trio.sleep(self.ttl / 3)

    async def _renew(self) -> None:
        node_id, ttl = self.node_id, self.ttl

        def renew(conn: Conn) -> bool:
            row = conn.execute(
                "UPDATE rooms_nodes SET lease_until = now() + make_interval(secs => %s) "
                "WHERE node_id = %s AND status = 'alive' AND lease_until >= now() "
                "RETURNING 1",
                (ttl, node_id),
            ).fetchone()
            return row is not None

        sent = trio.current_time()
        try:
            renewed = await self._lease.run(renew)
        except psycopg.Error as exc:
            log.warning("node %s: cannot renew its lease: %s", node_id, exc)
            return
        self.metrics.cluster_lease_renew_ms = round((trio.current_time() - sent) * 1000)
        if renewed:
            self._renewed_at = sent
        else:
            self._fence("the cluster declared this node dead (its lease ran out)")

    def _fence(self, why: str) -> None:
        """Stop serving every room this node holds; join again later as a new incarnation."""
        log.error(
            "node %s: %s; closing its rooms' clients (1012) and joining again", self.node_id, why
        )
        self.metrics.cluster_self_fences_total += 1
        self.registered = False
        self.epochs.clear()
        self._owners.clear()
        self.on_fenced()

    async def _rejoin(self) -> None:
        self.node_id = _new_node_id()
        self._lease.close()  # (the old session's advisory lock goes with it)
        self._lease = _Session(self.dsn)
        try:
            await self._register()
        except psycopg.Error as exc:
            log.warning("cannot join the cluster yet: %s", exc)

    async def _detector(self) -> None:
        while True:
            await trio.sleep(_DETECT_EVERY)
            try:
                dead = await self._directory.run(_declare_expired)
            except psycopg.Error as exc:
                log.warning("node %s: cannot look for dead nodes: %s", self.node_id, exc)
                continue
            for node_id in dead:
                self._dead(node_id)

    def _dead(self, node_id: str) -> None:
        log.info("node %s is dead: its rooms will be claimed where they are needed", node_id)
        self.metrics.cluster_dead_nodes_total += 1
        self.forget_node(node_id)
        self.on_node_dead(node_id)

    async def link_lost(self, node_id: str) -> None:
        """The link to ``node_id`` broke: if its database session is gone too, it is dead
        now (no need to wait for its lease)."""

        def check(conn: Conn) -> bool:
            key = _lock_key(node_id)
            taken = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (taken and taken[0]):
                return False  # its session still holds it: alive, only the link broke
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            row = conn.execute(
                "UPDATE rooms_nodes SET status = 'dead' WHERE node_id = %s AND status = 'alive' "
                "RETURNING 1",
                (node_id,),
            ).fetchone()
            return row is not None

        try:
            if await self._directory.run(check):
                self._dead(node_id)
        except psycopg.Error as exc:
            log.warning("cannot check node %s: %s", node_id, exc)

    # -- the directory -------------------------------------------------------------------

    async def locate(self, key: str) -> Owner:
        """Where room ``key`` lives, claiming it for this node if nobody live holds it."""
        if not self.registered:
            raise ClusterUnavailable("this node has lost the cluster database")
        epoch = self.epochs.get(key)
        if epoch is not None:
            return Owner(self.node_id, self.address, epoch)
        cached = self._owners.get(key)
        if cached is not None:
            return cached
        node_id, address = self.node_id, self.address

        def claim_or_find(conn: Conn) -> tuple[Owner, bool] | None:
            with conn.transaction():
                row = conn.execute(_CLAIM, {"room": key, "me": node_id}).fetchone()
                if row is not None:
                    return Owner(node_id, address, row[0]), True
                row = conn.execute(_OWNER, (key,)).fetchone()
                return None if row is None else (Owner(*row), False)

        found: tuple[Owner, bool] | None = None
        for _ in range(5):  # the owner may die between the claim and the look-up: again
            try:
                found = await self._directory.run(claim_or_find)
            except psycopg.errors.LockNotAvailable:
                found = None  # a takeover waiting for a batch: again
            if found is not None:
                break
        if found is None:
            raise ClusterUnavailable(f"room {key} could not be placed (busy): retry")
        owner, claimed = found
        if claimed:
            self.metrics.cluster_claims_total += 1
        if owner.node_id == self.node_id:
            self.epochs[key] = owner.epoch
        else:
            self._owners[key] = owner
        return owner

    async def renewing(self, node_id: str) -> bool:
        """Whether ``node_id`` renews its lease on time (alive, more than half the lease left;
        it renews every third): a node that renews but cannot be reached is cut off from this
        one only, and waiting here for its rooms to be claimed again would be in vain."""

        def look(conn: Conn) -> bool:
            row = conn.execute(
                "SELECT lease_until - now() > make_interval(secs => %s) FROM rooms_nodes "
                "WHERE node_id = %s AND status = 'alive'",
                (self.ttl / 2, node_id),
            ).fetchone()
            return bool(row and row[0])

        try:
            renews: bool = await self._directory.run(look)
        except psycopg.Error:
            return False  # (this node's own trouble: placing the room will say so)
        return renews

    def forget(self, key: str) -> None:
        """Drop what is known of room ``key`` (fenced here, or refused by its owner)."""
        self.epochs.pop(key, None)
        self._owners.pop(key, None)

    def forget_node(self, node_id: str) -> None:
        """Drop the rooms cached as ``node_id``'s (its link broke: look them up again)."""
        for key in [k for k, owner in self._owners.items() if owner.node_id == node_id]:
            del self._owners[key]

    async def leave(self) -> None:
        """A drain's end: give every room back at once (others claim them without waiting for
        a lease) and leave the cluster."""
        node_id = self.node_id

        def leave(conn: Conn) -> None:
            with conn.transaction():
                conn.execute(
                    "UPDATE rooms_owners SET node_id = NULL WHERE node_id = %s",
                    (node_id,),
                )
                conn.execute(
                    "UPDATE rooms_nodes SET status = 'left' WHERE node_id = %s", (node_id,)
                )

        self.registered, self._left = False, True
        self.epochs.clear()
        try:
            await self._directory.run(leave)
        except psycopg.Error as exc:
            log.warning("could not give back the rooms (the lease will run out): %s", exc)

    async def status(self) -> dict[str, Any]:
        """The cluster as the database sees it (``status``), for the operator."""
        found: dict[str, Any] = await self._directory.run(_status)
        return found

    async def owner_of(self, key: str) -> Owner | None:
        """The live node holding room ``key``, if one does (never claims it)."""
        epoch = self.epochs.get(key)
        if epoch is not None:
            return Owner(self.node_id, self.address, epoch)
        row = await self._directory.run(lambda conn: conn.execute(_OWNER, (key,)).fetchone())
        return None if row is None else Owner(*row)

    async def due_alarms(self) -> list[tuple[str, float, str | None]]:
        """Alarms that are due in rooms nobody live holds (their node died): claim and fire."""
        rows: list[tuple[str, float, str | None]] = await self._directory.run(_due_orphan_alarms)
        return rows

    def close(self) -> None:
        self._lease.close()
        self._directory.close()


_CLAIM = """
INSERT INTO rooms_owners AS o (room, node_id, epoch, claimed_at)
VALUES (%(room)s, %(me)s, 1, now())
ON CONFLICT (room) DO UPDATE
   SET node_id = excluded.node_id, epoch = o.epoch + 1, claimed_at = now()
 WHERE o.node_id IS NULL
    OR NOT EXISTS (SELECT 1 FROM rooms_nodes n WHERE n.node_id = o.node_id AND n.status = 'alive')
RETURNING epoch
"""

_OWNER = """
SELECT o.node_id, n.address, o.epoch FROM rooms_owners o JOIN rooms_nodes n USING (node_id)
 WHERE o.room = %s AND n.status = 'alive'
"""


def _declare_expired(conn: Conn) -> list[str]:
    # (In the same statement, the rows of nodes gone for a day are deleted: a room whose
    # owner has no row is unowned, as it is when the row says dead.)
    rows = conn.execute(
        "WITH gone AS (DELETE FROM rooms_nodes WHERE status <> 'alive' "
        "AND lease_until < now() - interval '1 day') "
        "UPDATE rooms_nodes SET status = 'dead' WHERE status = 'alive' AND lease_until < now() "
        "RETURNING node_id"
    ).fetchall()
    return [row[0] for row in rows]


def _due_orphan_alarms(conn: Conn) -> list[tuple[str, float, str | None]]:
    rows = conn.execute(
        "SELECT a.room, a.at, a.name FROM rooms_alarms a "
        "LEFT JOIN rooms_owners o USING (room) LEFT JOIN rooms_nodes n ON n.node_id = o.node_id "
        "WHERE a.at <= extract(epoch FROM now()) "
        "AND (o.node_id IS NULL OR n.node_id IS NULL OR n.status <> 'alive')"
    ).fetchall()
    return [(room, float(at), name) for room, at, name in rows]


def status(dsn: str) -> dict[str, Any]:
    """The cluster as the database sees it: every node not long dead, and rooms per node
    (for ``rooms cluster status``; ``Cluster.status`` from a node)."""
    with connect(dsn) as conn:
        return _status(conn)


def _status(conn: Conn) -> dict[str, Any]:
    nodes = conn.execute(
        "SELECT n.node_id, n.address, n.status, "
        "extract(epoch FROM n.lease_until - now())::float, "
        "(SELECT count(*) FROM rooms_owners o WHERE o.node_id = n.node_id) "
        "FROM rooms_nodes n "
        "WHERE n.status = 'alive' OR n.lease_until > now() - interval '1 hour' "
        "ORDER BY n.started_at"
    ).fetchall()
    unowned = conn.execute(
        "SELECT count(*) FROM rooms_owners o WHERE o.node_id IS NULL OR NOT EXISTS "
        "(SELECT 1 FROM rooms_nodes n WHERE n.node_id = o.node_id AND n.status = 'alive')"
    ).fetchone()
    return {
        "nodes": [
            {"node": n, "address": a, "status": s, "lease_left_s": round(left, 2), "rooms": rooms}
            for n, a, s, left, rooms in nodes
        ],
        "rooms_without_live_owner": unowned[0] if unowned else 0,
    }


def _new_node_id() -> str:
    return secrets.token_hex(8)


def _lock_key(node_id: str) -> int:
    """The node's advisory lock (a signed 64-bit key)."""
    return int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big", signed=True)
