"""``rooms.testing`` answers as the server does: one app, every kind of answer, through
``RoomsHarness`` and through a real server on a socket, compared field by field."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, open_websocket_url

from rooms import App, Connection, HTTPError, Request, Response, Room
from rooms.testing import HandshakeRejected, RoomsHarness, Settings
from runtime.storage import SqliteBackend
from tests.support import raw_request, start_server


class Board(Room):
    auto_reply = ("ping", "pong")

    @classmethod
    async def on_before_connect(cls, request: Request) -> Any:
        if request.query_param("token") != "ok":
            raise HTTPError(401, "a token is required")
        return "ada"

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(f"hello {request.identity}")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(f"room: {message!s}")

    async def on_request(self, request: Request) -> Response:
        return Response(200, "a str body from on_request")


def parity_app() -> App:
    app = App()
    app.room("/board/{name}", Board)

    @app.route("/str")
    async def str_body(request: Request) -> Response:
        return Response(200, "hello", {"content-type": "text/plain; charset=utf-8"})

    @app.route("/bytes")
    async def bytes_body(request: Request) -> Response:
        return Response(201, b"\x00\x01", {"x-count": 2})  # an int header value is allowed

    @app.route("/json", methods=["GET", "POST"])
    async def json_body(request: Request) -> Response:
        return Response.json({"method": request.method, "body": request.body.decode()})

    @app.route("/refused")
    async def refused(request: Request) -> Response:
        raise HTTPError(409, "already taken")

    @app.route("/broken")
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    @app.route("/newline")
    async def newline(request: Request) -> Response:
        return Response(200, "x", {"x-bad": "one\r\ntwo"})  # cannot be sent: a 500 in both

    return app


REQUESTS = [
    ("GET", "/str", b""),
    ("GET", "/bytes", b""),
    ("GET", "/json", b""),
    ("POST", "/json", b"payload"),
    ("PUT", "/json", b""),
    ("GET", "/refused", b""),
    ("GET", "/broken", b""),
    ("GET", "/newline", b""),
    ("GET", "/nowhere", b""),
    ("GET", "/board/a", b""),
    ("GET", "/board/" + "n" * 100, b""),
]


def parsed(raw: bytes) -> tuple[int, bytes, str | None]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), body, fields.get("content-type")


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
async def test_plain_requests_get_the_same_answer_from_the_harness_and_the_server(
    nursery: trio.Nursery, settings: Settings, method: str, path: str, body: bytes
) -> None:
    app = parity_app()
    async with RoomsHarness(app) as harness:
        expected = await harness.request(method, path, body)
    port = await start_server(nursery, app, settings)
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\ncontent-length: {len(body)}\r\n"
    raw = await raw_request(port, request.encode() + b"connection: close\r\n\r\n" + body)
    status, answer, kind = parsed(raw)
    assert (status, answer, kind) == (
        expected.status,
        expected.body,
        expected.headers.get("content-type"),
    )


async def test_websocket_upgrades_and_messages_match(
    nursery: trio.Nursery, settings: Settings
) -> None:
    app = parity_app()
    limits = settings.replace(max_connections_per_room=1)
    port = await start_server(nursery, app, limits)
    async with RoomsHarness(app, settings=limits) as harness:
        with pytest.raises(HandshakeRejected) as refused:
            await harness.connect("/board/a")
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/board/a"):
                pass
        assert (refused.value.response.status, refused.value.response.body) == (
            rejected.value.status_code,
            rejected.value.body,
        )

        fake = await harness.connect("/board/a?token=ok")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/board/a?token=ok") as real:
            for message in ("ping", "hi"):  # the auto reply, then a message the room answers
                await fake.send(message)
                await real.send_message(message)
            seen = [await real.get_message() for _ in range(3)]
            assert [await fake.receive() for _ in range(3)] == seen
            assert seen == ["hello ada", "pong", "room: hi"]

            with pytest.raises(HandshakeRejected) as full:  # max_connections_per_room
                await harness.connect("/board/a?token=ok")
            with pytest.raises(ConnectionRejected) as full_too:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/board/a?token=ok"):
                    pass
            assert (full.value.response.status, full.value.response.body) == (
                full_too.value.status_code,
                full_too.value.body,
            )
            assert harness.metrics.auto_replies_total == 1


# -- the virtual clock waits for storage -------------------------------------------------------


class Reader(Room):
    async def on_request(self, request: Request) -> Response:
        return Response.json(await self.storage.get("x", "nothing stored"))


def reader_app() -> App:
    app = App()
    app.room("/reader/{name}", Reader)
    return app


async def slow_reads(harness: RoomsHarness, seconds: float) -> None:
    """Every SELECT in the storage writer takes ``seconds`` of real time (a busy machine)."""
    backend = harness._server.backend
    assert isinstance(backend, SqliteBackend)
    await backend.fault("slow_selects", seconds).wait()


async def test_the_virtual_clock_does_not_jump_while_storage_works(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(reader_app()) as rooms:
        await slow_reads(rooms, 0.1)  # ten times the clock's idle threshold
        with trio.fail_after(5):  # a deadline that a jump would pass
            answer = await rooms.request("GET", "/reader/a")
        assert answer.body == b'"nothing stored"'
        assert trio.current_time() < 1


async def test_a_plain_mock_clock_jumps_during_a_slow_read(
    mock_clock: trio.testing.MockClock,
) -> None:
    # What virtual_clock prevents: the same read, and the deadline passes during it.
    mock_clock.autojump_threshold = 0.01
    async with RoomsHarness(reader_app()) as rooms:
        await slow_reads(rooms, 0.1)
        with pytest.raises(trio.TooSlowError), trio.fail_after(5):
            await rooms.request("GET", "/reader/a")
