"""Proxied WebSocket routes (``App.proxy``) against an upstream that is not ours: a
``websockets`` server in a thread, with real clients in front of a real Rooms server."""

from __future__ import annotations

import functools
import json
import queue
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from typing import Any

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url
from websockets.http11 import Request as UpstreamRequest
from websockets.http11 import Response as UpstreamResponse
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as serve_upstream

from rooms import App, HTTPError, Request
from runtime.config import Settings
from runtime.frames import OP_CONTINUATION, OP_TEXT, accept_key, encode_frame
from runtime.server import serve
from tests.support import free_port, raw_request, start_server, upgrade


class Upstream:
    """A websockets server: echoes, reports what it saw, closes or refuses on request."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.closes: queue.Queue[tuple[int | None, str | None]] = queue.Queue()
        self.accepted = 0  # WebSocket handshakes the upstream completed
        self.server: Server = serve_upstream(
            self.handle,
            "127.0.0.1",
            0,
            select_subprotocol=self.choose,
            process_request=self.refuse,
            compression=None,
            ssl=context,
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def choose(conn: ServerConnection, offered: Sequence[str]) -> Any:
        return next((p for p in ("chat.v2", "chat.v1") if p in offered), None)

    def refuse(self, conn: ServerConnection, request: UpstreamRequest) -> UpstreamResponse | None:
        if request.path.startswith("/refuse"):
            return conn.respond(HTTPStatus.FORBIDDEN, "the upstream says no\n")
        return None

    def handle(self, conn: ServerConnection) -> None:
        self.accepted += 1
        path = conn.request.path if conn.request else ""
        try:
            if path.startswith("/headers"):
                headers = {k.lower(): v for k, v in conn.request.headers.raw_items()}  # type: ignore[union-attr]
                conn.send(json.dumps({"path": path, "headers": headers}))
            if path.startswith("/fragments"):
                conn.send(["frag", "mented"])  # one text message in two frames
            if path.startswith("/close"):
                conn.recv()
                conn.close(4002, "upstream done")
            for message in conn:
                conn.send(message)
        finally:
            self.closes.put((conn.close_code, conn.close_reason))

    async def close_seen(self) -> tuple[int | None, str | None]:
        """The code and reason of the next Close the upstream saw (the event loop runs on:
        the proxy in front of it is in this process)."""
        return await trio.to_thread.run_sync(functools.partial(self.closes.get, timeout=10))

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


def close_of(closed: ConnectionClosed) -> tuple[int, str | None]:
    assert closed.reason is not None
    return closed.reason.code, closed.reason.reason


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


def identify(request: Request) -> Any:
    async def hook(request: Request) -> str:
        if request.header("authorization") != "Bearer good":
            raise HTTPError(401, "who are you?")
        return "alice"

    return hook(request)


def proxy_app(port: int) -> App:
    app = App()
    app.proxy("/up/{path}", f"ws://127.0.0.1:{port}/{{path}}")
    app.proxy(
        "/auth/{path}",
        f"ws://127.0.0.1:{port}/{{path}}",
        on_before_connect=identify,
        allowed_origins=["https://good.example"],
    )
    return app


async def test_messages_are_relayed_both_ways(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/echo") as ws:
            await ws.send_message("text stays text")
            assert await ws.get_message() == "text stays text"
            await ws.send_message(b"\x00\xffbinary stays binary")
            assert await ws.get_message() == b"\x00\xffbinary stays binary"
            big = bytes(range(256)) * 3000
            await ws.send_message(big)
            assert await ws.get_message() == big
            for i in range(100):
                await ws.send_message(f"m{i}")
            assert [await ws.get_message() for _ in range(100)] == [f"m{i}" for i in range(100)]
        assert await upstream.close_seen() == (1000, "")  # the client's Close went upstream


async def test_fragmented_messages_arrive_whole(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/fragments") as ws:
            assert await ws.get_message() == "fragmented"  # sent upstream in two frames
        # And from the client, in three frames.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade("/up/echo"))
            await stream.send_all(
                encode_frame(OP_TEXT, b"one ", fin=False, mask=b"abcd")
                + encode_frame(OP_CONTINUATION, b"two ", fin=False, mask=b"efgh")
                + encode_frame(OP_CONTINUATION, b"three", mask=b"ijkl")
            )
            received = b""
            while b"one two three" not in received:
                received += await stream.receive_some()
            assert b"\x81\x0done two three" in received  # one unmasked text frame


async def test_close_codes_and_reasons_travel_both_ways(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/echo") as ws:
            await ws.aclose(4001, "client bye")
        assert await upstream.close_seen() == (4001, "client bye")

        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/close") as ws:
            await ws.send_message("close now, please")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert close_of(closed.value) == (4002, "upstream done")


async def test_subprotocol_and_chosen_headers_are_forwarded(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    headers = [
        (b"Authorization", b"Bearer good"),
        (b"Cookie", b"session=1"),
        (b"X-Private", b"not for the upstream"),
        (b"X-Rooms-Identity", b"forged"),
        (b"Origin", b"https://good.example"),
    ]
    with trio.fail_after(20):
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}/auth/headers?room=7",
            subprotocols=["chat.v1", "chat.v2"],
            extra_headers=headers,
        ) as ws:
            assert ws.subprotocol == "chat.v2"  # the upstream's choice came back
            seen = json.loads(await ws.get_message())
    assert seen["path"] == "/headers?room=7"
    forwarded = seen["headers"]
    assert forwarded["authorization"] == "Bearer good"
    assert forwarded["cookie"] == "session=1"
    assert forwarded["origin"] == "https://good.example"
    assert "x-private" not in forwarded
    assert forwarded["x-rooms-identity"] == "alice"  # from on_before_connect, not the client
    assert forwarded["x-forwarded-for"] == "127.0.0.1"
    assert forwarded["x-forwarded-proto"] == "http"
    assert forwarded["sec-websocket-protocol"] == "chat.v1, chat.v2"


async def test_the_upgrade_rules_apply_to_proxied_routes(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    url = f"ws://127.0.0.1:{port}/auth/echo"
    with trio.fail_after(20):
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(
                url, extra_headers=[(b"Origin", b"https://good.example")]
            ):
                pass
        assert refused.value.status_code == 401
        assert refused.value.body == b"who are you?"
        with pytest.raises(ConnectionRejected) as refused:
            headers = [(b"Authorization", b"Bearer good"), (b"Origin", b"https://evil.example")]
            async with open_websocket_url(url, extra_headers=headers):
                pass
        assert refused.value.status_code == 403
    async with open_websocket_url(  # an allowed client: the upstream counts it
        url, extra_headers=[(b"Authorization", b"Bearer good")]
    ) as ws:
        await ws.send_message("hi")
        assert await ws.get_message() == "hi"
    assert upstream.accepted == 1  # the two refused clients never reached it


async def test_an_upstream_refusal_passes_its_status_and_body_on(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    with trio.fail_after(20):
        answer = await raw_request(port, upgrade("/up/refuse"), read_timeout=5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"x-upstream-status: 403" in head
    assert body == b"the upstream says no\n"


async def test_an_unreachable_upstream_is_502_and_a_silent_one_504(
    nursery: trio.Nursery, settings: Settings
) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        app = App()
        app.proxy("/gone/{x}", f"ws://127.0.0.1:{free_port()}/{{x}}")
        app.proxy("/silent/{x}", f"ws://127.0.0.1:{silent.getsockname()[1]}/{{x}}")
        port = await start_server(nursery, app, settings.replace(upstream_timeout=0.5))
        with trio.fail_after(20):
            gone = await raw_request(port, upgrade("/gone/a"))
            assert gone.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
            assert b"upstream ws://127.0.0.1:" in gone
            slow = await raw_request(port, upgrade("/silent/a"))
            assert slow.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
            assert b"no answer within upstream_timeout (0.5 s)" in slow
            plain = await raw_request(port, b"GET /gone/a HTTP/1.1\r\nHost: x\r\n\r\n", 1)
            assert plain.startswith(b"HTTP/1.1 426 ")
            metrics = await raw_request(port, b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 1)
            assert b"rooms_upstream_failures_total 2" in metrics


async def test_an_upstream_that_vanishes_closes_the_client_with_1011(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    port = await start_server(nursery, proxy_app(upstream.port), settings)
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/echo") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            upstream.server.socket.close()
            for conn in list(upstream.server.connections):
                conn.socket.shutdown(socket.SHUT_RDWR)  # gone, without a Close frame
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert close_of(closed.value) == (1011, "the upstream connection was lost")


async def test_proxied_connections_are_accounted(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream, tmp_path: Any
) -> None:
    log = tmp_path / "usage.jsonl"
    port = await start_server(
        nursery, proxy_app(upstream.port), settings.replace(usage_log=str(log))
    )
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/echo") as ws:
            await ws.send_message("x" * 100)
            assert await ws.get_message() == "x" * 100
        while not log.read_text():  # noqa: ASYNC110 - written once the server closed its side
            await trio.sleep(0.01)
        record = json.loads(log.read_text().splitlines()[0])
        assert record["route"] == "/up/{path}"
        assert record["room"] is None
        assert record["upstream"] == f"ws://127.0.0.1:{upstream.port}/echo"
        assert (record["messages_in"], record["messages_out"]) == (1, 1)
        assert record["bytes_out"] >= 102 and record["closed_by"] == "client"
        usage = await raw_request(port, b"GET /_rooms/usage HTTP/1.1\r\nHost: x\r\n\r\n", 1)
        totals = json.loads(usage.partition(b"\r\n\r\n")[2])
        assert totals["routes"]["/up/{path}"]["websockets"] == 1
        assert totals["rooms"] == {}


async def test_a_draining_server_closes_proxied_clients_with_1012(
    nursery: trio.Nursery, settings: Settings, upstream: Upstream
) -> None:
    shutdown = trio.Event()
    app = proxy_app(upstream.port)
    port = await nursery.start(functools.partial(serve, app, settings, shutdown=shutdown))
    with trio.fail_after(20):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/echo") as ws:
            shutdown.set()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert close_of(closed.value)[0] == 1012
        assert (await upstream.close_seen())[0] == 1012  # the client's answer went upstream


async def test_a_wss_upstream_is_verified(nursery: trio.Nursery, settings: Settings) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    secure = Upstream(server_context)
    try:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        app = App()
        url = f"wss://127.0.0.1:{secure.port}/{{path}}"
        app.proxy("/trusted/{path}", url, ssl_context=trusting)
        app.proxy("/untrusted/{path}", url)  # the system CAs do not know the test CA
        port = await start_server(nursery, app, settings)
        with trio.fail_after(20):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/trusted/echo") as ws:
                await ws.send_message("through TLS upstream")
                assert await ws.get_message() == "through TLS upstream"
            refused = await raw_request(port, upgrade("/untrusted/echo"))
            assert refused.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
            assert b"CERTIFICATE_VERIFY_FAILED" in refused
    finally:
        secure.stop()


async def raw_upstream(nursery: trio.Nursery, answer: bytes, then: bytes = b"") -> int:
    """An upstream that answers any request with ``answer`` (``{accept}`` is replaced by the
    right Sec-WebSocket-Accept), then sends ``then`` and waits."""

    async def serve_one(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        key = next(
            line.split(b":", 1)[1].strip().decode()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        await stream.send_all(answer.replace(b"{accept}", accept_key(key).encode()) + then)
        await trio.sleep_forever()

    serve = functools.partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\n\r\n"
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"answered 200 to a WebSocket"),
        (SWITCH.replace(b"{accept}", b"wrong"), b"wrong Sec-WebSocket-Accept"),
        (
            SWITCH.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: nobody.asked\r\n\r\n"),
            b"chose subprotocol 'nobody.asked'",
        ),
        (b"not http at all\r\n\r\n", b"502 Bad Gateway"),
    ],
    ids=["not-websocket", "bad-accept", "unoffered-subprotocol", "garbage"],
)
async def test_an_upstream_with_a_bad_handshake_is_502(
    nursery: trio.Nursery, settings: Settings, answer: bytes, expected: bytes
) -> None:
    upstream_port = await raw_upstream(nursery, answer)
    port = await start_server(nursery, proxy_app(upstream_port), settings)
    with trio.fail_after(10):
        refused = await raw_request(port, upgrade("/up/x"))
    assert refused.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), refused
    assert expected in refused


async def test_an_upstream_that_breaks_the_protocol_closes_the_client_with_1011(
    nursery: trio.Nursery, settings: Settings
) -> None:
    masked = encode_frame(OP_TEXT, b"servers must not mask", mask=b"abcd")
    upstream_port = await raw_upstream(nursery, SWITCH, then=masked)
    port = await start_server(nursery, proxy_app(upstream_port), settings)
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/up/x") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    code, reason = close_of(closed.value)
    assert code == 1011
    assert reason is not None and reason.startswith("the upstream broke the protocol")
