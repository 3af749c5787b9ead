"""``rooms.client`` against real servers on loopback: it stays connected across a restart
(hello again, queued messages after it, in order), honours Retry-After, replaces a dead
connection, bounds its queue, and gives up, saying why, where retrying is pointless."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

import rooms.client
from rooms import App, Connection, Request, Room
from rooms.testing import Settings
from tests.support import free_port, server_on


class Echo(Room):
    hellos: list[str] = []

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("hello "):
            type(self).hellos.append(message)
        conn.send(message)


class Bouncer(Room):
    async def on_connect(self, conn: Connection, request: Request) -> None:
        code = int(request.query_param("code") or "1000")
        conn.send("bye")
        conn.close(code, "go away" if code != 1000 else "")


def app() -> App:
    application = App()
    application.room("/echo/{name}", Echo)
    application.room("/bounce/{name}", Bouncer)
    return application


FAST: dict[str, Any] = {"min_delay": 0.05, "max_delay": 0.2}


async def test_messages_both_ways_and_iteration(settings: Settings) -> None:
    port = free_port()
    async with server_on(port, settings, app()):
        url = f"ws://127.0.0.1:{port}/echo/a"
        async with rooms.client.connect(url) as room:
            await room.wait_open()
            assert room.state == "open"
            await room.send("one")
            await room.send(b"\x00two")
            assert await room.receive() == "one"
            received = []
            async for message in room:
                received.append(message)
                break
            assert received == [b"\x00two"]
        assert room.state == "closed"


async def test_a_restart_brings_it_back_with_hello_first_then_the_queue(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rooms.client")
    Echo.hellos = []
    port = free_port()
    connections = 0

    def hello() -> str:
        nonlocal connections
        connections += 1
        return f"hello {connections}"

    application = app()
    async with rooms.client.connect(f"ws://127.0.0.1:{port}/echo/r", hello, **FAST) as room:
        async with server_on(port, settings, application):
            await room.wait_open()
            assert await room.receive() == "hello 1"
        # drained: 1012; the server is down, so these wait in the queue
        with trio.fail_after(5):
            while room.state == "open":  # noqa: ASYNC110 - polling the state
                await trio.sleep(0.01)
        # (last_close may already be a refused reconnect: the client's log has every end)
        assert any("ended with 1012" in r.getMessage() for r in caplog.records)
        await room.send("while down 1")
        await room.send("while down 2")
        async with server_on(port, settings, application):
            with trio.fail_after(10):
                got = [await room.receive() for _ in range(3)]
        assert got[1:] == ["while down 1", "while down 2"]
        assert isinstance(got[0], str) and got[0].startswith("hello ")  # hello again, first
        assert got[0] != "hello 1"
        assert Echo.hellos[0] == "hello 1"


@pytest.mark.parametrize("code", [1008, 4401])
async def test_a_final_close_code_ends_it_and_says_why(settings: Settings, code: int) -> None:
    port = free_port()
    async with server_on(port, settings, app()):
        url = f"ws://127.0.0.1:{port}/bounce/b?code={code}"
        async with rooms.client.connect(url, **FAST) as room:
            assert await room.receive() == "bye"
            with pytest.raises(rooms.client.ConnectionClosed) as closed:
                await room.receive()
            assert (closed.value.code, closed.value.reason) == (code, "go away")
            assert f"closed with {code} (go away)" in str(closed.value)
            with pytest.raises(rooms.client.ConnectionClosed):
                await room.send("more")
            assert room.state == "closed"


async def test_a_refused_upgrade_ends_it_with_the_status(settings: Settings) -> None:
    port = free_port()
    async with (
        server_on(port, settings, app()),
        rooms.client.connect(f"ws://127.0.0.1:{port}/nowhere/x", **FAST) as room,
    ):
        with pytest.raises(rooms.client.ConnectionClosed) as refused:
            await room.wait_open()
        assert (refused.value.status, refused.value.code) == (404, 404)
        assert "refused the WebSocket upgrade with HTTP 404: not found" in str(refused.value)


async def test_a_normal_close_by_the_room_is_reconnected(settings: Settings) -> None:
    port = free_port()
    async with (
        server_on(port, settings, app()),
        rooms.client.connect(f"ws://127.0.0.1:{port}/bounce/n", **FAST) as room,
    ):
        with trio.fail_after(5):
            assert [await room.receive() for _ in range(3)] == ["bye"] * 3


async def test_retry_after_is_honoured(settings: Settings) -> None:
    limited = settings.replace(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    port = free_port()
    async with (
        server_on(port, limited, app()),
        rooms.client.connect(f"ws://127.0.0.1:{port}/bounce/r", **FAST) as room,
    ):
        assert await room.receive() == "bye"  # the one upgrade of the burst
        start = trio.current_time()
        with trio.fail_after(10):
            while room.last_close is None or room.last_close[0] != 429:  # noqa: ASYNC110 - polling the state
                await trio.sleep(0.005)
            assert await room.receive() == "bye"  # admitted again, after Retry-After: 1
        assert trio.current_time() - start >= 0.9


async def test_a_full_room_is_retried_until_there_is_a_seat(settings: Settings) -> None:
    port = free_port()
    async with server_on(port, settings.replace(max_connections_per_room=1), app()):
        url = f"ws://127.0.0.1:{port}/echo/full"
        async with rooms.client.connect(url, **FAST) as first:
            await first.wait_open()
            async with rooms.client.connect(url, **FAST) as second:
                with trio.fail_after(5):
                    while second.attempt < 2:  # noqa: ASYNC110 - polling the state
                        await trio.sleep(0.01)
                assert second.state != "open" and second.last_close == (503, "room is full")
                await first.close()
                with trio.fail_after(5):
                    await second.wait_open()


async def test_a_silent_connection_is_replaced_by_the_heartbeat() -> None:
    """A server that completes the handshake, then never answers anything."""
    accepted = 0
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def silent(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        from runtime.frames import accept_key

        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n"
        )
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, [trio.SocketListener(listener)])
        options = {**FAST, "heartbeat_interval": 0.2, "heartbeat_timeout": 0.2}
        async with rooms.client.connect(f"ws://127.0.0.1:{port}/x", **options) as room:
            with trio.fail_after(10):
                while accepted < 2:  # noqa: ASYNC110 - polling the state
                    await trio.sleep(0.01)
            assert room.last_close == (1006, "no answer to a heartbeat ping")
        nursery.cancel_scope.cancel()


async def test_the_queue_is_bounded_while_disconnected() -> None:
    port = free_port()  # nothing listens there
    url = f"ws://127.0.0.1:{port}/echo/q"
    async with rooms.client.connect(url, max_queued=3, **FAST) as room:
        for n in range(3):
            await room.send(f"m{n}")
        with trio.move_on_after(0.3) as waited:
            await room.send("one too many")
        assert waited.cancelled_caught  # it waits for a connection to take the queue
        assert room.state in ("connecting", "waiting")
        assert room.last_close is not None and room.last_close[0] == 1006


def test_only_websocket_urls() -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        rooms.client.RoomClient("http://example.com/x")


async def test_hello_may_be_a_list_or_a_coroutine(settings: Settings) -> None:
    port = free_port()

    async def hello() -> list[str]:
        return [json.dumps({"a": 1}), "second"]

    async with (
        server_on(port, settings, app()),
        rooms.client.connect(f"ws://127.0.0.1:{port}/echo/h", hello) as room,
    ):
        assert [await room.receive() for _ in range(2)] == ['{"a": 1}', "second"]
