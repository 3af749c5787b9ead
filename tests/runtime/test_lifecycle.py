"""Room lifecycle: hibernation, unloading and the bound on rooms in memory, alarms, timers,
start-up; on a virtual clock (the ``clock`` fixture), so hours pass at once."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from rooms import App, Connection, Request, Response, Room
from rooms.testing import ConnectionClosed, RoomsHarness
from runtime.config import Settings
from tests.support import metric, start_server

LOG: list[str] = []


@pytest.fixture(autouse=True)
def virtual_time(clock: trio.testing.MockClock) -> None:
    LOG.clear()


class Lobby(Room):
    """Counts its starts; keeps per-connection state and tags."""

    hibernate_after = 10.0

    async def on_start(self) -> None:
        LOG.append("start")

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.state = {"name": request.query_param("name"), "said": 0}
        conn.tags.add("player" if request.query_param("name") else "watcher")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "who":
            names = sorted(c.state["name"] for c in self.connections("player"))
            conn.send(",".join(names))
            return
        conn.state = {**conn.state, "said": conn.state["said"] + 1}
        self.broadcast(f"{conn.state['name']}#{conn.state['said']}: {message!s}")

    async def ring(self) -> None:
        self.broadcast("ring")


class Clock(Room):
    """A game loop: a tick every second while someone plays; an alarm closes it."""

    hibernate_after = 10.0

    async def on_start(self) -> None:
        self.ticks = 0
        self.loop = self.every(1.0, self.tick)

    async def tick(self) -> None:
        self.ticks += 1
        self.broadcast(f"tick {self.ticks}")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "stop":
            self.loop.cancel()
            conn.send("stopped")
        elif message == "later":
            self.after(2.5, lambda: self.broadcast("later"))
        else:
            conn.send(f"at tick {self.ticks}")


class Reminder(Room):
    """An alarm that fails ``fail`` times before it works."""

    fail = 0

    async def on_request(self, request: Request) -> Response:
        if request.method == "POST":
            self.set_alarm(self.now() + float(request.query_param("in") or 60))
            return Response.text("set")
        if request.method == "DELETE":
            self.delete_alarm()
            return Response.text("deleted")
        return Response.json({"alarm": await self.get_alarm(), "fired": await self.fired()})

    async def fired(self) -> list[Any]:
        value: list[Any] = await self.storage.get("fired", [])
        return value

    async def on_alarm(self, retry_count: int) -> None:
        LOG.append(f"alarm retry={retry_count}")
        if retry_count < type(self).fail:
            raise RuntimeError("not yet")
        self.storage.put("fired", [*await self.fired(), round(self.now())])
        self.broadcast("alarm!")


async def alarm_state(rooms: RoomsHarness, name: str) -> Any:
    return json.loads((await rooms.request("GET", f"/reminder/{name}")).body)


def app() -> App:
    application = App()
    application.room("/lobby/{name}", Lobby)
    application.room("/clock/{name}", Clock)
    application.room("/reminder/{name}", Reminder)
    return application


# -- hibernation ---------------------------------------------------------------------------


async def test_an_idle_room_hibernates_and_its_connections_keep_state_and_tags(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as rooms:
        ann = await rooms.connect("/lobby/a?name=ann")
        bob = await rooms.connect("/lobby/a?name=bob")
        watcher = await rooms.connect("/lobby/a")
        await ann.send("hi")
        for client in (ann, bob, watcher):
            assert await client.receive() == "ann#1: hi"
        assert LOG == ["start"]

        await trio.sleep(10.5)  # hibernate_after, on the virtual clock
        await rooms.settle()
        assert not rooms.is_active(Lobby, "a")
        assert rooms.metrics.rooms_hibernated == 1
        assert rooms.metrics.room_hibernations_total == 1

        await ann.send("back")  # the next event starts it again, then is handled
        for client in (ann, bob, watcher):  # state survived; everyone is still there
            assert await client.receive() == "ann#2: back"
        assert LOG == ["start", "start"]
        await watcher.send("who")
        assert await watcher.receive() == "ann,bob"  # tags survived
        assert rooms.metrics.rooms_hibernated == 0


async def test_a_hibernated_room_woken_by_a_call_reaches_its_clients(
    clock: trio.testing.MockClock,
) -> None:
    """Really out of memory (a second start), and still talking to its clients."""
    async with RoomsHarness(app()) as rooms:
        ann = await rooms.connect("/lobby/b?name=ann")
        await rooms.force_hibernate(Lobby, "b")
        assert not rooms.is_active(Lobby, "b")
        assert rooms.metrics.room_activations_total == 1
        await rooms.stub(Lobby, "b").ring()
        assert await ann.receive() == "ring"
        assert rooms.metrics.room_activations_total == 2
        assert LOG == ["start", "start"]


async def test_force_hibernate_needs_connections(clock: trio.testing.MockClock) -> None:
    async with RoomsHarness(app()) as rooms:
        await rooms.stub(Lobby, "empty").ring()
        with pytest.raises(ValueError, match="has no connections"):
            await rooms.force_hibernate(Lobby, "empty")
        await rooms.force_evict(Lobby, "empty")
        assert not rooms.is_active(Lobby, "empty")
        assert rooms.metrics.rooms_active == 0  # unloaded, not hibernated


async def test_a_room_without_connections_unloads_after_room_idle_timeout(
    clock: trio.testing.MockClock,
) -> None:
    settings = Settings(room_idle_timeout=30.0)
    async with RoomsHarness(app(), settings=settings) as rooms:
        client = await rooms.connect("/lobby/c?name=x")
        await client.disconnect()
        await trio.sleep(29)
        assert rooms.is_active(Lobby, "c")
        await trio.sleep(2)
        await rooms.settle()
        assert not rooms.is_active(Lobby, "c")
        assert rooms.metrics.rooms_active == 0


async def test_rooms_in_memory_are_bounded_least_recently_used_first(
    clock: trio.testing.MockClock,
) -> None:
    settings = Settings(max_rooms_in_memory=2)
    async with RoomsHarness(app(), settings=settings) as rooms:
        first = await rooms.connect("/lobby/one?name=a")
        await rooms.connect("/lobby/two?name=b")
        await trio.sleep(1)
        await first.send("touch")  # "one" is now more recently used than "two"
        await first.receive()
        await rooms.connect("/lobby/three?name=c")
        await rooms.settle()
        assert rooms.metrics.room_evictions_total == 1
        assert not rooms.is_active(Lobby, "two")  # hibernated: it has a connection
        assert rooms.is_active(Lobby, "one") and rooms.is_active(Lobby, "three")
        assert rooms.metrics.rooms_in_memory == 2
        assert rooms.metrics.rooms_hibernated == 1


# -- timers --------------------------------------------------------------------------------


async def test_timers_tick_as_events_and_keep_the_room_awake(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as rooms:
        player = await rooms.connect("/clock/g")
        assert await player.receive() == "tick 1"
        await player.send("where")
        answer = await player.receive()
        assert answer == "at tick 1"  # serial with the ticks: never half way through one
        await player.send("later")  # at t=1: fires at 3.5, between the ticks at 3 and 4
        assert [await player.receive() for _ in range(4)] == ["tick 2", "tick 3", "later", "tick 4"]
        await trio.sleep(60)  # a room with a running timer does not hibernate
        assert rooms.is_active(Clock, "g")
        await player.send("stop")
        while await player.receive() != "stopped":
            pass
        await trio.sleep(11)
        await rooms.settle()
        assert not rooms.is_active(Clock, "g")  # no timer left: it hibernates
        ticks_seen = [m for m in player.received if str(m).startswith("tick")]
        assert len(ticks_seen) >= 60


async def test_a_one_shot_timer_fires_once_after_its_delay(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as rooms:
        player = await rooms.connect("/clock/h")
        await player.send("stop")
        while await player.receive() != "stopped":
            pass
        start = trio.current_time()
        await player.send("later")
        while await player.receive() != "later":
            pass
        assert 2.5 <= trio.current_time() - start < 3
        await trio.sleep(10)
        assert player.received.count("later") == 1


# -- alarms --------------------------------------------------------------------------------


async def test_an_alarm_fires_at_its_time_and_can_be_read_and_deleted(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as rooms:
        assert (await rooms.request("POST", "/reminder/r?in=60")).status == 200
        state = await alarm_state(rooms, "r")
        assert state["fired"] == [] and state["alarm"] > 0
        set_for = state["alarm"]
        await trio.sleep(59)
        assert LOG == []
        await trio.sleep(2)
        await rooms.settle()
        assert LOG == ["alarm retry=0"]
        state = await alarm_state(rooms, "r")
        assert state == {"alarm": None, "fired": [round(set_for)]}

        await rooms.request("POST", "/reminder/r?in=60")
        await rooms.request("DELETE", "/reminder/r")
        await trio.sleep(120)
        await rooms.settle()
        assert LOG == ["alarm retry=0"]  # the deleted one never fired


async def test_an_alarm_fires_in_a_room_that_was_unloaded_and_wakes_its_clients(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as rooms:
        client = await rooms.connect("/reminder/u")
        await rooms.request("POST", "/reminder/u?in=3600")
        await rooms.force_hibernate(Reminder, "u")
        await client.disconnect()
        await trio.sleep(40)  # past room_idle_timeout: unloaded
        await rooms.settle()
        assert rooms.metrics.rooms_active == 0
        await trio.sleep(3600)
        await rooms.settle()
        assert LOG == ["alarm retry=0"]


async def test_an_alarm_survives_a_restart(clock: trio.testing.MockClock) -> None:
    async with RoomsHarness(app()) as rooms:
        await rooms.request("POST", "/reminder/s?in=600")
        client = await rooms.connect("/reminder/s")
        await rooms.simulate_restart()
        with pytest.raises(ConnectionClosed) as dropped:
            await client.receive()
        assert dropped.value.code == 1006
        assert rooms.metrics.rooms_active == 0
        await trio.sleep(601)
        await rooms.settle()
        assert LOG == ["alarm retry=0"]
        assert len((await alarm_state(rooms, "s"))["fired"]) == 1


async def test_an_alarm_missed_while_the_server_was_down_fires_at_start(
    tmp_path: Any, clock: trio.testing.MockClock
) -> None:
    async with RoomsHarness(app(), data_dir=tmp_path) as rooms:
        await rooms.request("POST", "/reminder/m?in=60")
        await rooms.settle()
    await trio.sleep(3600)  # the server is down for an hour
    assert LOG == []
    async with RoomsHarness(app(), data_dir=tmp_path) as rooms:
        await trio.sleep(0.1)
        await rooms.settle()
        assert LOG == ["alarm retry=0"]


async def test_a_failing_alarm_is_retried_with_backoff_then_given_up(
    clock: trio.testing.MockClock,
) -> None:
    Reminder.fail = 3
    try:
        async with RoomsHarness(app()) as rooms:
            await rooms.request("POST", "/reminder/f?in=10")
            start = trio.current_time()
            await trio.sleep(10 + 1 + 2 + 4 + 1)
            await rooms.settle()
            assert [f"alarm retry={n}" for n in range(4)] == LOG
            assert trio.current_time() - start >= 17
            assert len((await alarm_state(rooms, "f"))["fired"]) == 1

        Reminder.fail = 100
        LOG.clear()
        async with RoomsHarness(app()) as rooms:
            await rooms.request("POST", "/reminder/g?in=1")
            await trio.sleep(1 + sum(2**n for n in range(6)) + 5)
            await rooms.settle()
            assert [f"alarm retry={n}" for n in range(7)] == LOG  # the first try and 6 more
            assert (await alarm_state(rooms, "g"))["alarm"] is None
    finally:
        Reminder.fail = 0


# -- start-up ------------------------------------------------------------------------------


class SlowStart(Room):
    attempts = 0

    async def on_start(self) -> None:
        type(self).attempts += 1
        await trio.sleep(5)  # a slow dependency
        if type(self).attempts == 1:
            raise RuntimeError("the dependency is down")
        self.ready = True

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(f"ready={self.ready}: {message!s}")


async def test_events_wait_for_on_start_and_a_failed_start_is_retried(
    clock: trio.testing.MockClock,
) -> None:
    application = App()
    application.room("/slow/{name}", SlowStart)
    async with RoomsHarness(application) as rooms:
        first = await rooms.connect("/slow/x")
        with pytest.raises(ConnectionClosed) as failed:
            await first.receive(timeout=10)
        assert (failed.value.code, failed.value.reason) == (1011, "the room failed to start")
        second = await rooms.connect("/slow/x")
        await second.send("hello")  # queued while on_start runs again
        assert await second.receive(timeout=10) == "ready=True: hello"
        assert SlowStart.attempts == 2


# -- over real sockets -----------------------------------------------------------------------


class Quiet(Room):
    hibernate_after = 0.2
    auto_reply = ("ping", "pong")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(f"room: {message!s}")


async def test_the_edge_auto_reply_does_not_wake_a_hibernated_room(
    nursery: trio.Nursery, settings: Settings
) -> None:
    application = App()
    application.room("/quiet/{name}", Quiet)
    port = await start_server(nursery, application, settings)
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/quiet/q") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "room: hello"
            while await metric(port, "rooms_hibernated") != 1:  # noqa: ASYNC110 - polling
                await trio.sleep(0.05)
            for _ in range(3):
                await ws.send_message("ping")
                assert await ws.get_message() == "pong"
            assert await metric(port, "rooms_hibernated") == 1
            assert await metric(port, "room_activations_total") == 1
            await ws.send_message("wake up")
            assert await ws.get_message() == "room: wake up"
            assert await metric(port, "room_activations_total") == 2


class Cursors(Quiet):
    relay_prefix = b"\x01"

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        for other in self.connections():
            other.send(f"left, last relayed {conn.relayed!r}")


async def test_relayed_messages_reach_everyone_without_waking_a_hibernated_room(
    nursery: trio.Nursery, settings: Settings
) -> None:
    application = App()
    application.room("/cursors/{name}", Cursors)
    port = await start_server(nursery, application, settings)
    url = f"ws://127.0.0.1:{port}/cursors/c"
    with trio.fail_after(20):
        async with open_websocket_url(url) as ada, open_websocket_url(url) as bob:
            await ada.send_message("hello")
            assert await ada.get_message() == "room: hello"
            while await metric(port, "rooms_hibernated") != 1:  # noqa: ASYNC110 - polling
                await trio.sleep(0.05)
            for n in range(3):
                await ada.send_message(b"\x01cursor %d" % n)
                for ws in (ada, bob):  # the sender too
                    assert await ws.get_message() == b"\x01cursor %d" % n
            assert await metric(port, "room_activations_total") == 1  # still hibernated
            await bob.send_message(b"\x02 not relayed")
            assert await bob.get_message() == "room: b'\\x02 not relayed'"  # woke it
            assert await metric(port, "relayed_messages_total") == 3
            assert await metric(port, "room_activations_total") == 2
            await ada.aclose()
            assert await bob.get_message() == "left, last relayed b'\\x01cursor 2'"


async def test_set_alarm_takes_aware_datetimes_and_refuses_naive_ones(
    clock: trio.testing.MockClock,
) -> None:
    class Dated(Room):
        async def on_request(self, request: Request) -> Response:
            moment = datetime.datetime.fromtimestamp(self.now() + 30, datetime.UTC)
            if request.query_param("naive"):
                moment = moment.replace(tzinfo=None)
            self.set_alarm(moment)
            return Response.json(await self.get_alarm())

    application = App()
    application.room("/dated/{name}", Dated)
    async with RoomsHarness(application) as rooms:
        answer = await rooms.request("GET", "/dated/a")
        assert abs(json.loads(answer.body) - (rooms.now() + 30)) < 0.01
        assert (await rooms.request("GET", "/dated/b?naive=1")).status == 500
