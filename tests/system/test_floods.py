"""Floods against a real ``rooms serve`` process of the example chat.

Each flood runs while a normal chat member keeps talking (every line it says must come back
to it), and afterwards the server's descriptors, its open-connection gauges and its memory
must be back where they were: 20,000 connection attempts past ``max_connections``, 10,000
WebSockets that connect and never say a word, and 150,000 distinct room names from one
client. The figures each flood reached are in docs/conformance.md.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from runtime.frames import OP_TEXT
from tests.support import REPO, metric, server, wait_for_port
from tests.system.raw import RawWebSocket, Server, fds_back_to, frame, status

MiB = 1024  # RSS is read in KiB


@asynccontextmanager
async def chat_server(
    folder: Path, config: str, first_message_seconds: float = 30.0
) -> AsyncIterator[Server]:
    """The example chat as a process, with ``config`` and the chat's own bound on a silent
    newcomer; no rate limit on messages (the normal member talks fast)."""
    (folder / "rooms.toml").write_text(config)
    env = {
        "CHAT_SECONDS_PER_MESSAGE": "0",
        "CHAT_FIRST_MESSAGE_SECONDS": str(first_message_seconds),
    }
    options = ("--config", str(folder / "rooms.toml"))
    with server("examples.chat.app:app", REPO, folder / "data", *options, env=env) as (
        proc,
        port,
    ):
        await wait_for_port(port, proc)
        yield Server(proc.pid, port, folder)
        assert proc.poll() is None, "the server died"


class Member:
    """A normal chat member: joined, and saying a line every 0.2 s for as long as it runs;
    each line must come back (broadcast to the room) within 5 s."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.lines = 0

    async def say(self, text: str) -> None:
        await self.ws.send_message(json.dumps({"message": text}))
        with trio.fail_after(5):
            while True:
                frame = json.loads(await self.ws.get_message())
                if frame.get("message") == text:
                    self.lines += 1
                    return

    async def keep_talking(self) -> None:
        while True:
            await self.say(f"line {self.lines}")
            await trio.sleep(0.2)


@asynccontextmanager
async def member_talking(port: int) -> AsyncIterator[Member]:
    url = f"ws://127.0.0.1:{port}/api/room/lobby/websocket"
    async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:
        await ws.send_message(json.dumps({"name": "alice"}))
        member = Member(ws)
        await member.say("hello")
        nursery.start_soon(member.keep_talking)
        yield member
        nursery.cancel_scope.cancel()
    assert member.lines > 5


async def gauges_back(srv: Server, websockets: int) -> None:
    """Wait (up to 20 s) until only ``websockets`` WebSockets are open (and one TCP
    connection more: the metrics request itself)."""
    for _ in range(200):
        if await metric(srv.port, "websockets_open") == websockets:
            break
        await trio.sleep(0.1)
    assert await metric(srv.port, "websockets_open") == websockets
    assert await metric(srv.port, "connections_open") == websockets + 1


async def test_20000_connection_attempts_past_max_connections(tmp_path: Path) -> None:
    """300 connections fill max_connections; 20,000 more attempts (200 at a time) each get
    503 and are counted; the member on one of the 300 is served throughout."""
    async with chat_server(tmp_path, "max_connections = 300\n") as srv:
        async with member_talking(srv.port) as member:
            baseline, rss_before = srv.fds(), srv.rss_kib()
            before = await metric(srv.port, "limit_connections_total")
            held = []
            for _ in range(299):  # with the member's, max_connections WebSockets
                ws = await RawWebSocket.connect(srv.port, "/api/room/held/websocket")
                await ws.send(frame(OP_TEXT, b"ping"))  # (a first message: it may stay)
                assert await ws.next_event() == "pong"
                held.append(ws)
            refused: list[int] = []
            attempts = trio.CapacityLimiter(200)
            request = b"GET /api/room/x/websocket HTTP/1.1\r\nhost: x\r\n\r\n"

            async def attempt() -> None:
                async with attempts, await trio.open_tcp_stream("127.0.0.1", srv.port) as s:
                    await s.send_all(request)
                    answer = b""
                    while chunk := await s.receive_some(4096):
                        answer += chunk
                    refused.append(status(answer))

            lines_before = member.lines
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for _ in range(20_000):
                        nursery.start_soon(attempt)
            assert refused == [503] * 20_000
            assert member.lines > lines_before  # it was served during the flood
            for ws in held:
                await ws.aclose()
        assert await metric(srv.port, "limit_connections_total") - before == 20_000
        await gauges_back(srv, 0)
        await fds_back_to(srv, baseline - 1)  # (the member's socket is closed too)
        assert srv.rss_kib() - rss_before < 16 * MiB


async def test_10000_websockets_that_never_say_a_word(tmp_path: Path) -> None:
    """The chat bounds how long a newcomer may stay silent (30 s; 3 s here): 10,000
    WebSockets that connect and say nothing are each closed with 1008 and its reason, and
    counted; the member, who said its name, stays. A second round may raise RSS by what
    CPython's allocator keeps of the first round's peak (arenas pinned by a block that
    lives on; up to 47 MB measured), not by what the connections took (100 MB or more):
    that nothing is kept per connection is tested object by object in
    runtime/test_edge.py."""
    config = "max_connections = 11000\n"
    async with (
        chat_server(tmp_path, config, first_message_seconds=3.0) as srv,
        member_talking(srv.port),
    ):
        baseline = srv.fds()

        async def round_of_silent_websockets() -> None:
            handshakes = trio.CapacityLimiter(200)  # a client fleet's pace, as elsewhere
            closes: list[tuple[int | None, str]] = []

            async def silent(i: int) -> None:
                async with handshakes:
                    ws = await RawWebSocket.connect(srv.port, f"/api/room/r{i % 100}/websocket")
                closes.append(await ws.close_received(30))
                await ws.aclose()

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for i in range(10_000):
                        nursery.start_soon(silent, i)
            assert closes == [(1008, "no message within 3 s of connecting")] * 10_000
            await gauges_back(srv, 1)

        before = await metric(srv.port, "limit_first_message_total")
        await round_of_silent_websockets()
        rss_after_first = srv.rss_kib()
        await round_of_silent_websockets()
        assert srv.rss_kib() - rss_after_first < 64 * MiB
        assert await metric(srv.port, "limit_first_message_total") - before == 20_000
        await fds_back_to(srv, baseline)


async def test_150000_room_names_from_one_client(tmp_path: Path) -> None:
    """One client reads the history of 150,000 distinct rooms (16 keep-alive connections):
    every one answers 200 with no messages, no more than max_rooms_in_memory (1,000) stay in
    memory (plus, for a moment, the few busy or on their way out: eviction asks idle rooms to
    leave and they go at their next step), nothing is written for them, and memory stays
    bounded: once the allocator's pools have filled (the first 100,000 rooms grew the RSS by
    12-26 MiB on each half, before and after the storage writer moved out of the process), the
    next 50,000 rooms do not grow it."""
    config = "max_rooms_in_memory = 1000\n"
    async with chat_server(tmp_path, config) as srv:
        async with member_talking(srv.port):
            rows_before = stored_rows(srv)
            peak_in_memory = 0
            rss: list[int] = []

            async def reader(first: int, count: int) -> None:
                nonlocal peak_in_memory
                async with await trio.open_tcp_stream("127.0.0.1", srv.port) as stream:
                    buffer = b""
                    for i in range(first, first + count):
                        path = f"/api/room/flood-{i}/history"
                        await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                        head, buffer = await read_response(stream, buffer)
                        assert head.startswith(b"HTTP/1.1 200 "), head
                        if i % 1000 == 0:
                            in_memory = await metric(srv.port, "rooms_in_memory")
                            peak_in_memory = max(peak_in_memory, in_memory)

            for third in range(3):
                with trio.fail_after(240):
                    async with trio.open_nursery() as nursery:
                        for part in range(16):
                            first = third * 50_000 + part * 3125
                            nursery.start_soon(reader, first, 3125)
                rss.append(srv.rss_kib())
            assert await metric(srv.port, "rooms_in_memory") <= 1000
            assert peak_in_memory <= 1000 + 32  # (16 clients' rooms, each going or coming)
            assert rss[2] - rss[1] < 16 * MiB, rss
        # Rows only for the rooms that had some: the member's, and its address's rate limiter.
        assert stored_rows(srv).keys() == rows_before.keys()


async def read_response(stream: trio.SocketStream, buffer: bytes) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length off a keep-alive connection: its head, and
    what came after it."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, buffer
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        assert chunk
        rest += chunk
    return head, rest[length:]


def stored_rows(srv: Server) -> dict[str, int]:
    """Rows per room id in the server's SQLite database (read-only, beside the writer)."""
    path = srv.folder / "data" / "rooms.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT room, count(*) FROM kv GROUP BY room").fetchall())
