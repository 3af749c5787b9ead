"""Storage: the SQLite backend and a room's view of it (cache, pending writes, list)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.storage import RoomStorage, SqliteBackend, StorageError


async def commit(storage: RoomStorage) -> BaseException | None:
    done = trio.Event()
    outcome: list[BaseException | None] = []

    def finished(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    storage.commit(finished)
    await done.wait()
    return outcome[0]


class Outcomes:
    """Collects ``done(error)`` callbacks by name; ``all`` is set once ``expected`` arrived."""

    def __init__(self, expected: int) -> None:
        self.errors: dict[str, BaseException | None] = {}
        self.expected = expected
        self.all = trio.Event()

    def callback(self, name: str) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            self.errors[name] = error
            if len(self.errors) == self.expected:
                self.all.set()

        return done


def view(backend: SqliteBackend, room: str = "ns/room") -> RoomStorage:
    return RoomStorage(backend, room, lambda: None)


async def test_values_round_trip_and_bad_values_name_their_key() -> None:
    backend = SqliteBackend(":memory:")
    try:
        s = view(backend)
        value: Any = {"a": [1, 2.5, None, True, "é", b"\x00"], "t": (1, 2)}
        s.put("k", value)
        assert await commit(s) is None
        fresh = view(backend)
        assert await fresh.get("k") == {"a": [1, 2.5, None, True, "é", b"\x00"], "t": [1, 2]}
        assert await fresh.get("missing", "default") == "default"
        with pytest.raises(TypeError, match="'profile'"):
            s.put("profile", object())
        with pytest.raises(TypeError, match="keys are str"):
            s.put(5, "x")  # type: ignore[arg-type]
    finally:
        await backend.aclose()


async def test_reads_see_pending_writes_and_rollback_forgets_them() -> None:
    backend = SqliteBackend(":memory:")
    try:
        s = view(backend)
        s.put_many({"a": 1, "b": 2})
        await commit(s)
        s.delete("a")
        s.put("c", 3)
        assert await s.get_many(["a", "b", "c"]) == {"b": 2, "c": 3}
        s.rollback()
        assert await s.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
        s.delete_all()
        s.put("z", 26)
        assert await s.list() == {"z": 26}
        await commit(s)
        assert await view(backend).list() == {"z": 26}
    finally:
        await backend.aclose()


async def test_list_ranges_merge_stored_rows_with_pending_writes() -> None:
    backend = SqliteBackend(":memory:")
    try:
        s = view(backend)
        s.put_many({k: k.upper() for k in ["a", "b", "c", "msg:1", "msg:2", "msg:3"]})
        await commit(s)
        s.delete("b")
        s.put("d", "D")
        assert list(await s.list(limit=3)) == ["a", "c", "d"]
        assert list(await s.list(prefix="msg:")) == ["msg:1", "msg:2", "msg:3"]
        assert list(await s.list(prefix="msg:", reverse=True, limit=2)) == ["msg:3", "msg:2"]
        assert list(await s.list(start="c", end="msg:2")) == ["c", "d", "msg:1"]
        assert await s.list(limit=0) == {}
        with pytest.raises(ValueError):
            await s.list(limit=-1)
        s.put("\U0010ffffx", 1)
        await commit(s)
        assert list(await s.list(prefix="\U0010ffff")) == ["\U0010ffffx"]
    finally:
        await backend.aclose()


async def test_rooms_are_isolated_and_commits_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "rooms.sqlite3"
    backend = SqliteBackend(path)
    one, two = view(backend, "ns/one"), view(backend, "ns/two")
    one.put("k", "one")
    two.put("k", "two")
    await commit(one)
    await commit(two)
    await backend.aclose()
    reopened = SqliteBackend(path)
    try:
        assert await view(reopened, "ns/one").get("k") == "one"
        assert await view(reopened, "ns/two").list() == {"k": "two"}
    finally:
        await reopened.aclose()


async def test_group_commit_of_many_rooms() -> None:
    backend = SqliteBackend(":memory:")
    try:
        outcomes = Outcomes(200)
        for i in range(200):
            s = view(backend, f"ns/{i}")
            s.put("n", i)
            s.commit(outcomes.callback(str(i)))  # no await in between: grouped commits
        with trio.fail_after(5):
            await outcomes.all.wait()
        assert list(outcomes.errors.values()) == [None] * 200
        assert [await view(backend, f"ns/{i}").get("n") for i in range(200)] == list(range(200))
    finally:
        await backend.aclose()


async def test_a_failing_commit_is_reported_and_the_rest_of_the_batch_commits() -> None:
    backend = SqliteBackend(":memory:")
    try:
        good = view(backend, "ns/good")
        good.put("k", "fine")
        with pytest.raises(ValueError, match="surrogate"):
            view(backend, "ns/bad").put("\ud800", "a key SQLite cannot store is refused at once")
        outcomes = Outcomes(2)
        good.commit(outcomes.callback("good"))
        # Past that check (straight to the backend), a failing job fails alone, in the
        # same batch as a good one, and the storage thread lives on.
        backend.commit("ns/bad", {"\ud800": b"x"}, False, outcomes.callback("bad"))
        with trio.fail_after(5):
            await outcomes.all.wait()
        assert outcomes.errors["good"] is None
        assert isinstance(outcomes.errors["bad"], StorageError)
        assert await view(backend, "ns/good").get("k") == "fine"
    finally:
        await backend.aclose()
