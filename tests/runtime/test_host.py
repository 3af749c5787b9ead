"""The engine's guarantees, in process: ordering, atomic commits, the output gate, errors,
calls between rooms, bounded mailboxes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from rooms import App, CallCycleError, Connection, Request, Response, Room, RoomCallError
from rooms.testing import ConnectionClosed, HandshakeRejected, RoomsHarness

# -- rooms used by the tests -----------------------------------------------------------------


class Log(Room):
    """Records the order in which hooks start and finish, across awaits."""

    starts = 0
    trace: list[str] = []

    async def on_start(self) -> None:
        type(self).starts += 1

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.trace.append(f"begin {message!r}")
        await trio.sleep(0.01)  # other events must not run here
        self.trace.append(f"end {message!r}")
        conn.send(message)


class Counter(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "boom":
            self.storage.put("n", -1)
            raise RuntimeError("boom")
        if message == "get":
            conn.send(str(await self.storage.get("n", 0)))
            return
        n = await self.storage.get("n", 0)
        self.storage.put("n", n + 1)
        self.storage.put(f"item:{n:04d}", {"n": n})
        # a read sees this event's own pending write
        assert await self.storage.get("n") == n + 1
        conn.send(str(n + 1))

    async def on_request(self, request: Request) -> Response:
        if request.path.endswith("/fail"):
            raise ValueError("bad request handling")
        items = await self.storage.list(prefix="item:")
        return Response.json({"n": await self.storage.get("n", 0), "items": len(items)})


class Tagged(Room):
    async def on_connect(self, conn: Connection, request: Request) -> None:
        team = request.query_param("team")
        if team:
            conn.tags.add(team)

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("team:"):
            _, team, text = message.split(":", 2)
            self.broadcast(text, tag=team)
        elif message == "others":
            self.broadcast("hi others", exclude=[conn])
        elif message == "who":
            conn.send(json.dumps(sorted(c.id for c in self.connections())))
        else:
            self.broadcast(message)


class Limiter(Room):
    async def on_start(self) -> None:
        self.calls = 0

    async def hit(self, amount: int = 1) -> int:
        self.calls += amount
        return self.calls

    async def fail(self) -> None:
        raise KeyError("no such thing")

    async def echo(self, value: Any) -> Any:
        return value


class Caller(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        limiter = self.stub(Limiter, "shared")
        if message == "hit":
            conn.send(str(await limiter.hit(2)))
        elif message == "fail":
            try:
                await limiter.fail()
            except KeyError as exc:
                conn.send(f"caught {exc!r}")
        elif message == "cycle":
            try:
                await self.stub(Ping, "p").relay(self.name)
            except CallCycleError as exc:
                conn.send(f"cycle: {type(exc).__name__}")
        elif message == "self":
            try:
                await self.stub(Caller, self.name or "").poke()
            except CallCycleError:
                conn.send("self cycle refused")

    async def poke(self) -> str:
        return "poked"


class Ping(Room):
    async def relay(self, caller_name: str) -> str:
        result: str = await self.stub(Caller, caller_name).poke()
        return result


def make_app() -> App:
    app = App()
    for route, cls in [
        ("/log/{name}", Log),
        ("/count/{name}", Counter),
        ("/tag/{name}", Tagged),
        ("/call/{name}", Caller),
    ]:
        app.room(route, cls)
    return app


# -- ordering ----------------------------------------------------------------------------------


async def test_events_run_one_at_a_time_in_arrival_order() -> None:
    Log.trace = []
    async with RoomsHarness(make_app()) as h:
        a = await h.connect("/log/x")
        b = await h.connect("/log/x")

        async def a_talks() -> None:
            await a.send("a1")
            await a.send("a2")

        async with trio.open_nursery() as n:
            n.start_soon(a_talks)
            n.start_soon(b.send, "b1")
        for client in (a, a):
            await client.receive()
        await b.receive()
    # every handler finished before the next began, even though each awaited a sleep
    assert len(Log.trace) == 6
    for i in range(0, 6, 2):
        begin, end = Log.trace[i], Log.trace[i + 1]
        assert begin.startswith("begin") and end == begin.replace("begin", "end")
    order = [t for t in Log.trace if t.startswith("begin")]
    assert order.index("begin 'a1'") < order.index("begin 'a2'")


async def test_broadcasts_reach_everyone_in_the_same_order() -> None:
    async with RoomsHarness(make_app()) as h:
        clients = [await h.connect("/tag/all") for _ in range(5)]
        async with trio.open_nursery() as n:
            for i, c in enumerate(clients):
                for j in range(20):
                    n.start_soon(c.send, f"{i}-{j}")
        await h.settle()
        sequences = [c.received for c in clients]
        assert len(sequences[0]) == 100
        assert all(s == sequences[0] for s in sequences)


async def test_tags_and_exclude() -> None:
    async with RoomsHarness(make_app()) as h:
        red = await h.connect("/tag/t?team=red")
        blue = await h.connect("/tag/t?team=blue")
        await red.send("team:blue:for blue only")
        assert await blue.receive() == "for blue only"
        await red.send("others")
        assert await blue.receive() == "hi others"
        await blue.send("who")
        assert json.loads(await blue.receive()) == sorted([red.id, blue.id])
        await h.settle()
        assert red.received == []


# -- storage -----------------------------------------------------------------------------------


async def test_writes_commit_atomically_and_a_failed_event_loses_its_writes() -> None:
    async with RoomsHarness(make_app()) as h:
        c = await h.connect("/count/c")
        for i in range(1, 4):
            await c.send("inc")
            assert await c.receive() == str(i)
        await c.send("boom")  # wrote n = -1, then raised
        with pytest.raises(ConnectionClosed) as closed:
            await c.receive()
        assert closed.value.code == 1011
        d = await h.connect("/count/c")
        await d.send("get")
        assert await d.receive() == "3"
        response = await h.request("GET", "/count/c")
        assert json.loads(response.body) == {"n": 3, "items": 3}


async def test_storage_survives_a_restart_of_the_engine(tmp_path: Any) -> None:
    async with RoomsHarness(make_app(), data_dir=tmp_path) as h:
        c = await h.connect("/count/durable")
        for _ in range(5):
            await c.send("inc")
            await c.receive()
    async with RoomsHarness(make_app(), data_dir=tmp_path) as h:
        c = await h.connect("/count/durable")
        await c.send("get")
        assert await c.receive() == "5"


# -- errors ------------------------------------------------------------------------------------


async def test_handler_error_restarts_only_that_room(caplog: pytest.LogCaptureFixture) -> None:
    Log.starts = 0
    async with RoomsHarness(make_app()) as h:
        bystander = await h.connect("/log/other")
        c = await h.connect("/count/e")
        await c.send("boom")
        with pytest.raises(ConnectionClosed):
            await c.receive()
        await bystander.send("still here")
        assert await bystander.receive() == "still here"
        # the failed room comes back from storage on its next event
        d = await h.connect("/count/e")
        await d.send("get")
        assert await d.receive() == "0"
    messages = [r.getMessage() for r in caplog.records]
    assert any("Counter:" in m and "on_message raised" in m for m in messages)


async def test_on_request_error_is_a_500_and_the_room_carries_on() -> None:
    app = make_app()
    app.room("/c2/{name}/fail", Counter)
    async with RoomsHarness(app) as h:
        response = await h.request("GET", "/c2/x/fail")
        assert response.status == 500
        c = await h.connect("/count/x")
        await c.send("inc")
        assert await c.receive() == "1"


async def test_plain_request_on_a_websocket_route_is_426_and_bad_names_400() -> None:
    async with RoomsHarness(make_app()) as h:
        assert (await h.request("GET", "/log/x")).status == 426
        with pytest.raises(HandshakeRejected) as rejected:
            await h.connect("/log/" + "x" * 65)
        assert rejected.value.response.status == 400
        assert (await h.request("GET", "/nope")).status == 404


# -- calls between rooms -----------------------------------------------------------------------


async def test_calls_return_results_and_exceptions() -> None:
    async with RoomsHarness(make_app()) as h:
        c = await h.connect("/call/one")
        await c.send("hit")
        assert await c.receive() == "2"
        await c.send("hit")
        assert await c.receive() == "4"
        await c.send("fail")
        assert await c.receive() == "caught KeyError('no such thing')"
        # the limiter restarted after raising: its in-memory count began again
        assert await h.stub(Limiter, "shared").hit() == 1
        assert await h.stub(Limiter, "shared").echo({"a": [1, b"x"]}) == {"a": [1, b"x"]}


async def test_call_cycles_fail_fast_instead_of_deadlocking() -> None:
    async with RoomsHarness(make_app()) as h:
        c = await h.connect("/call/cyc")
        with trio.fail_after(5):
            await c.send("cycle")
            assert await c.receive() == "cycle: CallCycleError"
            await c.send("self")
            assert await c.receive() == "self cycle refused"


async def test_bad_calls_are_clear_errors() -> None:
    async with RoomsHarness(make_app()) as h:
        with pytest.raises(RoomCallError, match="no method 'on_message'"):
            await h.stub(Limiter, "x").on_message(None, "x")
        with pytest.raises(RoomCallError, match="not msgpack-serialisable"):
            await h.stub(Limiter, "x").echo(object())


# -- limits --------------------------------------------------------------------------------------


class Slow(Room):
    release: trio.Event

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        await self.release.wait()


async def test_a_full_mailbox_makes_senders_wait() -> None:
    from rooms.testing import Settings

    Slow.release = trio.Event()
    app = App()
    app.room("/slow/{name}", Slow)
    async with RoomsHarness(app, settings=Settings(mailbox_size=4)) as h:
        c = await h.connect("/slow/s")
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(20):
                await c.send("x")
                sent += 1

        async with trio.open_nursery() as n:
            n.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            # one message in the handler, four queued: the fifth sender waits
            assert sent == 5
            assert h.metrics.limit_mailbox_full_total >= 1
            Slow.release.set()
        assert sent == 20


async def test_connection_state_is_bounded() -> None:
    conn = Connection(None, "c", Request("GET", "/"))  # type: ignore[arg-type]
    conn.state = {"name": "x" * 100}
    with pytest.raises(ValueError, match="16384"):
        conn.state = "x" * 20_000
    with pytest.raises(TypeError, match="msgpack"):
        conn.state = object()
    assert conn.state == {"name": "x" * 100}


# -- the output gate -----------------------------------------------------------------------------


async def test_messages_wait_until_the_writes_before_them_are_durable() -> None:
    async with RoomsHarness(make_app()) as h:
        backend = h._server.backend
        real_commit = backend.commit
        parked: list[Any] = []

        def slow_commit(
            room: str,
            writes: Any,
            delete_all: bool,
            done: Any,
            alarm: Any = None,
            epoch: Any = None,
            after: Any = None,
        ) -> None:
            parked.append((room, writes, delete_all, done, alarm, epoch, after))

        backend.commit = slow_commit  # type: ignore[method-assign, assignment]
        c = await h.connect("/count/g")
        other = await h.connect("/tag/elsewhere")
        await c.send("inc")  # writes, then sends "1": held
        await c.send("get")  # no writes, but must not overtake "1"
        await other.send("free")  # another room is not held
        assert await other.receive() == "free"
        for _ in range(5000):  # the room reads storage (a thread) before it commits: wait
            if parked:
                break
            await trio.sleep(0.001)
        await h.settle_events()
        assert c.received == []
        assert len(parked) == 1
        backend.commit = real_commit  # type: ignore[method-assign]
        for args in parked:
            real_commit(*args)
        assert await c.receive() == "1"
        assert await c.receive() == "1"


# -- activations -------------------------------------------------------------------------------


class Census(Room):
    starts = 0

    async def on_start(self) -> None:
        type(self).starts += 1
        await trio.sleep(0.01)  # a slow start: concurrent connects must still share it

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(str(len(self.connections())))


async def test_one_activation_per_room_and_idle_rooms_unload() -> None:
    from rooms.testing import Settings

    Census.starts = 0
    app = App()
    app.room("/census/{name}", Census)
    async with RoomsHarness(app, settings=Settings(room_idle_timeout=0.2)) as h:
        clients = []

        async def join() -> None:
            clients.append(await h.connect("/census/one"))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(join)
        await clients[0].send("count")
        assert await clients[0].receive() == "20"
        assert Census.starts == 1
        for c in clients:
            await c.disconnect()
        await h.settle()
        assert h.is_active(Census, "one")
        await trio.sleep(0.5)  # idle, no connections: unloaded
        assert not h.is_active(Census, "one")
        again = await h.connect("/census/one")
        await again.send("count")
        assert await again.receive() == "1"
        assert Census.starts == 2


# -- coalesced writes ----------------------------------------------------------------------


class Burst(Room):
    """Broadcasts each message; "hold" blocks until the test releases it; "save" writes
    storage first; "bye" sends then closes the sender."""

    release = trio.Event()

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "hold":
            await self.release.wait()
        elif message == "save":
            self.storage.put("k", 1)
        elif message == "bye":
            conn.send("last words")
            conn.close(4000, "bye")
            return
        self.broadcast(message)


def counting_writes(client: Any) -> list[bytes]:
    """Replace a fake client's transport write with one that also records each call."""
    calls: list[bytes] = []
    write = client.write

    def counted(data: bytes, messages: int = 1) -> None:
        calls.append(data)
        write(data, messages)

    client.write = counted
    return calls


def burst_app() -> App:
    app = App()
    app.room("/burst/{name}", Burst)
    return app


async def test_a_burst_of_events_is_one_write_per_connection() -> None:
    async with RoomsHarness(burst_app()) as h:
        a, b = await h.connect("/burst/x"), await h.connect("/burst/x")
        await h.settle()
        writes_a, writes_b = counting_writes(a), counting_writes(b)
        for i in range(10):  # queued before the room runs: one burst
            await a.send(f"m{i}")
        await h.settle()
        expected = [f"m{i}" for i in range(10)]
        assert a.received == b.received == expected  # in order, complete
        assert len(writes_a) == len(writes_b) == 1  # ... and one write each


async def test_a_blocking_handler_sends_the_burst_so_far_first() -> None:
    Burst.release = trio.Event()
    async with RoomsHarness(burst_app()) as h:
        a = await h.connect("/burst/y")
        await h.settle()
        for message in ("one", "two", "hold", "three"):
            await a.send(message)
        await h.settle_events()
        # the room waits inside "hold": what it sent before is out already
        assert a.received == ["one", "two"]
        Burst.release.set()
        await h.settle()
        assert a.received == ["one", "two", "hold", "three"]


async def test_batched_and_gated_outputs_keep_their_order() -> None:
    async with RoomsHarness(burst_app()) as h:
        a = await h.connect("/burst/z")
        await h.settle()
        for message in ("plain", "save", "after"):
            await a.send(message)
        await h.settle()
        assert a.received == ["plain", "save", "after"]
        await a.send("x")
        await a.send("bye")  # its message goes before its close
        await h.settle()
        assert a.received[-2:] == ["x", "last words"]
        assert (a.close_code, a.close_reason) == (4000, "bye")


async def test_the_harness_applies_the_upgrade_time_rules() -> None:
    from tests.support import guarded_app

    async with RoomsHarness(guarded_app()) as h:
        with pytest.raises(HandshakeRejected) as refused:
            await h.connect("/guarded/a")
        assert refused.value.response.status == 401
        with pytest.raises(HandshakeRejected) as refused:
            await h.connect("/guarded/a?token=secret", headers=[("Origin", "https://x.example")])
        assert refused.value.response.status == 403
        ada = await h.connect("/guarded/a?token=secret")
        assert await ada.receive() == "{'user': 'ada'}"


async def test_sending_something_that_is_not_a_message_says_what_to_send() -> None:
    class Sloppy(Room):
        async def on_message(self, conn: Connection, message: str | bytes) -> None:
            try:
                conn.send({"json": "please"})  # type: ignore[arg-type]
            except TypeError as exc:
                conn.send(str(exc))

    app = App()
    app.room("/sloppy/{name}", Sloppy)
    async with RoomsHarness(app) as h:
        c = await h.connect("/sloppy/a")
        await c.send("go")
        assert await c.receive() == (
            "a WebSocket message is str (text) or bytes (binary), not dict; "
            "to send JSON, send json.dumps(value)"
        )
