"""Hostile input against a real ``rooms serve`` process, over raw sockets.

Each case checks the answer a client gets (an HTTP status, a Close code), that the server
still serves everyone else, and, after every test, that its open file descriptors are back to
their baseline: nothing an abusive client did is left behind. Memory is checked where abuse
could make it grow (floods, mass connects): a second round must not grow it further.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from runtime.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    encode_frame,
)
from tests.support import metric, raw_request, server, wait_for_port_sync
from tests.system.raw import (
    MASK,
    RawWebSocket,
    Server,
    fds_back_to,
    frame,
    get,
    open_websockets,
    status,
    upgrade,
)

APP = """
from pathlib import Path

from rooms import App, Request, Response
from examples.echo.app import BroadcastRoom, EchoRoom

app = App()
app.room("/room/{name}", BroadcastRoom)
app.room("/echo/{name}", EchoRoom)


@app.route("/hello")
async def hello(request: Request) -> Response:
    return Response.text("hello")


@app.route("/upload", methods=("POST",))
async def upload(request: Request) -> Response:
    return Response.text(f"received {len(request.body)} bytes")


app.static("/files", Path(__file__).parent / "public")
"""

CONFIG = """
handshake_timeout = 1.0
body_timeout = 1.0
close_timeout = 1.0
keepalive_timeout = 2.0
max_message_bytes = 65536
max_outbox_bytes = 262144
"""


HELLO = get("/hello")
SECRET = "TOP SECRET: outside the static folder"


@contextmanager
def hostile(folder: Path, config: str) -> Iterator[Server]:
    """The hostile app served as a process from ``folder`` with the settings ``config``."""
    (folder / "hostileapp.py").write_text(APP)
    (folder / "public").mkdir()
    (folder / "public" / "index.html").write_text("public page")
    (folder / "secret.txt").write_text(SECRET)
    (folder / "rooms.toml").write_text(config)
    options = ("--config", str(folder / "rooms.toml"))
    with server("hostileapp:app", folder, folder / "data", *options) as (proc, port):
        wait_for_port_sync(port, proc)
        yield Server(proc.pid, port, folder)
        assert proc.poll() is None, "the server died"


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short timeouts, so that what they cut is cut within a test."""
    with hostile(tmp_path_factory.mktemp("hostile"), CONFIG) as srv:
        yield srv


@pytest.fixture
async def srv(hostile_server: Server) -> AsyncIterator[Server]:
    """The shared server; after the test its descriptors must return to the baseline."""
    await raw_request(hostile_server.port, HELLO)  # warm up
    baseline = hostile_server.fds()
    yield hostile_server
    await fds_back_to(hostile_server, baseline)


# --------------------------------------------------------------------------------------------
# raw clients


# --------------------------------------------------------------------------------------------
# hostile HTTP

BAD_HEADS = {
    "not HTTP at all": (b"GARBAGE\r\n\r\n", 400),
    "request line without target": (b"GET\r\n\r\n", 400),
    "HTTP/1.1 without Host": (b"GET /hello HTTP/1.1\r\n\r\n", 400),
    "TLS ClientHello on the plain port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "header line without a colon": (b"GET /hello HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n", 400),
    "NUL in a header value": (b"GET /hello HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n", 400),
    "Content-Length with Transfer-Encoding": (
        b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "negative Content-Length": (
        b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        400,
    ),
    "two different Content-Lengths": (
        b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        400,
    ),
    "one huge header": (HELLO[:-2] + b"x-big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    "thousands of headers": (HELLO[:-2] + b"x: y\r\n" * 5000 + b"\r\n", 431),
    "huge request target": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 431),
    "body over max_body_bytes": (
        b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
async def test_malformed_requests_get_a_clear_status(srv: Server, case: str) -> None:
    data, expected = BAD_HEADS[case]
    response = await raw_request(srv.port, data, closes=True)
    assert status(response) == expected, response[:300]
    assert b"connection: close" in response.lower()


async def test_pipelined_garbage_after_a_good_request(srv: Server) -> None:
    good = b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n"
    response = await raw_request(
        srv.port, good + good + b"\x00\xff\xfe garbage \r\n\r\n", closes=True
    )
    assert response.count(b"HTTP/1.1 200 ") == 2
    assert response.count(b"HTTP/1.1 400 ") == 1
    assert response.index(b"HTTP/1.1 400 ") > response.rindex(b"HTTP/1.1 200 ")


async def test_slowloris_is_cut_off_and_others_are_served(srv: Server) -> None:
    """50 clients trickle a request head a byte at a time: each gets 408 once the
    handshake_timeout (1 s here) is over, and a normal request is served meanwhile."""
    head = b"GET /hello HTTP/1.1\r\nhost: x\r\nx-slow: " + b"z" * 1000
    answers = [answer for _, answer in await tricklers(srv, 50, b"", head, 0.1, 8, 0.3)]
    assert len(answers) == 50
    assert all(status(a) == 408 for a in answers), answers


async def tricklers(
    srv: Server, count: int, first: bytes, rest: bytes, gap: float, patience: float, settle: float
) -> list[tuple[float, bytes]]:
    """``count`` clients trickling at once (``trickled``), and a normal request served
    meanwhile, ``settle`` seconds in; what each trickler got, and when."""
    answers: list[tuple[float, bytes]] = []

    async def trickle() -> None:
        answers.append(await trickled(srv.port, first, rest, gap, patience))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(trickle)
        await trio.sleep(settle)
        with trio.fail_after(2):
            assert status(await raw_request(srv.port, HELLO)) == 200
    return answers


async def trickled(
    port: int, first: bytes, rest: bytes, gap: float, patience: float
) -> tuple[float, bytes]:
    """Send ``first``, then ``rest`` a byte every ``gap`` seconds (until the server stops
    reading); what the server answered until it closed (or ``patience`` ran out), and how
    long all that took."""
    received = b""
    started = trio.current_time()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.move_on_after(patience):
            try:
                await stream.send_all(first)
                for byte in rest:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(gap)
            except trio.BrokenResourceError:
                pass
            try:
                while chunk := await stream.receive_some(4096):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return trio.current_time() - started, received


def post(path: str, body: bytes, chunked: bool = False) -> tuple[bytes, bytes]:
    """A POST's head, and its body as it goes on the wire (with Content-Length or chunked)."""
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {len(body)}"
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{framing}\r\n\r\n"
    wire = b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in body) if chunked else body
    return head.encode(), wire + (b"0\r\n\r\n" if chunked else b"")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_trickled_body_is_cut_off_and_others_are_served(srv: Server, chunked: bool) -> None:
    """R-U-Dead-Yet: 200 clients send a complete head, then their body a byte every 0.2 s,
    which keeps any per-read timeout happy. The whole body is due within body_timeout (1 s
    here): each gets 408 soon after, counted, and a normal request is served meanwhile."""
    before = await metric(srv.port, "limit_body_timeout_total")
    head, body = post("/upload", b"x" * 100, chunked)
    answers = await tricklers(srv, 200, head, body, 0.2, 10, 0.5)
    assert [status(answer) for _, answer in answers] == [408] * 200
    assert b"request body not received within 1 s" in answers[0][1]
    assert max(elapsed for elapsed, _ in answers) < 8  # the 100 bytes would take 20 s
    assert await metric(srv.port, "limit_body_timeout_total") - before == 200


async def test_a_large_upload_within_the_limits_succeeds(srv: Server) -> None:
    """The deadline is for the whole body, not per read, and a normal upload makes it: 900 KB
    at once, under max_body_bytes (1 MiB) and well within body_timeout."""
    head, body = post("/upload", os.urandom(900_000))
    response = await raw_request(srv.port, head + body)
    assert status(response) == 200
    assert response.endswith(b"received 900000 bytes")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"key": b"not base64!"}, 400),
        ({"key": base64.b64encode(b"short")}, 400),
        ({"key": b""}, 400),
        ({"extra": b"sec-websocket-version: 8\r\n"}, 426),
        ({"extra": b"sec-websocket-version: banana\r\n"}, 426),
    ],
)
async def test_bad_websocket_handshakes(
    srv: Server, headers: dict[str, bytes], expected: int
) -> None:
    response = await raw_request(srv.port, upgrade("/echo/x", **headers), read_timeout=2)
    assert status(response) == expected, response
    if expected == 426:
        assert b"sec-websocket-version: 13" in response.lower()


async def test_an_upgrade_that_is_not_get_or_lacks_connection_upgrade(srv: Server) -> None:
    post = upgrade("/echo/x").replace(b"GET ", b"POST ", 1)
    assert status(await raw_request(srv.port, post, read_timeout=2)) == 400
    no_connection = upgrade("/echo/x").replace(b"connection: Upgrade", b"connection: keep-alive")
    assert status(await raw_request(srv.port, no_connection, read_timeout=2)) == 400


TRAVERSALS = [
    "/files/../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2E%2E%2Fsecret.txt",
    "/files/..%2fsecret.txt",
    "/files/....//secret.txt",
    "/files/%252e%252e/secret.txt",
    "/files/..\\secret.txt",
    "/files/%c0%ae%c0%ae/secret.txt",
    "/files/" + "%2e%2e/" * 20 + "etc/passwd",
    "/files//etc/passwd",
    "/files/%00",
    "/files/index.html%00.txt",
    "/files/" + "a" * 300,
    "/files/" + "a/" * 2000,
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_static_paths_never_leave_the_folder(srv: Server, path: str) -> None:
    response = await raw_request(srv.port, get(path))
    assert status(response) in (400, 404), response[:300]
    assert SECRET.encode() not in response and b"root:" not in response


async def test_the_static_folder_itself_is_served(srv: Server) -> None:
    response = await raw_request(srv.port, get("/files/"))
    assert status(response) == 200 and response.endswith(b"public page")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/room/%ff%fe", 400),  # not UTF-8
        ("/room/%C0%AF", 400),  # an overlong encoding of "/"
        ("/room/", 404),  # no name
        ("/room/a/b", 404),  # names are one path segment
    ],
)
async def test_bad_room_names(srv: Server, path: str, expected: int) -> None:
    assert status(await raw_request(srv.port, upgrade(path), read_timeout=2)) == expected


# --------------------------------------------------------------------------------------------
# hostile WebSocket frames


PROTOCOL_ERRORS = {
    "unmasked client frame": (encode_frame(OP_TEXT, b"hi"), 1002),
    "reserved bits": (bytes([0xC1, 0x80]) + MASK, 1002),
    "reserved opcode": (frame(0x3, b""), 1002),
    "control frame over 125 bytes": (frame(OP_PING, b"x" * 126), 1002),
    "fragmented control frame": (frame(OP_PING, b"x", fin=False), 1002),
    "continuation without a message": (frame(OP_CONTINUATION, b"x"), 1002),
    "close code 999": (frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close code 1005 (reserved)": (frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "close code 5000": (frame(OP_CLOSE, struct.pack("!H", 5000)), 1002),
    "one-byte close payload": (frame(OP_CLOSE, b"\x03"), 1002),
    "invalid UTF-8 text": (frame(OP_TEXT, b"caf\xc3"), 1007),
    "invalid UTF-8 close reason": (frame(OP_CLOSE, b"\x03\xe8\xff"), 1007),
    "frame announcing 2**40 bytes": (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40), 1009),
    "message over max_message_bytes": (frame(OP_BINARY, b"x" * 70_000), 1009),
    "fragments over max_message_bytes": (
        frame(OP_TEXT, b"x" * 40_000, fin=False) + frame(OP_CONTINUATION, b"x" * 40_000),
        1009,
    ),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_protocol_violations_close_with_a_code_and_reason(srv: Server, case: str) -> None:
    data, expected = PROTOCOL_ERRORS[case]
    ws = await RawWebSocket.connect(srv.port)
    await ws.send(frame(OP_TEXT, b"before"))  # answered before the Close
    await ws.send(data)
    assert await ws.next_event() == "before"
    code, reason = await ws.close_received()
    assert code == expected
    assert reason  # says what was wrong
    assert await ws.next_event() is None  # then the server closes TCP
    await ws.aclose()


async def test_a_flood_of_fragments_within_the_limit_is_one_message(srv: Server) -> None:
    ws = await RawWebSocket.connect(srv.port)
    flood = frame(OP_TEXT, b"a", fin=False) + frame(OP_CONTINUATION, b"b", fin=False) * 20_000
    await ws.send(flood + frame(OP_CONTINUATION, b"c"))
    assert await ws.next_event(10) == "a" + "b" * 20_000 + "c"
    await ws.aclose()


async def test_a_ping_flood_is_answered_in_order(srv: Server) -> None:
    ws = await RawWebSocket.connect(srv.port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send, b"".join(frame(OP_PING, b"%d" % i) for i in range(5000)))
        for i in range(5000):
            event = await ws.next_event()
            assert event.payload == b"%d" % i
    await ws.send(frame(OP_TEXT, b"still here"))
    assert await ws.next_event() == "still here"
    await ws.aclose()


@pytest.fixture
def default_server(tmp_path: Path) -> Iterator[Server]:
    """The default timeouts (a 10 s head, a 5 s close), for the floods: on a loaded machine
    their clients may be slower than the 1 s the slowloris tests use, and would be cut
    (correctly) for it."""
    config = CONFIG.replace("handshake_timeout = 1.0\n", "").replace("close_timeout = 1.0\n", "")
    with hostile(tmp_path, config) as srv:
        yield srv


async def test_thousands_of_connections_opened_and_dropped_at_once(
    default_server: Server,
) -> None:
    """1,500 WebSockets in 30 rooms, all open at once, then all dropped without a Close;
    twice. The server keeps serving, its connection count returns to zero and its memory does
    not keep growing."""
    srv = default_server
    await raw_request(srv.port, HELLO)  # warm up
    baseline = srv.fds()

    async def round_of_connections() -> None:
        sockets: list[RawWebSocket] = []
        # 100 handshakes in flight, as a client fleet (and the benchmark) would: one Python
        # process on a loaded machine cannot follow 1,500 connects with their heads in time.
        handshakes = trio.CapacityLimiter(100)

        async def open_one(i: int) -> None:
            async with handshakes:
                sockets.append(await RawWebSocket.connect(srv.port, f"/room/mass-{i % 30}"))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(1500):
                    nursery.start_soon(open_one, i)
        assert len(sockets) == 1500
        for ws in sockets:
            ws.stream.socket.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
            )  # close with a reset, as a crashed client would
            await ws.aclose()
        for _ in range(200):  # up to 20 s
            if await open_websockets(srv.port) == 0:
                break
            await trio.sleep(0.1)
        assert await open_websockets(srv.port) == 0

    await round_of_connections()
    rss_after_first = srv.rss_kib()
    await round_of_connections()
    assert srv.rss_kib() - rss_after_first < 16 * 1024
    ws = await RawWebSocket.connect(srv.port)
    await ws.send(frame(OP_TEXT, b"still serving"))
    assert await ws.next_event() == "still serving"
    await ws.aclose()
    await fds_back_to(srv, baseline)


async def test_a_ping_flood_from_a_client_that_never_reads(default_server: Server) -> None:
    """The pongs pile up for a client that does not read them: past max_outbox_bytes it is
    closed with 1008, and memory does not grow with the flood."""
    srv = default_server
    rss_before = srv.rss_kib()
    ws = await RawWebSocket.connect(srv.port)
    burst = frame(OP_PING, b"p" * 125) * 1000
    with trio.fail_after(30):
        for _ in range(200):  # up to 26 MB of pings, until the server stops reading them
            with trio.move_on_after(1) as blocked:
                try:
                    await ws.send(burst)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            if blocked.cancelled_caught:
                break  # it closed us and no longer reads: now read what it says
        code, _reason = await ws.close_received(10)
    assert code == 1008
    await ws.aclose()
    assert srv.rss_kib() - rss_before < 16 * 1024
