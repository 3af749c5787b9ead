"""The PostgreSQL backend's fence (cluster mode), against a real PostgreSQL: a commit lands
only while its node holds the room at the epoch the room was claimed under, and a takeover
and a commit never interleave. (The backend's storage behaviour is in test_storage.py, which
runs its tests on both backends.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
import trio

from runtime.postgres import SCHEMA_VERSION, connect, migrate
from runtime.storage import FencedError, PgBackend, RoomStorage, StorageError
from tests.support import REPO, Holder


@pytest.fixture
async def backend(pg_dsn: str) -> AsyncIterator[PgBackend]:
    b = PgBackend(pg_dsn, Holder(pg_dsn))
    try:
        yield b
    finally:
        await b.aclose()


def holder(backend: PgBackend) -> Holder:
    assert isinstance(backend.directory, Holder)
    return backend.directory


async def write(backend: PgBackend, room: str, value: str, epoch: int) -> BaseException | None:
    """Commit ``{"k": value}`` to ``room`` under ``epoch``; what ``done`` got."""
    storage = RoomStorage(backend, room, lambda: None, epoch=epoch)
    storage.put("k", value)
    outcome: list[BaseException | None] = []
    done = trio.Event()

    def finished(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    storage.commit(finished)
    with trio.fail_after(10):
        await done.wait()
    return outcome[0]


def stored(dsn: str, room: str) -> bytes | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT value FROM rooms_kv WHERE room = %s AND key = 'k'", (room,)
        ).fetchone()
    return None if row is None else bytes(row[0])


def take_over(dsn: str, room: str, node: str = "node-b") -> float:
    """What a claim by another node does to the room's ownership row; how long it took."""
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE rooms_owners SET node_id = %s, epoch = epoch + 1 WHERE room = %s",
            (node, room),
        )
    return time.monotonic() - started


async def test_a_commit_under_a_stale_epoch_is_refused_and_changes_nothing(
    backend: PgBackend, pg_dsn: str
) -> None:
    holder(backend).hold("ns/r", epoch=1)
    assert await write(backend, "ns/r", "mine", epoch=1) is None
    take_over(pg_dsn, "ns/r")  # another node holds it now, at epoch 2
    refused = await write(backend, "ns/r", "stale", epoch=1)
    assert isinstance(refused, FencedError)
    assert "no longer held at epoch 1" in str(refused)
    assert stored(pg_dsn, "ns/r") == b"\xa4mine"
    # Held again by this node, but at a later epoch: a write made under the old one is stale.
    holder(backend).hold("ns/r", epoch=3)
    assert isinstance(await write(backend, "ns/r", "older", epoch=1), FencedError)
    assert stored(pg_dsn, "ns/r") == b"\xa4mine"  # (and it wrote nothing)
    assert await write(backend, "ns/r", "current", epoch=3) is None
    assert stored(pg_dsn, "ns/r") == b"\xa7current"


async def test_a_fenced_commit_fails_alone_in_its_batch(backend: PgBackend, pg_dsn: str) -> None:
    for room in ("ns/kept", "ns/lost"):
        holder(backend).hold(room)
    take_over(pg_dsn, "ns/lost")
    results: dict[str, BaseException | None] = {}

    async def commit(room: str) -> None:
        results[room] = await write(backend, room, room, epoch=1)

    async with trio.open_nursery() as nursery, backend.held():  # (both commits in one batch)
        nursery.start_soon(commit, "ns/kept")
        nursery.start_soon(commit, "ns/lost")
        await trio.testing.wait_all_tasks_blocked()
    assert results["ns/kept"] is None
    assert isinstance(results["ns/lost"], FencedError)
    assert stored(pg_dsn, "ns/kept") == b"\xa7ns/kept"
    assert stored(pg_dsn, "ns/lost") is None


async def test_a_takeover_waits_for_a_fenced_batch_in_flight_then_sees_its_writes(
    backend: PgBackend, pg_dsn: str
) -> None:
    holder(backend).hold("ns/r")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(_SLOW_WRITES)
    async with trio.open_nursery() as nursery:
        outcome: list[BaseException | None] = []

        async def commit() -> None:
            outcome.append(await write(backend, "ns/r", "in flight", epoch=1))

        nursery.start_soon(commit)
        await wait_for_activity(pg_dsn, "wait_event = 'PgSleep'")  # in flight, locked
        took: list[float] = []
        takeover = threading.Thread(target=lambda: took.append(take_over(pg_dsn, "ns/r")))
        takeover.start()
        await wait_for_activity(pg_dsn, "wait_event_type = 'Lock'")  # waits for its FOR SHARE
        assert not took and not outcome
    await trio.to_thread.run_sync(takeover.join, 10)
    assert outcome == [None]  # the batch committed first...
    assert took and stored(pg_dsn, "ns/r") == b"\xa9in flight"  # ...and the new owner sees it


# Each write to rooms_kv takes 1.5 s: a batch stays in flight, its lock held, that long.
_SLOW_WRITES = """
CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$;
CREATE TRIGGER slow_write BEFORE INSERT ON rooms_kv FOR EACH ROW EXECUTE FUNCTION slow_write();
"""


async def wait_for_activity(dsn: str, condition: str) -> None:
    """Until a session of ``dsn``'s database meets ``condition`` (on pg_stat_activity)."""
    with psycopg.connect(dsn, autocommit=True) as conn, trio.fail_after(5):
        while not conn.execute(  # noqa: ASYNC110 - PostgreSQL has no event for it
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND " + condition
        ).fetchone():
            await trio.sleep(0.02)


ZOMBIE = """
import os, signal, sys
from runtime.postgres import connect
conn = connect(sys.argv[1])
try:
    with conn.transaction():
        conn.execute("SELECT 1 FROM rooms_owners WHERE room = 'ns/r' FOR SHARE")
        conn.execute("INSERT INTO rooms_kv VALUES ('ns/r', 'k', 'zombie')")
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # paused, its transaction open, its lock held
except Exception as exc:
    print("commit failed:", type(exc).__name__, flush=True)
    sys.exit(3)
print("committed", flush=True)
"""


async def test_a_paused_writer_does_not_block_a_takeover_and_its_commit_fails_on_waking(
    backend: PgBackend, pg_dsn: str
) -> None:
    # A node paused (SIGSTOP, a long GC, a frozen VM) in the middle of a batch holds the
    # room's row lock; the session settings of every node's connection end its transaction
    # after 2 s, so the takeover goes through before the node's 3 s lease would have ended.
    holder(backend).hold("ns/r")
    proc = subprocess.Popen(  # noqa: ASYNC220 - it is read from threads below
        [sys.executable, "-c", ZOMBIE, pg_dsn], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert await trio.to_thread.run_sync(proc.stdout.readline) == "locked\n"
        took = await trio.to_thread.run_sync(take_over, pg_dsn, "ns/r")
        assert 1.5 < took < 3.0  # blocked by the paused writer, until its session was ended
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = await trio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 3, out
        assert "commit failed" in out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert stored(pg_dsn, "ns/r") is None  # nothing of the zombie's landed


async def test_a_lost_connection_fails_the_batch_and_the_next_one_reconnects(
    backend: PgBackend, pg_dsn: str
) -> None:
    holder(backend).hold("ns/r")
    assert await write(backend, "ns/r", "before", epoch=1) is None
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the server drops the backend's
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    failed = await write(backend, "ns/r", "lost", epoch=1)
    assert isinstance(failed, StorageError)  # (the rooms restart from storage)
    assert await write(backend, "ns/r", "after", epoch=1) is None
    assert stored(pg_dsn, "ns/r") == b"\xa5after"


async def test_a_schema_newer_than_the_node_is_refused_naming_both_versions(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        migrate(conn)
        migrate(conn)  # a second node starting: nothing to do
        conn.execute("UPDATE rooms_schema SET version = %s", (SCHEMA_VERSION + 1,))
        with pytest.raises(StorageError, match=f"version {SCHEMA_VERSION + 1}.*upgrade this node"):
            migrate(conn)
