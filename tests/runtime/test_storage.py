"""Storage: the backends and a room's view of them (cache, pending writes, list). The tests
of the ``backend`` fixture run against both SQLite and PostgreSQL (cluster mode)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from rooms._engine import encode
from runtime.config import ConfigError
from runtime.storage import (
    MAX_KEY_BYTES,
    Backend,
    PgBackend,
    ProcessBackend,
    RoomStorage,
    SqliteBackend,
    StorageError,
    _lock,
)
from tests.support import Holder

# ---------------------------------------------------------------------------------------
# helpers


async def commit(storage: RoomStorage) -> BaseException | None:
    """Commit ``storage``'s pending writes; return what ``done`` was called with."""
    done = trio.Event()
    outcome: list[BaseException | None] = []

    def finished(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    storage.commit(finished)
    with trio.fail_after(5):
        await done.wait()
    assert len(outcome) == 1  # done is called exactly once
    return outcome[0]


class Outcomes:
    """Collects ``done(error)`` callbacks by name; ``all`` is set once ``expected`` arrived."""

    def __init__(self, expected: int) -> None:
        self.errors: dict[str, BaseException | None] = {}
        self.expected = expected
        self.all = trio.Event()

    def callback(self, name: str) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            assert name not in self.errors, f"done of {name} called twice"
            self.errors[name] = error
            if len(self.errors) == self.expected:
                self.all.set()

        return done

    async def wait(self) -> None:
        with trio.fail_after(5):
            await self.all.wait()


def view(
    backend: Backend, room: str = "ns/room", on_first_write: Callable[[], None] = lambda: None
) -> RoomStorage:
    """A fresh room view (empty cache) of ``room`` on ``backend`` (held by the node, on
    PostgreSQL: its commits are fenced)."""
    epoch = None
    if isinstance(backend, PgBackend):
        holder = backend.directory
        assert isinstance(holder, Holder)
        if room not in holder.epochs:
            holder.hold(room)
        epoch = holder.epochs[room]
    return RoomStorage(backend, room, on_first_write, epoch=epoch)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b: Backend
    if request.param == "sqlite":
        b = SqliteBackend(":memory:")
    else:
        dsn = request.getfixturevalue("pg_dsn")
        b = PgBackend(dsn, Holder(dsn))
    try:
        yield b
    finally:
        await b.aclose()


# ---------------------------------------------------------------------------------------
# values and keys


VALUES: list[tuple[str, Any, Any]] = [
    # (key, value put, value read back)
    ("none", None, None),
    ("true", True, True),
    ("false", False, False),
    ("zero", 0, 0),
    ("int", -123456789, -123456789),
    ("int64max", 2**63 - 1, 2**63 - 1),
    ("int64min", -(2**63), -(2**63)),
    ("uint64max", 2**64 - 1, 2**64 - 1),
    ("float", 2.5, 2.5),
    ("float-whole", 1.0, 1.0),
    ("str", "héllo \U0001f600", "héllo \U0001f600"),
    ("empty-str", "", ""),
    ("bytes", b"\x00\xff", b"\x00\xff"),
    ("empty-bytes", b"", b""),
    ("list", [1, "a", None], [1, "a", None]),
    ("tuple", (1, (2, 3)), [1, [2, 3]]),
    ("dict", {"a": {"b": [1, {"c": b"d"}]}}, {"a": {"b": [1, {"c": b"d"}]}}),
    ("int-keys", {1: "one", 2: "two"}, {1: "one", 2: "two"}),
    ("empty", {}, {}),
]


async def test_values_round_trip_through_the_database(backend: Backend) -> None:
    s = view(backend)
    for key, value, _ in VALUES:
        s.put(key, value)
    # Pending values already read back as they will after the commit.
    for key, _, expected in VALUES:
        assert await s.get(key) == expected, key
    assert await commit(s) is None
    fresh = view(backend)  # empty cache: every value comes from SQLite
    got = await fresh.get_many([key for key, _, _ in VALUES])
    for key, _, expected in VALUES:
        assert got[key] == expected, key
        assert type(got[key]) is type(expected), key  # True stays bool, 1.0 stays float
    assert type(await fresh.get("bytes")) is bytes and type(await fresh.get("str")) is str


async def test_the_read_cache_keeps_at_most_its_bytes_then_starts_over() -> None:
    """What a room wrote or read is read again from memory, up to ``storage_cache_bytes``
    (keys, values and an entry's overhead); past it the cache starts over, and is counted."""
    backend = SqliteBackend(":memory:")
    reads: list[list[str]] = []
    read = backend.get_many

    async def counted(room: str, keys: list[str]) -> dict[str, bytes]:
        reads.append(list(keys))
        return await read(room, keys)

    backend.get_many = counted  # type: ignore[method-assign]
    resets: list[int] = []
    storage = RoomStorage(
        backend, "ns/room", lambda: None, cache_bytes=2_000, on_cache_full=lambda: resets.append(1)
    )
    try:
        storage.put("a", "x" * 100)  # about 170 bytes in the cache: eleven such fit
        assert await commit(storage) is None
        assert await storage.get("a") == "x" * 100 and reads == []
        for i in range(20):
            storage.put(f"k{i}", "y" * 100)
            assert await commit(storage) is None
        assert resets == [1]  # at the twelfth value
        assert await storage.get("k19") == "y" * 100 and reads == []  # still cached
        assert await storage.get("a") == "x" * 100 and reads == [["a"]]  # gone: read again
    finally:
        await backend.aclose()


async def test_get_of_a_missing_key_returns_the_default(backend: Backend) -> None:
    s = view(backend)
    assert await s.get("missing") is None
    assert await s.get("missing", "default") == "default"
    s.put("present", None)  # a stored None is a value, not an absence
    assert await s.get("present", "default") is None
    await commit(s)
    assert await view(backend).get("present", "default") is None
    assert await view(backend).get("missing", 0) == 0


async def test_get_many_returns_only_the_keys_found_in_the_order_asked(
    backend: Backend,
) -> None:
    s = view(backend)
    s.put_many({"a": 1, "b": 2, "c": 3})
    await commit(s)
    got = await view(backend).get_many(["c", "missing", "a"])
    assert list(got.items()) == [("c", 3), ("a", 1)]
    assert await view(backend).get_many([]) == {}
    # More keys than one SQL statement takes (chunks of 500).
    many = view(backend, "ns/many")
    many.put_many({f"k{i:04}": i for i in range(1200)})
    await commit(many)
    got = await view(backend, "ns/many").get_many([f"k{i:04}" for i in range(1300)])
    assert got == {f"k{i:04}": i for i in range(1200)}


async def test_delete_removes_a_stored_key(backend: Backend) -> None:
    s = view(backend)
    s.put_many({"a": 1, "b": 2})
    await commit(s)
    s.delete("a")
    s.delete("never-stored")  # deleting an absent key is fine
    assert await s.get("a") is None
    assert await commit(s) is None
    fresh = view(backend)
    assert await fresh.get("a", "gone") == "gone"
    assert await fresh.list() == {"b": 2}


async def test_a_value_that_msgpack_cannot_encode_is_a_type_error_naming_the_key(
    backend: Backend,
) -> None:
    s = view(backend)
    for value in [object(), {"nested": {1, 2}}, [1, object()], 2**64, -(2**63) - 1]:
        with pytest.raises(TypeError, match="'profile'"):
            s.put("profile", value)
    with pytest.raises(TypeError, match="'bad'"):
        s.put_many({"good": 1, "bad": object()})
    # Nothing of a refused put or put_many was written, not even its good entries.
    assert not s.has_writes
    assert await s.get("profile") is None and await s.get("good") is None


async def test_a_value_that_cannot_be_read_back_is_refused_at_put(backend: Backend) -> None:
    s = view(backend)
    with pytest.raises(TypeError, match="'pairs'"):
        s.put("pairs", {(1, 2): "x"})


async def test_keys_must_be_str(backend: Backend) -> None:
    s = view(backend)
    bad_keys: list[Any] = [5, b"k", None, ("a",)]
    for key in bad_keys:
        with pytest.raises(TypeError, match="keys are str"):
            s.put(key, "x")
        with pytest.raises(TypeError, match="keys are str"):
            s.delete(key)
        with pytest.raises(TypeError, match="keys are str"):
            await s.get(key)
        with pytest.raises(TypeError, match="keys are str"):
            s.put_many({key: "x"})
    assert not s.has_writes


async def test_a_key_over_2048_bytes_is_refused_naming_its_size(backend: Backend) -> None:
    s = view(backend)
    for key in ["x" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1)]:
        with pytest.raises(ValueError, match=f"{len(key.encode())} bytes in UTF-8"):
            s.put(key, 1)
        with pytest.raises(ValueError, match="at most 2048"):
            await s.get(key)
    assert not s.has_writes


async def test_odd_but_valid_keys(backend: Backend) -> None:
    s = view(backend)
    keys = ["", " ", "a\x00b", "\x00", "é", "\U0010ffff", "with/slash", "x" * MAX_KEY_BYTES]
    s.put_many({k: i for i, k in enumerate(keys)})
    await commit(s)
    assert await view(backend).get_many(keys) == {k: i for i, k in enumerate(keys)}
    assert list(await view(backend).list()) == sorted(keys)


# ---------------------------------------------------------------------------------------
# pending writes


async def test_reads_see_pending_writes_and_rollback_forgets_them(
    backend: Backend,
) -> None:
    s = view(backend)
    s.put_many({"a": 1, "b": 2})
    await commit(s)
    s.delete("a")
    s.put("c", 3)
    s.put("b", 20)
    assert await s.get("a") is None
    assert await s.get_many(["a", "b", "c"]) == {"b": 20, "c": 3}
    assert await s.list() == {"b": 20, "c": 3}
    s.rollback()
    assert not s.has_writes
    assert await s.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert await s.list() == {"a": 1, "b": 2}


async def test_delete_all_is_seen_by_reads_and_undone_by_rollback(
    backend: Backend,
) -> None:
    s = view(backend)
    s.put_many({"a": 1, "b": 2})
    await commit(s)
    assert await s.get("a") == 1  # now cached
    s.delete_all()
    assert s.has_writes
    assert await s.get("a") is None
    assert await s.get_many(["a", "b"]) == {}
    assert await s.list() == {}
    s.rollback()
    assert await s.get("a") == 1
    assert await s.list() == {"a": 1, "b": 2}


async def test_delete_all_then_put_in_one_event_keeps_only_the_new_key(
    backend: Backend,
) -> None:
    s = view(backend)
    s.put_many({"a": 1, "b": 2})
    await commit(s)
    s.delete_all()
    s.put("z", 26)
    assert await s.get_many(["a", "b", "z"]) == {"z": 26}
    assert await s.list() == {"z": 26}
    assert await commit(s) is None
    assert await s.list() == {"z": 26}
    assert await s.get("a") is None  # the view's cache forgot the deleted keys
    fresh = view(backend)
    assert await fresh.list() == {"z": 26}
    assert await fresh.get_many(["a", "b", "z"]) == {"z": 26}


async def test_put_then_delete_of_the_same_key_in_one_event(backend: Backend) -> None:
    s = view(backend)
    s.put("k", "old")
    await commit(s)
    s.put("k", "new")
    s.delete("k")
    assert await s.get("k") is None
    await commit(s)
    assert await view(backend).get("k") is None
    s.delete("k")
    s.put("k", "again")
    await commit(s)
    assert await view(backend).get("k") == "again"


async def test_on_first_write_is_called_once_per_batch_of_writes(
    backend: Backend,
) -> None:
    calls: list[int] = []
    s = view(backend, "ns/room", lambda: calls.append(1))
    await s.get("a")
    assert calls == []  # reads are not writes
    s.put("a", 1)
    s.put("b", 2)
    s.delete("c")
    s.delete_all()
    assert len(calls) == 1
    await commit(s)
    s.delete("a")
    assert len(calls) == 2  # the next event's first write
    s.rollback()
    s.delete_all()
    assert len(calls) == 3


async def test_reads_see_writes_whose_commit_is_still_in_flight(backend: Backend) -> None:
    s = view(backend)
    outcomes = Outcomes(1)
    s.put("k", "v")
    s.commit(outcomes.callback("k"))
    # No await in between: the read is queued behind the commit and must see it.
    assert await view(backend).get("k") == "v"
    assert await s.get("k") == "v"
    await outcomes.wait()
    assert outcomes.errors["k"] is None


# ---------------------------------------------------------------------------------------
# list


@pytest.fixture
async def letters(backend: Backend) -> RoomStorage:
    """A view on a room that stores a, b, c, msg:1, msg:2, msg:3 (values upper-cased)."""
    s = view(backend)
    s.put_many({k: k.upper() for k in ["a", "b", "c", "msg:1", "msg:2", "msg:3"]})
    assert await commit(s) is None
    return view(backend)


async def test_list_ranges(letters: RoomStorage) -> None:
    s = letters
    assert list(await s.list()) == ["a", "b", "c", "msg:1", "msg:2", "msg:3"]
    assert await s.list(prefix="msg:") == {"msg:1": "MSG:1", "msg:2": "MSG:2", "msg:3": "MSG:3"}
    assert list(await s.list(prefix="")) == list(await s.list())
    assert await s.list(prefix="nope") == {}
    assert list(await s.list(start="b")) == ["b", "c", "msg:1", "msg:2", "msg:3"]  # inclusive
    assert list(await s.list(end="c")) == ["a", "b"]  # exclusive
    assert list(await s.list(start="b", end="msg:2")) == ["b", "c", "msg:1"]
    assert await s.list(start="b", end="b") == {}
    assert await s.list(start="c", end="a") == {}
    assert list(await s.list(reverse=True)) == ["msg:3", "msg:2", "msg:1", "c", "b", "a"]
    assert list(await s.list(limit=2)) == ["a", "b"]
    assert list(await s.list(reverse=True, limit=2)) == ["msg:3", "msg:2"]
    assert list(await s.list(limit=100)) == ["a", "b", "c", "msg:1", "msg:2", "msg:3"]


async def test_list_combinations(letters: RoomStorage) -> None:
    s = letters
    assert list(await s.list(prefix="msg:", reverse=True, limit=2)) == ["msg:3", "msg:2"]
    assert list(await s.list(prefix="msg:", start="msg:2")) == ["msg:2", "msg:3"]
    assert list(await s.list(prefix="msg:", end="msg:3", reverse=True)) == ["msg:2", "msg:1"]
    assert list(await s.list(prefix="msg:", start="a", end="msg:2")) == ["msg:1"]
    assert list(await s.list(start="b", end="msg:3", reverse=True, limit=3)) == [
        "msg:2",
        "msg:1",
        "c",
    ]


async def test_list_limit_zero_and_negative(letters: RoomStorage) -> None:
    assert await letters.list(limit=0) == {}
    assert await letters.list(prefix="msg:", reverse=True, limit=0) == {}
    with pytest.raises(ValueError, match="limit"):
        await letters.list(limit=-1)


async def test_list_merges_pending_writes_with_stored_rows(letters: RoomStorage) -> None:
    s = letters
    s.delete("b")
    s.put("d", "D")
    assert list(await s.list(limit=3)) == ["a", "c", "d"]
    assert await s.list(limit=3) == {"a": "A", "c": "C", "d": "D"}
    assert list(await s.list(reverse=True, limit=4)) == ["msg:3", "msg:2", "msg:1", "d"]
    s.put("a", "new a")  # a pending put over a stored row wins
    assert (await s.list(limit=1)) == {"a": "new a"}
    # Deletes of the first rows still leave `limit` rows.
    s.delete("a")
    s.delete("c")
    s.delete("d")
    assert list(await s.list(limit=2)) == ["msg:1", "msg:2"]
    s.delete("msg:3")
    assert list(await s.list(reverse=True, limit=2)) == ["msg:2", "msg:1"]
    # Pending writes outside the range are left out.
    s.put("msg:0", "0")
    s.put("zzz", "Z")
    assert list(await s.list(prefix="msg:")) == ["msg:0", "msg:1", "msg:2"]
    assert list(await s.list(start="m", end="n")) == ["msg:0", "msg:1", "msg:2"]
    # And the committed result is the same as the merged view.
    before = await s.list()
    assert await commit(s) is None
    assert await s.list() == before


async def test_list_prefix_ending_with_the_last_code_point(backend: Backend) -> None:
    s = view(backend)
    top = "\U0010ffff"
    s.put_many({"a": 1, "b": 2, "b" + top: 3, "b" + top + "x": 4, top: 5, top + top: 6, "c": 7})
    # pending only
    assert list(await s.list(prefix="b" + top)) == ["b" + top, "b" + top + "x"]
    await commit(s)
    s = view(backend)
    assert list(await s.list(prefix="b" + top)) == ["b" + top, "b" + top + "x"]
    assert list(await s.list(prefix=top)) == [top, top + top]
    assert list(await s.list(prefix=top + top)) == [top + top]
    assert list(await s.list(prefix="b")) == ["b", "b" + top, "b" + top + "x"]
    s.put(top + "pending", 8)
    assert list(await s.list(prefix=top, reverse=True)) == [top + top, top + "pending", top]


# ---------------------------------------------------------------------------------------
# rooms, durability, group commit, errors


async def test_rooms_do_not_see_each_others_data(backend: Backend) -> None:
    one, two = view(backend, "ns/one"), view(backend, "ns/two")
    one.put_many({"k": "one", "only-one": 1})
    two.put("k", "two")
    await commit(one)
    await commit(two)
    assert await view(backend, "ns/one").list() == {"k": "one", "only-one": 1}
    assert await view(backend, "ns/two").list() == {"k": "two"}
    assert await view(backend, "ns/two").get("only-one") is None
    assert await view(backend, "ns/three").list() == {}
    two.delete_all()
    await commit(two)
    assert await view(backend, "ns/one").list() == {"k": "one", "only-one": 1}
    assert await view(backend, "ns/two").list() == {}


async def test_commits_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rooms.sqlite3"
    backend = SqliteBackend(path)
    one, two = view(backend, "ns/one"), view(backend, "ns/two")
    one.put("k", "one")
    two.put_many({"k": "two", "x": [1, 2]})
    assert await commit(one) is None
    assert await commit(two) is None
    await backend.aclose()
    reopened = SqliteBackend(path)
    try:
        assert await view(reopened, "ns/one").get("k") == "one"
        assert await view(reopened, "ns/two").list() == {"k": "two", "x": [1, 2]}
    finally:
        await reopened.aclose()
    with sqlite3.connect(path) as db:  # WAL mode is a property of the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_aclose_finishes_queued_commits(tmp_path: Path) -> None:
    path = tmp_path / "rooms.sqlite3"
    backend = SqliteBackend(path, synchronous="FULL")
    outcomes = Outcomes(10)
    for i in range(10):
        s = view(backend, f"ns/{i}")
        s.put("n", i)
        s.commit(outcomes.callback(str(i)))
    await backend.aclose()  # no wait for the callbacks first
    await outcomes.wait()
    assert set(outcomes.errors.values()) == {None}
    await backend.aclose()  # twice is fine
    reopened = SqliteBackend(path)
    try:
        assert [await view(reopened, f"ns/{i}").get("n") for i in range(10)] == list(range(10))
    finally:
        await reopened.aclose()


async def test_a_closed_backend_refuses_work() -> None:
    backend = SqliteBackend(":memory:")
    await backend.aclose()
    s = view(backend)
    with pytest.raises(StorageError, match="closed"):
        await s.get("k")
    s.put("k", 1)
    with pytest.raises(StorageError, match="closed"):
        s.commit(lambda error: None)


async def test_bad_backend_arguments(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        SqliteBackend(tmp_path / "no" / "such" / "folder" / "rooms.sqlite3")
    with pytest.raises(ValueError, match="synchronous"):
        SqliteBackend(":memory:", synchronous="SOMETIMES")


async def test_group_commit_of_many_rooms(backend: Backend) -> None:
    outcomes = Outcomes(200)
    for i in range(200):
        s = view(backend, f"ns/{i}")
        s.put("n", i)
        s.put(f"only-{i}", True)
        s.commit(outcomes.callback(str(i)))  # no await in between: grouped commits
    await outcomes.wait()
    assert list(outcomes.errors.values()) == [None] * 200
    assert [await view(backend, f"ns/{i}").get("n") for i in range(200)] == list(range(200))
    assert await view(backend, "ns/7").list() == {"n": 7, "only-7": True}


async def test_many_commits_of_one_room_in_one_batch_apply_in_order(backend: Backend) -> None:
    """Commits queued together land in one transaction (PostgreSQL merges them): each key
    ends as the last commit left it, a delete_all in the middle wipes only what came
    before it, and the last alarm change of each room wins."""
    a, b = view(backend, "ns/a"), view(backend, "ns/b")
    outcomes = Outcomes(6)
    async with one_batch(backend):
        queue_six_commits(a, b, outcomes)
    await outcomes.wait()
    assert list(outcomes.errors.values()) == [None] * 6
    assert await view(backend, "ns/a").list() == {"after": True, "seq": 4}
    assert await view(backend, "ns/b").list() == {"k": "b2"}
    assert await backend.get_alarm("ns/a") == 200.0
    assert await backend.get_alarm("ns/b") is None


def one_batch(backend: Backend) -> AbstractAsyncContextManager[None]:
    """While in the body, the backend starts no batch: what the body queues runs as one."""
    assert isinstance(backend, ProcessBackend)
    return backend.held()


def queue_six_commits(a: RoomStorage, b: RoomStorage, outcomes: Outcomes) -> None:
    a.put("seq", 1)
    a.put("old", "x")
    a.set_alarm(100.0)
    a.commit(outcomes.callback("1"))
    b.put("k", "b1")
    b.set_alarm(50.0)
    b.commit(outcomes.callback("2"))
    a.put("seq", 2)
    a.delete("old")
    a.put("gone", "y")
    a.commit(outcomes.callback("3"))
    a.delete_all()
    a.put("seq", 3)
    a.put("after", True)
    a.commit(outcomes.callback("4"))
    b.put("k", "b2")
    b.delete_alarm()
    b.commit(outcomes.callback("5"))
    a.put("seq", 4)
    a.set_alarm(200.0)
    a.commit(outcomes.callback("6"))


async def test_a_failing_commit_fails_alone_in_its_batch(backend: Backend) -> None:
    """Three commits in one transaction; the database refuses the middle one (SQLite: a
    blob over its length limit; PostgreSQL: a trigger): it alone fails, with a
    StorageError, and the other two are durable."""
    # Make the database refuse the bad room's big value.
    if isinstance(backend, PgBackend):
        with psycopg.connect(backend.dsn, autocommit=True) as conn:
            conn.execute(_REFUSE_BIG_VALUES)
    else:
        assert isinstance(backend, SqliteBackend)
        await backend.fault("limit_length", 1000).wait()
    first, bad, last = view(backend, "ns/first"), view(backend, "ns/bad"), view(backend, "ns/last")
    first.put("k", "first")
    bad.put("small", "fits")
    bad.put("big", b"x" * 5000)
    last.put("k", "last")
    outcomes = Outcomes(3)
    async with one_batch(backend):
        first.commit(outcomes.callback("first"))
        bad.commit(outcomes.callback("bad"))
        last.commit(outcomes.callback("last"))
    await outcomes.wait()
    assert outcomes.errors["first"] is None
    assert outcomes.errors["last"] is None
    assert isinstance(outcomes.errors["bad"], StorageError)
    assert re.search("too big|refused: too big", str(outcomes.errors["bad"]))
    assert await view(backend, "ns/first").get("k") == "first"
    assert await view(backend, "ns/last").get("k") == "last"
    assert await view(backend, "ns/bad").list() == {}  # atomic: not even the small key
    # The writer lives on.
    after = view(backend, "ns/after")
    after.put("k", "ok")
    assert await commit(after) is None


_REFUSE_BIG_VALUES = """
CREATE FUNCTION refuse_big() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF length(NEW.value) > 1000 THEN RAISE EXCEPTION 'refused: too big'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_big BEFORE INSERT ON rooms_kv FOR EACH ROW EXECUTE FUNCTION refuse_big();
"""


async def test_a_key_sqlite_cannot_store_is_refused_and_never_kills_the_thread(
    backend: Backend,
) -> None:
    with pytest.raises(ValueError, match="surrogate"):
        view(backend).put("\ud800", 1)
    with pytest.raises(ValueError, match="surrogate"):
        view(backend).delete("\udfff")
    # Past that check (straight to the backend), the job fails alone.
    outcomes = Outcomes(2)
    good = view(backend, "ns/good")
    good.put("k", "fine")
    epoch = 1 if isinstance(backend, PgBackend) else None
    view(backend, "ns/bad")  # (held, on PostgreSQL)
    backend.commit("ns/bad", {"\ud800": b"x"}, False, outcomes.callback("bad"), epoch=epoch)
    good.commit(outcomes.callback("good"))
    await outcomes.wait()
    assert isinstance(outcomes.errors["bad"], StorageError)
    assert outcomes.errors["good"] is None
    assert await view(backend, "ns/good").get("k") == "fine"


async def test_sizes_count_each_rooms_keys_and_bytes(backend: Backend) -> None:
    ours, other = view(backend, "ns/ours"), view(backend, "ns/other")
    ours.put_many({"é": "x" * 100, "b": 1})
    other.put("k", b"")
    assert await commit(ours) is None and await commit(other) is None
    ours_bytes = len("é".encode()) + len(encode("x" * 100, "")) + 1 + len(encode(1, ""))
    sizes = await backend.sizes(["ns/ours", "ns/other", "ns/empty"])
    assert sizes == {"ns/ours": (2, ours_bytes), "ns/other": (1, 1 + len(encode(b"", "")))}
    assert await backend.sizes([f"ns/{n}" for n in range(1200)]) == {}  # (in chunks)


async def test_a_failed_commit_fails_the_rooms_later_ones_in_flight(backend: Backend) -> None:
    """A room's next commit was computed on top of the one before it: when that one fails
    (a lost connection, a bad value), the later one, already queued, must fail unwritten,
    or the room restarting from storage would find a gap (a chat's seq 176 without 175).
    Other rooms' commits are not touched, and the room's next commit after its restart is."""
    room, other = "ns/chained", "ns/bystander"
    epochs = {}
    if isinstance(backend, PgBackend):
        holder = backend.directory
        assert isinstance(holder, Holder)
        for key in (room, other):
            holder.hold(key)
        epochs = holder.epochs
    outcomes = Outcomes(3)
    # A value the database refuses, in the backend's writer (after the commits are queued).
    bad: Any = {"k": b"x" * 5000}
    if isinstance(backend, SqliteBackend):
        await backend.fault("limit_length", 1000).wait()
    else:
        bad = {"k": object()}  # (psycopg cannot adapt it, on the backend's thread)
    first = backend.commit(room, bad, False, outcomes.callback("first"), epoch=epochs.get(room))
    backend.commit(
        room, {"seq": b"2"}, False, outcomes.callback("second"), epoch=epochs.get(room), after=first
    )
    backend.commit(other, {"k": b"v"}, False, outcomes.callback("other"), epoch=epochs.get(other))
    await outcomes.wait()
    assert outcomes.errors["first"] is not None and outcomes.errors["other"] is None
    assert "an earlier commit of this room failed" in str(outcomes.errors["second"])
    assert await backend.get_many(room, ["seq"]) == {}
    assert await backend.get_many(other, ["k"]) == {"k": b"v"}
    again = Outcomes(1)
    backend.commit(room, {"seq": b"1"}, False, again.callback("restarted"), epoch=epochs.get(room))
    await again.wait()
    assert again.errors["restarted"] is None


# ---------------------------------------------------------------------------------------
# SQLite's writer process


async def test_a_killed_writer_fails_what_is_in_flight_and_a_new_one_takes_over(
    tmp_path: Path,
) -> None:
    backend = SqliteBackend(tmp_path / "rooms.sqlite3")
    backend.restart_after = 0  # (this one dies right after it started, once)
    try:
        room = view(backend)
        room.put("k", 1)
        assert await commit(room) is None
        outcomes = Outcomes(1)
        first = backend._proc.pid
        async with backend.held():
            room.put("k", 2)
            room.commit(outcomes.callback("in flight"))
            os.kill(first, signal.SIGKILL)
            await outcomes.wait()
        error = outcomes.errors["in flight"]
        assert isinstance(error, StorageError)
        assert re.search(rf"sqlite writer process \(pid {first}\) ended unexpectedly", str(error))
        assert backend._proc.pid != first
        assert await view(backend).get("k") == 1  # (what was acknowledged, and nothing else)
        room = view(backend)
        room.put("k", 3)
        assert await commit(room) is None
        # A writer that dies as soon as it started would only die again: no new one.
        backend.restart_after = 60
        os.kill(backend._proc.pid, signal.SIGKILL)
        with trio.fail_after(5):
            while True:
                try:
                    await view(backend).get("k")
                except StorageError as exc:
                    if "just after it started: restart the server" in str(exc):
                        break
                await trio.sleep(0.01)
    finally:
        await backend.aclose()


async def test_the_writer_holds_the_data_dirs_claim_until_it_has_finished(
    tmp_path: Path,
) -> None:
    """A server killed with ``kill -9`` leaves its writer to finish the batch it runs: until it
    has, no other server may open the database (it could read state the batch then changes)."""
    path = tmp_path / "rooms.sqlite3"
    backend = SqliteBackend(path)
    backend._unlock()  # (as if the server were gone: only its writer holds the claim now)
    with pytest.raises(ConfigError, match=f"in use by another rooms server \\(pid {os.getpid()}"):
        _lock(f"{path}.lock", wait=0.1)
    await backend.aclose()
    claim = _lock(f"{path}.lock", wait=0.1)
    assert claim is not None
    claim.close()


def test_the_writer_process_starts_without_trio() -> None:
    """What the writer process imports: no trio (it starts in tens of milliseconds)."""
    found = subprocess.run(
        [sys.executable, "-c", "import sys, runtime.sqlite; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'trio'" not in found and "'runtime.storage'" not in found
