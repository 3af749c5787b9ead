"""The edge over real sockets: HTTP, the upgrade, WebSocket messages, limits."""

from __future__ import annotations

import gc
import socket
import sys
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from examples.echo.app import EchoRoom
from examples.echo.app import app as echo_app
from rooms import App, Connection, Room
from runtime.config import Settings
from runtime.frames import Close, FrameParser
from runtime.server import serve
from tests.support import guarded_app, metric, raw_request, start_server, upgrade
from tests.system.raw import RawWebSocket


async def test_broadcast_room_and_echo_over_real_websockets(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    base = f"ws://127.0.0.1:{port}"
    with trio.fail_after(10):
        async with (
            open_websocket_url(f"{base}/room/a") as a,
            open_websocket_url(f"{base}/room/a") as b,
            open_websocket_url(f"{base}/echo/a") as e,
        ):
            await a.send_message("hello")
            assert await a.get_message() == "hello"  # the sender is included
            assert await b.get_message() == "hello"
            await b.send_message(b"\x00\xffbinary")
            assert await a.get_message() == b"\x00\xffbinary"
            assert await b.get_message() == b"\x00\xffbinary"
            big = "é" * 100_000
            await e.send_message(big)
            assert await e.get_message() == big


async def test_many_clients_see_one_order(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, echo_app, settings)
    url = f"ws://127.0.0.1:{port}/room/order"
    received: dict[int, list[Any]] = {i: [] for i in range(4)}
    with trio.fail_after(20):
        async with (
            open_websocket_url(url) as w0,
            open_websocket_url(url) as w1,
            open_websocket_url(url) as w2,
            open_websocket_url(url) as w3,
        ):
            clients = [w0, w1, w2, w3]
            for i, ws in enumerate(clients):  # every connection has joined: it hears them all
                await ws.send_message(f"joined {i}")
            for ws in clients:
                for _ in clients:
                    assert str(await ws.get_message()).startswith("joined ")

            async def talk(i: int) -> None:
                for j in range(50):
                    await clients[i].send_message(f"{i}:{j}")

            async def listen(i: int) -> None:
                while len(received[i]) < 200:
                    received[i].append(await clients[i].get_message())

            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(talk, i)
                    n.start_soon(listen, i)
    assert all(received[i] == received[0] for i in range(4))
    for i in range(4):  # per-sender FIFO
        mine = [m for m in received[0] if m.startswith(f"{i}:")]
        assert mine == [f"{i}:{j}" for j in range(50)]


async def test_http_errors(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, echo_app, settings)
    assert (await raw_request(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 1)).startswith(
        b"HTTP/1.1 404"
    )
    plain = await raw_request(port, b"GET /room/a HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert plain.startswith(b"HTTP/1.1 426")
    bad_key = await raw_request(port, upgrade("/room/a", key="short"), closes=True)
    assert bad_key.startswith(b"HTTP/1.1 400") and b"Sec-WebSocket-Key" in bad_key
    bad_version = await raw_request(port, upgrade("/room/a", version="8"), closes=True)
    assert bad_version.startswith(b"HTTP/1.1 426")
    assert b"sec-websocket-version: 13" in bad_version.lower()
    garbage = await raw_request(port, b"\x16\x03\x01 not http at all\r\n\r\n", closes=True)
    assert garbage.startswith(b"HTTP/1.1 400")
    both = await raw_request(
        port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    assert both.startswith(b"HTTP/1.1 400")
    bad_name = await raw_request(port, upgrade("/room/" + "n" * 100))
    assert bad_name.startswith(b"HTTP/1.1 400")


async def test_keep_alive_serves_several_requests(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await raw_request(port, two, 1)
    assert answer.count(b"HTTP/1.1 404") == 2


async def test_limits_on_the_request_head(nursery: trio.Nursery, tmp_path: Any) -> None:
    settings = Settings(
        port=0, data_dir=str(tmp_path), handshake_timeout=0.5, max_header_bytes=1024
    )
    port = await start_server(nursery, echo_app, settings)
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    assert (await raw_request(port, huge)).startswith(b"HTTP/1.1 431")
    # slowloris: an unfinished head is cut off after handshake_timeout
    with trio.fail_after(5):
        partial = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n", read_timeout=4)
    assert partial.startswith(b"HTTP/1.1 408")


async def test_oversized_message_closes_with_1009(nursery: trio.Nursery, tmp_path: Any) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), max_message_bytes=1000)
    port = await start_server(nursery, echo_app, settings)
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/x") as ws:
            await ws.send_message("x" * 1000)
            assert await ws.get_message() == "x" * 1000
            await ws.send_message("x" * 1001)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1009


async def test_a_client_that_stops_reading_is_closed_not_buffered(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), max_outbox_bytes=64 * 1024)
    port = await start_server(nursery, echo_app, settings)
    raw = trio.socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    await raw.connect(("127.0.0.1", port))
    sleeper = trio.SocketStream(raw)
    async with sleeper:
        await sleeper.send_all(upgrade("/room/slow"))
        assert (await sleeper.receive_some(4096)).startswith(b"HTTP/1.1 101")
        with trio.fail_after(20):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/room/slow") as talker:
                chunk = "z" * 16384
                # the talker reads its own copies; the sleeper never reads
                for _ in range(1000):
                    await talker.send_message(chunk)
                    assert await talker.get_message() == chunk
        metrics = await raw_request(port, b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 1)
        assert b"rooms_limit_outbox_overflow_total 1" in metrics
        # The sleeper reads at last: what was kept of its backlog, then the Close that says why.
        parser, last = FrameParser(max_message_size=1 << 30, client=True), None
        with trio.fail_after(20):
            while data := await sleeper.receive_some(1 << 20):
                last = ([last, *parser.feed(data)])[-1]
        assert last == Close(1008, "outbox overflow: the client is not reading fast enough")


async def test_unknown_routes_and_rejected_upgrades_with_a_client(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/nope/x"):
            pass
    assert rejected.value.status_code == 404


async def test_room_connection_cap(nursery: trio.Nursery, tmp_path: Any) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), max_connections_per_room=2)
    port = await start_server(nursery, echo_app, settings)
    base = f"ws://127.0.0.1:{port}"
    with trio.fail_after(10):
        async with open_websocket_url(f"{base}/room/a"), open_websocket_url(f"{base}/room/a"):
            with pytest.raises(ConnectionRejected) as full:
                async with open_websocket_url(f"{base}/room/a"):
                    pass
            assert full.value.status_code == 503
            assert full.value.body is not None and b"room is full" in full.value.body
            async with open_websocket_url(f"{base}/room/b"):
                pass  # other rooms are not affected
        metrics = await raw_request(port, b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert b"rooms_limit_room_connections_total 1" in metrics


async def test_total_connection_cap(nursery: trio.Nursery, tmp_path: Any) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), max_connections=2)
    port = await start_server(nursery, echo_app, settings)
    base = f"ws://127.0.0.1:{port}"
    with trio.fail_after(10):
        async with open_websocket_url(f"{base}/room/a"), open_websocket_url(f"{base}/room/b"):
            answer = await raw_request(port, upgrade("/room/c"), read_timeout=1)
            assert answer.startswith(b"HTTP/1.1 503")
            assert b"connection limit" in answer
        # the two clients' sockets close: a new connection is served again
        get = b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        while not (metrics := await raw_request(port, get, 1)).startswith(b"HTTP/1.1 200"):  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert b"rooms_limit_connections_total 1" in metrics


def client_ip_app() -> Any:
    from rooms import App, Request, Response

    app = App()

    @app.route("/ip")
    async def ip(request: Request) -> Response:
        return Response.text(request.client[0])

    return app


@pytest.mark.parametrize(
    ("trusted", "forwarded", "seen"),
    [
        ((), "203.0.113.7", "127.0.0.1"),  # no trusted proxy: the header is ignored
        (("127.0.0.1",), "203.0.113.7", "203.0.113.7"),
        (("127.0.0.0/8",), "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # rightmost hop
        (("127.0.0.1", "10.0.0.0/8"), "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # skip proxies
        (("127.0.0.1",), "not-an-address", "127.0.0.1"),
        (("10.0.0.0/8",), "203.0.113.7", "127.0.0.1"),  # the peer is not a trusted proxy
    ],
)
async def test_x_forwarded_for_only_from_trusted_proxies(
    nursery: trio.Nursery,
    settings: Settings,
    trusted: tuple[str, ...],
    forwarded: str,
    seen: str,
) -> None:
    port = await start_server(nursery, client_ip_app(), settings.replace(trusted_proxies=trusted))
    response = await raw_request(
        port,
        f"GET /ip HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {forwarded}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert response.endswith(seen.encode())


# -- auto reply and the browser client -----------------------------------------------------


async def test_auto_reply_answers_without_reaching_the_room(
    nursery: trio.Nursery, settings: Settings
) -> None:
    from rooms import App, Room

    class Counting(Room):
        auto_reply = ("ping", "pong")

        async def on_start(self) -> None:
            self.seen: list[str | bytes] = []

        async def on_message(self, conn: Connection, message: str | bytes) -> None:
            if message == "seen?":
                conn.send(repr(self.seen))
            else:
                self.seen.append(message)

    app = App()
    app.room("/c/{name}", Counting)
    port = await start_server(nursery, app, settings)
    with trio.fail_after(5):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/c/x") as ws:
            for message in ("ping", "pingx", b"ping", "ping"):
                await ws.send_message(message)
            assert await ws.get_message() == "pong"
            assert await ws.get_message() == "pong"
            await ws.send_message("seen?")
            # only the exact text reaches the edge's reply; everything else the room
            assert await ws.get_message() == "['pingx', b'ping']"


async def test_the_browser_client_is_served_with_an_etag(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    get = b"GET /_rooms/client.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    response = await raw_request(port, get + b"\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/javascript; charset=utf-8" in head
    assert b"class RoomSocket" in body
    etag = next(line for line in head.split(b"\r\n") if line.startswith(b"etag: "))[6:]
    again = await raw_request(port, get + b"If-None-Match: " + etag + b"\r\n\r\n")
    assert again.startswith(b"HTTP/1.1 304 ")
    post = get.replace(b"GET", b"POST") + b"Content-Length: 0\r\n\r\n"
    assert (await raw_request(port, post)).startswith(b"HTTP/1.1 405 ")


# -- keepalive --------------------------------------------------------------------------


async def test_a_client_that_never_answers_pings_is_closed_1011(
    nursery: trio.Nursery, settings: Settings
) -> None:
    from runtime.frames import Close, FrameParser, Ping

    quick = settings.replace(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.5)
    port = await start_server(nursery, echo_app, quick)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(upgrade("/echo/quiet"))
        parser = FrameParser(client=True)
        events: list[object] = []
        with trio.fail_after(5):
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            while not events or not isinstance(events[-1], Close):
                events += parser.feed(await stream.receive_some(4096))
        # a raw socket does not answer pings: first a ping, then the close
        assert isinstance(events[0], Ping)
        assert events[-1] == Close(1011, "keepalive timeout")


async def test_a_client_that_answers_pings_stays_connected(
    nursery: trio.Nursery, settings: Settings
) -> None:
    quick = settings.replace(ping_interval=0.1, ping_timeout=0.3)
    port = await start_server(nursery, echo_app, quick)
    with trio.fail_after(5):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/chatty") as ws:
            await trio.sleep(1.5)  # many ping intervals; trio-websocket answers each ping
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"


# -- upgrade-time rules ---------------------------------------------------------------------


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


async def test_origins_and_the_before_connect_hook(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, guarded_app(), settings)
    ok = "Origin: https://ok.example\r\n"
    cases = [
        ("/guarded/a?token=secret", ok, "HTTP/1.1 101 Switching Protocols"),
        ("/guarded/a?token=secret", "", "HTTP/1.1 101 Switching Protocols"),  # not a browser
        ("/guarded/a?token=secret", "Origin: https://evil.example\r\n", "HTTP/1.1 403 Forbidden"),
        ("/guarded/a", ok, "HTTP/1.1 401 Unauthorized"),
        ("/guarded/a?token=boom", ok, "HTTP/1.1 500 Internal Server Error"),
    ]
    for path, origin, expected in cases:
        response = await raw_request(port, upgrade(path, extra=origin), read_timeout=1)
        assert status_line(response) == expected, (path, origin, response)
    refused = await raw_request(port, upgrade("/guarded/a", extra=ok), read_timeout=1)
    assert refused.endswith(b"a valid ?token= is required")
    with trio.fail_after(5):
        url = f"ws://127.0.0.1:{port}/guarded/a?token=secret"
        async with open_websocket_url(url) as ws:
            assert await ws.get_message() == "{'user': 'ada'}"  # the room sees the identity


async def test_connections_per_address(nursery: trio.Nursery, settings: Settings) -> None:
    port = await start_server(nursery, guarded_app(), settings.replace(max_connections_per_ip=2))
    url = f"ws://127.0.0.1:{port}/open/a"
    with trio.fail_after(5):
        async with open_websocket_url(url) as first, open_websocket_url(url):
            third = await raw_request(port, upgrade("/open/a"), read_timeout=1)
            assert status_line(third) == "HTTP/1.1 429 Too Many Requests"
            assert b"retry-after: 5" in third and b"at most 2 connections per address" in third
            await first.aclose()
            while await metric(port, "websockets_open") > 1:  # noqa: ASYNC110 - polling
                await trio.sleep(0.01)  # until the server has seen the close
            async with open_websocket_url(url) as again:  # a place was freed
                assert await again.get_message() == "welcome"


async def test_upgrade_rate_per_address(nursery: trio.Nursery, settings: Settings) -> None:
    limited = settings.replace(upgrades_per_second_per_ip=0.5, upgrade_burst_per_ip=2)
    port = await start_server(nursery, guarded_app(), limited)
    answers = [await raw_request(port, upgrade("/open/a"), read_timeout=0.2) for _ in range(3)]
    assert [status_line(a) for a in answers] == [
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 429 Too Many Requests",
    ]
    assert b"retry-after: 1\r\n" in answers[2] or b"retry-after: 2\r\n" in answers[2]
    await trio.sleep(2.1)  # a token came back (one every 2 s)
    assert status_line(await raw_request(port, upgrade("/open/a"), read_timeout=0.2)).endswith(
        "101 Switching Protocols"
    )


# -- accounting -----------------------------------------------------------------------------


async def test_each_closed_websocket_is_accounted_for(
    nursery: trio.Nursery, settings: Settings, tmp_path: Any
) -> None:
    import json

    log = tmp_path / "usage.jsonl"
    config = settings.replace(usage_log=str(log), max_message_bytes=1000, close_timeout=0.5)
    port = await start_server(nursery, echo_app, config)
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/room/acct"):  # stays open
            async with open_websocket_url(f"ws://127.0.0.1:{port}/room/acct") as ws:
                for text in ("hello", "world"):
                    await ws.send_message(text)
                    assert await ws.get_message() == text
                await ws.aclose(1000, "bye")
            big = await trio.open_tcp_stream("127.0.0.1", port)  # closed by the server: 1009
            await big.send_all(upgrade("/echo/big"))
            await big.receive_some(4096)
            await big.send_all(bytes([0x82, 0xFE, 0x07, 0xD0]) + b"mask" + b"x" * 2000)
            answer = b""
            while chunk := await big.receive_some(4096):  # until the server closes
                answer += chunk
            closing = FrameParser(client=True).feed(answer)
            assert closing == [Close(1009, "message exceeds 1000 bytes")]
            await big.aclose()
            while len(log.read_text().splitlines()) < 2:  # noqa: ASYNC110 - a file
                await trio.sleep(0.01)
            usage = await raw_request(
                port, b"GET /_rooms/usage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            records = log.read_text().splitlines()  # before `stays` closes and adds its own
    by_room = {r["route"]: r for r in map(json.loads, records)}
    client_closed, server_closed = by_room["/room/{name}"], by_room["/echo/{name}"]
    assert client_closed["closed_by"] == "client"
    assert (client_closed["close_code"], client_closed["close_reason"]) == (1000, "bye")
    assert client_closed["messages_in"] == 2 and client_closed["messages_out"] == 2
    assert client_closed["bytes_in"] > 10 and client_closed["bytes_out"] > 10
    assert client_closed["start"].endswith("Z") and client_closed["duration_s"] >= 0
    assert "BroadcastRoom" in client_closed["room"] and client_closed["client_ip"] == "127.0.0.1"
    assert (server_closed["closed_by"], server_closed["close_code"]) == ("server", 1009)
    report = json.loads(usage.partition(b"\r\n\r\n")[2])
    assert report["total"]["websockets"] == 3
    assert (report["total"]["open"], report["total"]["closed"]) == (1, 2)
    assert report["routes"]["/room/{name}"]["messages_in"] == 2


async def test_a_bug_in_one_connection_does_not_take_the_server_down(
    nursery: trio.Nursery, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime.edge

    real = runtime.edge.Edge.upgrade

    async def buggy(edge: Any, request: Any, *args: Any) -> Any:
        if request.path == "/echo/bug":
            raise RuntimeError("a bug in the edge")
        return await real(edge, request, *args)

    monkeypatch.setattr(runtime.edge.Edge, "upgrade", buggy)
    port = await start_server(nursery, echo_app, settings)
    assert await raw_request(port, upgrade("/echo/bug"), read_timeout=1) == b""  # just closed
    with trio.fail_after(5):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/fine") as ws:
            await ws.send_message("still serving")
            assert await ws.get_message() == "still serving"


async def test_idle_timeout_closes_a_silent_client_1001(
    nursery: trio.Nursery, settings: Settings
) -> None:
    quick = settings.replace(idle_timeout=0.4, ping_interval=0.1, ping_timeout=5.0)
    port = await start_server(nursery, echo_app, quick)
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/talks") as talker:
            for _ in range(10):  # a message every 0.15 s: never idle for 0.4 s
                await talker.send_message("still here")
                assert await talker.get_message() == "still here"
                await trio.sleep(0.15)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/quiet") as quiet:
                # answering pings (trio-websocket does) is not activity
                with pytest.raises(ConnectionClosed) as closed:
                    await quiet.get_message()
                assert closed.value.reason is not None
                assert (closed.value.reason.code, closed.value.reason.reason) == (
                    1001,
                    "idle timeout",
                )


class Greeted(Room):
    """Clients must speak within 0.3 s (the class's own bound)."""

    first_message_timeout = 0.3

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(message)


class Watched(Greeted):
    """Silent watchers welcome, whatever the server's setting."""

    first_message_timeout = 0.0


def greeted_app() -> App:
    app = App()
    app.room("/greeted/{name}", Greeted)
    app.room("/watched/{name}", Watched)
    app.room("/echo/{name}", EchoRoom)
    return app


async def test_a_connection_silent_from_the_start_is_closed_1008(
    nursery: trio.Nursery, settings: Settings
) -> None:
    """The first message is due within first_message_timeout: the room class's own (0.3 s)
    or, if it has none, the server's (0.6 s here); a class may opt out (0). After the first
    message the bound is gone: idle_timeout (off) is what applies."""
    quick = settings.replace(first_message_timeout=0.6, ping_interval=0.0)
    port = await start_server(nursery, greeted_app(), quick)
    url = f"ws://127.0.0.1:{port}"

    async def closed_after(path: str) -> tuple[float, int | None, str | None]:
        started = trio.current_time()
        async with open_websocket_url(url + path) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        reason = closed.value.reason
        assert reason is not None
        return trio.current_time() - started, reason.code, reason.reason

    with trio.fail_after(10):
        elapsed, code, reason = await closed_after("/greeted/a")
        assert (code, reason) == (1008, "no message within 0.3 s of connecting")
        assert 0.3 <= elapsed < 0.6
        elapsed, code, reason = await closed_after("/echo/a")
        assert (code, reason) == (1008, "no message within 0.6 s of connecting")
        assert 0.6 <= elapsed < 1.2
        async with (
            open_websocket_url(url + "/watched/a") as watcher,
            open_websocket_url(url + "/greeted/b") as talker,
        ):
            await talker.send_message("hello")
            assert await talker.get_message() == "hello"
            await trio.sleep(1.0)  # past every bound: both still open
            await watcher.send_message("still here")
            assert await watcher.get_message() == "still here"
            await talker.send_message("me too")
            assert await talker.get_message() == "me too"
    assert await metric(port, "limit_first_message_total") == 2


async def test_a_closed_connection_leaves_no_object_behind(
    nursery: trio.Nursery, settings: Settings
) -> None:
    """Rounds of 5,000 WebSockets in 20 rooms, each closed by the server (1008, silent past
    its first_message_timeout): the interpreter's live allocations after each round stay
    where the first round left them. (RSS is no measure of this: CPython keeps an arena that
    still holds one live block, so a process's RSS stays near its peak.) A leak of one object
    per connection would add 5,000 blocks a round."""
    port = await start_server(nursery, greeted_app(), settings.replace(ping_interval=0.0))
    blocks = []
    handshakes = trio.CapacityLimiter(100)
    for _ in range(4):

        async def silent(i: int) -> None:
            async with handshakes:
                ws = await RawWebSocket.connect(port, f"/greeted/room-{i % 20}")
            assert (await ws.close_received(10))[0] == 1008
            await ws.aclose()

        async with trio.open_nursery() as clients:
            for i in range(5000):
                clients.start_soon(silent, i)
        await trio.sleep(0.5)  # (the server's side of the last closes)
        gc.collect()
        blocks.append(sys.getallocatedblocks())
    assert blocks[3] - blocks[1] < 5000, blocks


@pytest.mark.parametrize("action", ["drop", "close"])
async def test_message_rate_per_connection(
    nursery: trio.Nursery, settings: Settings, action: str
) -> None:
    limited = settings.replace(
        messages_per_second_per_connection=1.0,
        message_burst_per_connection=3,
        message_rate_action=action,
        close_timeout=0.5,
    )
    port = await start_server(nursery, echo_app, limited)
    with trio.fail_after(5):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/rate") as ws:
            for i in range(5):  # a burst of 3 is allowed, then about one per second
                await ws.send_message(f"m{i}")
            if action == "drop":
                got = [await ws.get_message() for _ in range(5)]
                error = '{"error": "too many messages: this one was dropped"}'
                # the errors are sent at once, the room's echoes in their own order
                assert [m for m in got if m != error] == ["m0", "m1", "m2"]
                assert got.count(error) == 2
                await trio.sleep(1.1)  # a token came back: the connection carries on
                await ws.send_message("later")
                assert await ws.get_message() == "later"
            else:  # the room answers what came within the limit, then the Close
                assert [await ws.get_message() for _ in range(3)] == ["m0", "m1", "m2"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1008


async def test_an_idle_keep_alive_connection_is_closed_at_keepalive_timeout(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings.replace(keepalive_timeout=0.5))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\nnot found\n" not in answer:
            answer += await stream.receive_some(4096)
        start = trio.current_time()  # answered, kept alive: now idle
        with trio.fail_after(5):
            assert await stream.receive_some(4096) == b""
    assert 0.4 <= trio.current_time() - start < 4


async def test_a_drain_ends_at_drain_timeout_when_a_client_never_answers(
    settings: Settings,
) -> None:
    config = settings.replace(drain_timeout=1.0, close_timeout=60.0)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, shutdown=shutdown), echo_app, config)
        mute = await trio.open_tcp_stream("127.0.0.1", port)  # upgrades, then never reads
        await mute.send_all(upgrade("/room/mute"))
        assert (await mute.receive_some(4096)).startswith(b"HTTP/1.1 101")
        start = trio.current_time()
        shutdown.set()  # the Close (1012) goes out; no answer ever comes
    assert 0.9 <= trio.current_time() - start < 5  # drain_timeout, not close_timeout
    await mute.aclose()
