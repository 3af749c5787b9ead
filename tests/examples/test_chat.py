"""The example chat over real sockets: every line of its protocol (Cloudflare's
workers-chat-demo, plus stored history with ``seq``), served in process."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from examples.chat import app as chat
from runtime.config import Settings
from tests.support import start_server

RATE_LIMITED = "Your IP is being rate-limited, please try again later."
HEX64 = re.compile(r"[0-9a-f]{64}")

JSON = dict[str, Any]


@pytest.fixture
def no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test client is 127.0.0.1, so one limiter counts them all: lift it."""
    monkeypatch.setattr(chat.RateLimiter, "grace", 1e9)


async def http(
    port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request; the status, the headers (lowercase names) and the body."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=method,
        target=target,
        headers=[("Host", "127.0.0.1"), ("Connection", "close"), *(headers or [])],
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        status = 0
        response_headers: dict[str, str] = {}
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, response_headers, body


def quick_close(settings: Settings) -> Settings:
    """For tests where the server closes a connection: trio-websocket may keep its socket
    open (CLOSE-WAIT) after a server-initiated close, and the server's lingering close
    would then hold its shutdown for ``close_timeout`` (5 s by default)."""
    return settings.replace(close_timeout=0.3)


def ws_url(port: int, room: str) -> str:
    return f"ws://127.0.0.1:{port}/api/room/{room}/websocket"


@asynccontextmanager
async def client(port: int, room: str) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(ws_url(port, room)) as ws:
        yield ws


async def receive(ws: WebSocketConnection) -> JSON:
    message = await ws.get_message()
    assert isinstance(message, str), message
    data = json.loads(message)
    assert isinstance(data, dict), data
    return data


async def send(ws: WebSocketConnection, data: Any) -> None:
    await ws.send_message(json.dumps(data))


async def join(ws: WebSocketConnection, name: str) -> list[JSON]:
    """Send the name; return every frame up to and including ``{"ready": true, ...}``."""
    await send(ws, {"name": name})
    frames: list[JSON] = []
    while not frames or "ready" not in frames[-1]:
        frames.append(await receive(ws))
    return frames


async def chat_message(ws: WebSocketConnection, text: str) -> JSON:
    """Send a message; return its broadcast as the sender receives it."""
    await send(ws, {"message": text})
    entry = await receive(ws)
    assert entry.get("message") == text, entry
    return entry


def check_entries(entries: list[JSON], first_seq: int) -> None:
    """Broadcast messages: the four fields, seq +1 each, timestamps strictly increasing."""
    now_ms = time.time() * 1000
    for i, entry in enumerate(entries):
        assert set(entry) == {"name", "message", "timestamp", "seq"}, entry
        assert entry["seq"] == first_seq + i
        assert isinstance(entry["timestamp"], int)
        assert now_ms - 60_000 < entry["timestamp"] < now_ms + 60_000
    stamps = [e["timestamp"] for e in entries]
    assert all(a < b for a, b in itertools.pairwise(stamps)), stamps


# -- HTTP -------------------------------------------------------------------------------


async def test_the_page_is_served(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        status, headers, body = await http(port, "GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert body.strip()


async def test_post_api_room_creates_private_room_ids(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        status, headers, first = await http(port, "POST", "/api/room")
        assert status == 200
        assert headers["access-control-allow-origin"] == "*"
        assert HEX64.fullmatch(first.decode()), first
        status, _, second = await http(port, "POST", "/api/room")
        assert status == 200 and HEX64.fullmatch(second.decode())
        assert first != second
        status, _, _ = await http(port, "GET", "/api/room")
        assert status == 405
        status, headers, _ = await http(port, "OPTIONS", "/api/room")
        assert status == 204
        assert headers["access-control-allow-origin"] == "*"
        # the id joins a room like any name
        async with client(port, first.decode()) as ws:
            await join(ws, "alice")
            assert (await chat_message(ws, "private"))["seq"] == 1


async def test_room_names(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        with pytest.raises(ConnectionRejected) as rejected:
            async with client(port, "n" * 33):
                pass
        assert rejected.value.status_code == 404
        assert rejected.value.body is not None
        assert rejected.value.body.decode().strip() == "Name too long"
        async with client(port, "n" * 32) as ws:
            assert await join(ws, "a") == [{"joined": "a"}, {"ready": True, "seq": 0}]
        async with client(port, "ab" * 32) as ws:  # 64 hex: a private room id
            assert await join(ws, "a") == [{"joined": "a"}, {"ready": True, "seq": 0}]
        status, _, body = await http(port, "GET", "/api/room/x/websocket")
        assert (status, body.decode().strip()) == (400, "expected websocket")
        status, _, body = await http(port, "GET", "/api/room/" + "n" * 33 + "/websocket")
        assert (status, body.decode().strip()) == (404, "Name too long")


# -- joining ----------------------------------------------------------------------------


async def test_nothing_arrives_before_the_name(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as lurker, client(port, "lobby") as alice:
            # (the lurker's 101 came first: it is in the room before alice's name)
            await join(alice, "alice")
            said = await chat_message(alice, "hello")
            # Its first frames after the name are the join sequence: nothing came before it,
            # not alice's join, not her message (it would be first here).
            assert await join(lurker, "bob") == [
                {"joined": "alice"},
                said,
                {"joined": "bob"},
                {"ready": True, "seq": 1},
            ]
            assert await receive(alice) == {"joined": "bob"}


async def test_join_sequence_roster_history_joined_ready(
    nursery: trio.Nursery, settings: Settings, no_rate_limit: None
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(10):
        async with client(port, "busy") as alice, client(port, "busy") as bob:
            assert await join(alice, "alice") == [{"joined": "alice"}, {"ready": True, "seq": 0}]
            await join(bob, "bob")
            assert await receive(alice) == {"joined": "bob"}
            for i in range(105):
                await send(alice, {"message": f"m{i}"})
            sent = [await receive(alice) for _ in range(105)]
            assert [e["message"] for e in sent] == [f"m{i}" for i in range(105)]
            check_entries(sent, first_seq=1)
            assert [await receive(bob) for _ in range(105)] == sent
            async with client(port, "busy") as carol:
                frames = await join(carol, "carol")
            # one {"joined"} per named member (any order), then the last 100 messages
            # oldest first, then carol's own join and ready
            assert sorted(f["joined"] for f in frames[:2]) == ["alice", "bob"]
            assert frames[2:102] == sent[5:]
            assert frames[102:] == [{"joined": "carol"}, {"ready": True, "seq": 105}]
            assert await receive(alice) == {"joined": "carol"}
            assert await receive(bob) == {"joined": "carol"}


async def test_a_bad_first_frame_asks_for_the_name(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as ws:
            for bad in ({"message": "hi"}, {"name": 5}, {"name": "  "}, {}):
                await send(ws, bad)
                assert "error" in await receive(ws)
            assert await join(ws, "alice") == [{"joined": "alice"}, {"ready": True, "seq": 0}]


async def test_a_name_over_32_characters_is_refused_and_closed_1009(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, quick_close(settings))
    with trio.fail_after(5):
        async with client(port, "lobby") as ws:
            assert await join(ws, "n" * 32) == [{"joined": "n" * 32}, {"ready": True, "seq": 0}]
        async with client(port, "lobby") as ws:
            await send(ws, {"name": "n" * 33})
            assert await receive(ws) == {"error": "Name too long."}
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1009


# -- messages ---------------------------------------------------------------------------


async def test_messages_reach_everyone_with_timestamp_and_seq(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as alice, client(port, "lobby") as bob:
            await join(alice, "alice")
            await join(bob, "bob")
            assert await receive(alice) == {"joined": "bob"}
            mine = [await chat_message(alice, "one"), await chat_message(alice, "two")]
            assert [await receive(bob) for _ in range(2)] == mine
            theirs = [await chat_message(bob, "three")]
            assert [await receive(alice)] == theirs
            check_entries(mine + theirs, first_seq=1)
            assert [e["name"] for e in mine + theirs] == ["alice", "alice", "bob"]
        async with client(port, "elsewhere") as carol:  # seq is per room
            await join(carol, "carol")
            assert (await chat_message(carol, "hi"))["seq"] == 1


async def test_message_length_limit(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as ws:
            await join(ws, "alice")
            await send(ws, {"message": "x" * 257})
            assert await receive(ws) == {"error": "Message too long."}
            assert (await chat_message(ws, "x" * 256))["seq"] == 1  # still open


async def test_a_leaving_member_is_announced(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as alice:
            await join(alice, "alice")
            async with client(port, "lobby"):
                pass  # never named: leaves unannounced
            async with client(port, "lobby") as bob:
                await join(bob, "bob")
                assert await receive(alice) == {"joined": "bob"}
            assert await receive(alice) == {"quit": "bob"}
            # A barrier: alice's own message comes back next; no other frame (the unnamed
            # client's leaving, a second quit) came before it.
            await chat_message(alice, "barrier")


async def test_malformed_frames_get_an_error_and_the_room_carries_on(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as alice, client(port, "lobby") as bob:
            await join(alice, "alice")
            await join(bob, "bob")
            assert await receive(alice) == {"joined": "bob"}
            for bad in ("not json", "[1, 2]", '"text"', json.dumps({"message": 5})):
                await alice.send_message(bad)
                error = await receive(alice)
                assert set(error) == {"error"} and isinstance(error["error"], str), error
            await alice.send_message(b'{"message": "binary"}')
            error = await receive(alice)
            assert set(error) == {"error"}, error
            said = await chat_message(alice, "still here")
            assert said["seq"] == 1
            assert await receive(bob) == said  # bob saw none of the errors


async def test_deeply_nested_json_is_a_malformed_frame(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, quick_close(settings))
    with trio.fail_after(5):
        async with client(port, "lobby") as alice:
            await join(alice, "alice")
            await alice.send_message("[" * 100_000)
            assert set(await receive(alice)) == {"error"}
            assert (await chat_message(alice, "still here"))["seq"] == 1


async def test_rate_limit_with_the_default_policy(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as alice:
            await join(alice, "alice")
            for i in range(10):
                await send(alice, {"message": f"m{i}"})
            answers = [await receive(alice) for _ in range(10)]
            errors = [a for a in answers if "error" in a]
            accepted = [a for a in answers if "seq" in a]
            assert errors and all(a == {"error": RATE_LIMITED} for a in errors)
            assert len(errors) + len(accepted) == 10
            # a burst is allowed first; what passed is numbered without gaps
            assert accepted and answers[0] == accepted[0]
            check_entries(accepted, first_seq=1)


# -- history across restarts ------------------------------------------------------------


async def test_history_survives_a_server_restart(settings: Settings, no_rate_limit: None) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as server:
            port = await start_server(server, chat.app, settings)
            async with client(port, "kept") as alice:
                await join(alice, "alice")
                before = [await chat_message(alice, f"m{i}") for i in range(3)]
            server.cancel_scope.cancel()

        async with trio.open_nursery() as server:
            port = await start_server(server, chat.app, settings)
            async with client(port, "kept") as bob:
                assert await join(bob, "bob") == [
                    *before,
                    {"joined": "bob"},
                    {"ready": True, "seq": 3},
                ]
                after = await chat_message(bob, "after")
                check_entries([*before, after], first_seq=1)
            server.cancel_scope.cancel()


# -- resume by seq ----------------------------------------------------------------------


async def join_after(ws: WebSocketConnection, name: str, after: int | None) -> list[JSON]:
    await send(ws, {"name": name, "after": after})
    frames: list[JSON] = []
    while not frames or "ready" not in frames[-1]:
        frames.append(await receive(ws))
    return frames


async def test_a_resuming_client_gets_exactly_what_it_missed(
    nursery: trio.Nursery, settings: Settings, no_rate_limit: None
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(10):
        async with client(port, "resume") as alice:
            await join(alice, "alice")
            sent = [await chat_message(alice, f"m{i}") for i in range(5)]
            async with client(port, "resume") as bob:
                frames = await join_after(bob, "bob", 2)
                assert frames == [
                    {"joined": "alice"},
                    *sent[2:],  # seq 3, 4, 5: nothing before, nothing twice
                    {"joined": "bob"},
                    {"ready": True, "seq": 5},
                ]
            async with client(port, "resume") as bob:  # up to date: no history at all
                assert await join_after(bob, "bob", 5) == [
                    {"joined": "alice"},
                    {"joined": "bob"},
                    {"ready": True, "seq": 5},
                ]


async def test_a_client_that_missed_too_much_is_told_what_to_fetch(
    nursery: trio.Nursery,
    settings: Settings,
    no_rate_limit: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat, "MAX_REPLAY", 3)
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(10):
        async with client(port, "behind") as alice:
            await join(alice, "alice")
            sent = [await chat_message(alice, f"m{i}") for i in range(6)]
        async with client(port, "behind") as bob:
            frames = await join_after(bob, "bob", 1)
        # seq 2 and 3 are not replayed: the client hears so, and fetches them from history
        assert frames[0] == {"missed": {"after": 1, "before": 4}}
        assert frames[1:4] == sent[3:]
        _, _, body = await http(port, "GET", "/api/room/behind/history?before=4")
        assert json.loads(body)["messages"] == sent[:3]


@pytest.mark.parametrize("after", [-1, "3", 1.5, True, None])
async def test_a_bad_after_is_an_error_frame(
    nursery: trio.Nursery, settings: Settings, after: Any
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(5):
        async with client(port, "lobby") as ws:
            if after is None:  # "after": null is the same as no "after"
                assert await join_after(ws, "a", after) == [
                    {"joined": "a"},
                    {"ready": True, "seq": 0},
                ]
                return
            await send(ws, {"name": "a", "after": after})
            assert "after" in (await receive(ws))["error"]
            assert await join(ws, "a") == [{"joined": "a"}, {"ready": True, "seq": 0}]


# -- history endpoint and retention -------------------------------------------------------


async def history(port: int, room: str, query: str = "") -> tuple[int, dict[str, str], Any]:
    status, headers, body = await http(port, "GET", f"/api/room/{room}/history{query}")
    return status, headers, json.loads(body) if status == 200 else body.decode().strip()


async def test_history_pages(
    nursery: trio.Nursery, settings: Settings, no_rate_limit: None
) -> None:
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(10):
        async with client(port, "paged") as alice:
            await join(alice, "alice")
            sent = [await chat_message(alice, f"m{i}") for i in range(7)]
        status, headers, page = await history(port, "paged")
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert page == {"messages": sent, "more": False}
        _, _, page = await history(port, "paged", "?limit=3")
        assert page == {"messages": sent[4:], "more": True}
        _, _, page = await history(port, "paged", f"?limit=3&before={page['messages'][0]['seq']}")
        assert page == {"messages": sent[1:4], "more": True}
        _, _, page = await history(port, "paged", "?limit=3&before=2")
        assert page == {"messages": sent[:1], "more": False}
        _, _, page = await history(port, "nobody-here")
        assert page == {"messages": [], "more": False}
        for bad in ("?limit=0", "?limit=x", "?before=-3", "?before="):
            status, _, text = await history(port, "paged", bad)
            assert status == 400 and "positive whole number" in text, (bad, text)
        status, _, _ = await http(port, "POST", "/api/room/paged/history")
        assert status == 405
        status, _, _ = await http(port, "GET", "/api/room/" + "n" * 33 + "/history")
        assert status == 404


async def test_retention_by_count(
    settings: Settings, no_rate_limit: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat.ChatRoom, "retention_messages", 3)
    with trio.fail_after(10):
        async with trio.open_nursery() as server:
            port = await start_server(server, chat.app, settings)
            async with client(port, "short") as alice:
                await join(alice, "alice")
                sent = [await chat_message(alice, f"m{i}") for i in range(5)]
            _, _, page = await history(port, "short")
            assert page["messages"] == sent[2:]
            server.cancel_scope.cancel()
        # lowered while the server was down: applied when the room starts again
        monkeypatch.setattr(chat.ChatRoom, "retention_messages", 1)
        async with trio.open_nursery() as server:
            port = await start_server(server, chat.app, settings)
            _, _, page = await history(port, "short")
            assert page["messages"] == sent[4:]
            server.cancel_scope.cancel()


async def test_retention_by_age(
    nursery: trio.Nursery,
    settings: Settings,
    no_rate_limit: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat.ChatRoom, "retention_seconds", 0.3)
    port = await start_server(nursery, chat.app, settings)
    with trio.fail_after(10):
        async with client(port, "fleeting") as alice:
            await join(alice, "alice")
            await chat_message(alice, "old")
            await trio.sleep(0.5)
            new = await chat_message(alice, "new")
        _, _, page = await history(port, "fleeting")
        assert page["messages"] == [new]


@pytest.mark.parametrize(("raw", "value"), [("", 5.0), ("2.5", 2.5), ("0", 0.0)])
def test_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, value: float
) -> None:
    monkeypatch.setenv("CHAT_SECONDS_PER_MESSAGE", raw)
    assert chat._setting("CHAT_SECONDS_PER_MESSAGE", 5.0) == value


@pytest.mark.parametrize("raw", ["fast", "-1"])
def test_bad_settings_in_the_environment_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("CHAT_BURST_SECONDS", raw)
    with pytest.raises(ValueError, match="CHAT_BURST_SECONDS"):
        chat._setting("CHAT_BURST_SECONDS", 20.0)


async def test_a_member_that_vanishes_silently_leaves_the_roster(
    nursery: trio.Nursery, settings: Settings
) -> None:
    """A client that stops answering (a phone that lost its network) is found by the
    server's keepalive and announced as gone: no ghost in the roster."""
    from runtime.frames import OP_TEXT, encode_frame

    quick = settings.replace(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.3)
    port = await start_server(nursery, chat.app, quick)
    with trio.fail_after(10):
        ghost = await trio.open_tcp_stream("127.0.0.1", port)
        await ghost.send_all(
            b"GET /api/room/haunted/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await ghost.send_all(encode_frame(OP_TEXT, b'{"name": "ghost"}', mask=b"abcd"))
        async with client(port, "haunted") as alice:
            frames = await join(alice, "alice")
            assert {"joined": "ghost"} in frames
            # the ghost never reads and never answers a ping
            assert await receive(alice) == {"quit": "ghost"}
        await ghost.aclose()
