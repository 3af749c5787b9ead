"""The guarantees of ``docs/guarantees.md``, each with a deterministic test that fails when the
guarantee is broken (``tests/mutants.py`` breaks each one on purpose and checks that these
tests catch it). No timing luck: a commit that must not be durable yet is held back by a seam
(``HeldCommits``), the storage writer is paused right before ``COMMIT`` (``PausedCommit``),
time is virtual."""

from __future__ import annotations

import itertools
import json
from typing import Any, ClassVar

import pytest
import trio
import trio.lowlevel
import trio.testing

from rooms import App, Connection, Request, Response, Room
from rooms.testing import ConnectionClosed, RoomsHarness, Settings
from runtime.admin import ROOM_PATH
from runtime.events import Operator
from runtime.server import open_backend
from runtime.storage import StorageError
from tests.support import HeldCommits, PausedCommit


class Ledger(Room):
    """Writes, then answers: every way a room can answer a write."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        n = await self.storage.get("n", 0) + 1
        self.storage.put("n", n)
        if message == "broadcast":
            self.broadcast(f"n={n}")
        else:
            conn.send(f"n={n}")

    async def on_request(self, request: Request) -> Response:
        n = await self.storage.get("n", 0) + 1
        self.storage.put("n", n)
        return Response.json(n)

    async def add(self) -> int:
        n: int = await self.storage.get("n", 0) + 1
        self.storage.put("n", n)
        return n


def ledger_app() -> App:
    app = App()
    app.room("/ledger/{name}", Ledger)
    return app


# -- the output gate ---------------------------------------------------------------------------


async def test_a_broadcast_after_a_write_reaches_nobody_before_the_commit() -> None:
    async with RoomsHarness(ledger_app()) as h:
        sender, bystander = await h.connect("/ledger/g"), await h.connect("/ledger/g")
        with HeldCommits(h._server.backend) as held:
            await sender.send("broadcast")
            await held.wait_for(1)
            await h.settle_events()
            assert sender.received == bystander.received == []  # not durable: nobody knows
        assert await sender.receive() == await bystander.receive() == "n=1"


async def test_an_http_reply_after_a_write_waits_for_the_commit() -> None:
    async with RoomsHarness(ledger_app()) as h, trio.open_nursery() as nursery:
        answers: list[Response] = []

        async def ask() -> None:
            answers.append(await h.request("POST", "/ledger/r"))

        with HeldCommits(h._server.backend) as held:
            nursery.start_soon(ask)
            await held.wait_for(1)
            await h.settle_events()
            assert answers == []
        await h.settle()
        assert [json.loads(a.body) for a in answers] == [1]


async def test_a_call_result_after_a_write_waits_for_the_commit() -> None:
    async with RoomsHarness(ledger_app()) as h, trio.open_nursery() as nursery:
        results: list[int] = []

        async def call() -> None:
            results.append(await h.stub(Ledger, "c").add())

        with HeldCommits(h._server.backend) as held:
            nursery.start_soon(call)
            await held.wait_for(1)
            await h.settle_events()
            assert results == []
        await h.settle()
        assert results == [1]


async def test_an_acknowledgement_is_released_only_after_commit() -> None:
    async with RoomsHarness(ledger_app()) as h:
        ada = await h.connect("/ledger/k")
        paused = PausedCommit()
        await paused.install(h._server.backend)
        try:
            await ada.send("write")
            await paused.wait_reached()  # the writes are in, COMMIT has not run
            await h.settle_events()
            assert ada.received == []
        finally:
            paused.resume()
        assert await ada.receive() == "n=1"


@pytest.mark.parametrize(("setting", "pragma"), [("NORMAL", 1), ("FULL", 2)])
async def test_the_synchronous_setting_reaches_sqlite(
    tmp_path: Any, setting: str, pragma: int
) -> None:
    backend = open_backend(Settings(data_dir=str(tmp_path), synchronous=setting))
    try:
        # (what the writer's connection reads back from SQLite once it has set them)
        found, mode = backend.info["synchronous"], backend.info["journal_mode"]
    finally:
        await backend.aclose()
    assert (found, mode) == (pragma, "wal")


# -- one event at a time -----------------------------------------------------------------------


class Serial(Room):
    """Every kind of event holds the room across an await; two at once is an overlap."""

    inside: ClassVar[str | None] = None
    overlaps: ClassVar[list[tuple[str, str]]] = []
    seen: ClassVar[set[str]] = set()

    async def _exclusive(self, kind: str) -> None:
        if Serial.inside is not None:
            Serial.overlaps.append((Serial.inside, kind))
        Serial.inside = kind
        Serial.seen.add(kind)
        await self.storage.get("x")  # a real await: a round trip to the storage thread
        await trio.lowlevel.checkpoint()
        Serial.inside = None

    async def on_start(self) -> None:
        self.ticks = 0
        self.timer = self.every(0.001, self._tick)

    async def _tick(self) -> None:
        await self._exclusive("tick")
        self.ticks += 1
        if self.ticks == 30:  # long enough to fall among the other events, then quiet
            self.timer.cancel()

    async def on_connect(self, conn: Connection, request: Request) -> None:
        await self._exclusive("connect")
        self.set_alarm(self.now())

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        await self._exclusive("message")

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        await self._exclusive("close")

    async def on_request(self, request: Request) -> Response:
        await self._exclusive("request")
        return Response.text("ok")

    async def on_alarm(self, retry_count: int) -> None:
        await self._exclusive("alarm")

    async def work(self) -> None:
        await self._exclusive("call")


async def test_one_event_at_a_time_for_every_kind_of_event(monkeypatch: Any) -> None:
    Serial.inside, Serial.overlaps, Serial.seen = None, [], set()
    app = App()
    app.room("/serial/{name}", Serial)
    action = Operator.run  # (an operator's action runs no room code: watched from outside)

    async def watched(self: Operator, act: Any, room: Serial) -> str:
        await room._exclusive("operator")
        return await action(self, act, room)

    monkeypatch.setattr(Operator, "run", watched)
    key = f"{Serial.namespace}/{Serial.resolve('s').hex}"
    notice = json.dumps({"key": key, "action": "notice", "text": "hello"})
    async with RoomsHarness(app) as h:

        async def member() -> None:
            client = await h.connect("/serial/s")
            for _ in range(10):
                await client.send("m")
            await client.disconnect()

        async with trio.open_nursery() as nursery:
            for _ in range(4):  # several senders
                nursery.start_soon(member)
            for _ in range(10):
                nursery.start_soon(h.request, "GET", "/serial/s")
                nursery.start_soon(h.stub(Serial, "s").work)
                nursery.start_soon(h.request, "POST", ROOM_PATH, notice)
        await h.settle()
    assert Serial.overlaps == []
    kinds = {"connect", "message", "close", "request", "call", "tick", "alarm", "operator"}
    assert Serial.seen == kinds


# -- failures stay where they are ----------------------------------------------------------------


class Fragile(Room):
    async def on_start(self) -> None:
        self.ticks = 0
        if await self.storage.get("timer"):
            self.every(1, self._tick)

    async def _tick(self) -> None:
        raise RuntimeError("a bug in a timer")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("a bug in on_message")
        if message == "timer":
            self.storage.put("timer", True)
            self.every(1, self._tick)
        self.broadcast(f"{conn.id[:4]}: {message!s}")


def fragile_app() -> App:
    app = App()
    app.room("/fragile/{name}", Fragile)
    return app


class Pipelined(Room):
    """Counts messages durably; "slow" waits (on ``go``) before it counts."""

    go: ClassVar[trio.Event]

    async def on_start(self) -> None:
        self.n = await self.storage.get("n", 0)

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "slow":
            await Pipelined.go.wait()  # an await across which the room may restart
        self.n += 1
        self.storage.put("n", self.n)
        conn.send(f"n={self.n}")


async def test_an_event_that_outruns_a_restart_from_a_failed_commit_keeps_nothing() -> None:
    """An event still running when an earlier commit fails (the room restarts from storage)
    was built on a state that is gone: its writes must not be stored, nor what it sent after
    them sent (the room's next start would find n=2 without n=1)."""
    Pipelined.go = trio.Event()
    app = App()
    app.room("/pipelined/{name}", Pipelined)
    async with RoomsHarness(app) as h:
        client = await h.connect("/pipelined/p")
        backend = h._server.backend
        with HeldCommits(backend) as held:
            await client.send("count")  # n=1: its commit is held
            await held.wait_for(1)
            await client.send("slow")  # n=2, once go is set: it waits meanwhile
            await h.settle_events()
            (args, _) = held.parked.pop()
            args[3](StorageError("injected: the database went away"))  # n=1 failed
            Pipelined.go.set()
            await h.settle_events()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                assert await client.receive() != "n=2"
        assert closed.value.code == 1011
        key = f"{Pipelined.namespace}/{Pipelined.resolve('p').hex}"
        assert await backend.get_many(key, ["n"]) == {}  # neither n=1 nor the stale n=2


async def test_a_failing_handler_costs_its_sender_only(clock: trio.testing.MockClock) -> None:
    async with RoomsHarness(fragile_app()) as h:
        culprit, bystander = await h.connect("/fragile/f"), await h.connect("/fragile/f")
        await culprit.send("boom")
        with pytest.raises(ConnectionClosed) as closed:
            await culprit.receive()
        assert (closed.value.code, closed.value.reason) == (1011, "internal error in the room")
        await bystander.send("still here")
        assert await bystander.receive() == f"{bystander.id[:4]}: still here"
        assert h.metrics.handler_errors_total == 1


async def test_a_failing_timer_stops_the_timers_and_the_room_carries_on(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(fragile_app()) as h:
        ada = await h.connect("/fragile/t")
        await h.settle()
        await ada.send("plain")  # no timer yet
        assert await ada.receive() == f"{ada.id[:4]}: plain"
        h.metrics.handler_errors_total = 0
        await ada.send("timer")
        assert await ada.receive() == f"{ada.id[:4]}: timer"
        await trio.sleep(1.5)  # the tick raises: the instance and its timers go
        assert h.metrics.handler_errors_total >= 1
        assert not ada.closed  # a timer has no sender to close
        await ada.send("after")  # the next event starts the room again, from storage
        assert await ada.receive() == f"{ada.id[:4]}: after"


# -- alarms --------------------------------------------------------------------------------------


class Failing(Room):
    attempts: ClassVar[list[tuple[int, float]]] = []

    async def on_request(self, request: Request) -> Response:
        if request.method == "POST":
            self.set_alarm(self.now() + 1)
        return Response.json(await self.get_alarm())

    async def on_alarm(self, retry_count: int) -> None:
        Failing.attempts.append((retry_count, self.now()))
        raise RuntimeError("the alarm keeps failing")


async def test_a_failing_alarm_backs_off_1_2_4_8_16_32_then_is_deleted(
    clock: trio.testing.MockClock,
) -> None:
    Failing.attempts = []
    app = App()
    app.room("/failing/{name}", Failing)
    async with RoomsHarness(app) as h:
        await h.request("POST", "/failing/a")
        await trio.sleep(200)
        assert [retry for retry, _ in Failing.attempts] == [0, 1, 2, 3, 4, 5, 6]
        times = [at for _, at in Failing.attempts]
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(times)]
        assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
        assert json.loads((await h.request("GET", "/failing/a")).body) is None
        assert h.metrics.alarms_fired_total == 7


# -- bounded ---------------------------------------------------------------------------------


async def test_a_room_waits_for_the_disk_past_max_inflight_commits() -> None:
    async with RoomsHarness(ledger_app(), settings=Settings(max_inflight_commits=2)) as h:
        ada = await h.connect("/ledger/bounded")
        with HeldCommits(h._server.backend) as held:
            for _ in range(4):
                await ada.send("write")
            await held.wait_for(2)
            await h.settle_events()
            assert len(held.parked) == 2  # two commits in flight: the third event waits
            held.release()  # they land: the room goes on, two more
            await held.wait_for(2)
            await h.settle_events()
            assert len(held.parked) == 2
        assert [await ada.receive() for _ in range(4)] == ["n=1", "n=2", "n=3", "n=4"]
