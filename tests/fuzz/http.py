"""Fuzz target: the HTTP request phase as the edge drives it, ``runtime.http.HttpServer.serve``
over a real socket pair, with an ``answer`` that refuses or accepts WebSocket upgrades with
``runtime.handshake`` as the edge does and answers anything else with a small text response.

The input is everything a client sends before it shuts down writing. The documented outcome
is that ``serve`` returns (None, or the upgrade and the bytes after its head), whatever the
status it answered; ``ConnectionBroken`` is a client that went away (the edge ignores it).
Anything else escaping ``serve`` is a finding, and so are a run that does not end within
``DEADLINE`` and output that does not start as an HTTP/1.1 response.
"""

from __future__ import annotations

import socket

import trio

from rooms import Request, Response, Room, RoomId, Stub
from runtime.config import Settings
from runtime.handshake import accept_response, check_upgrade, is_upgrade
from runtime.http import HttpServer
from runtime.metrics import Metrics
from runtime.stream import ConnectionBroken, Stream

SETTINGS = Settings(
    handshake_timeout=0.2,
    keepalive_timeout=0.2,
    max_header_bytes=512,
    max_body_bytes=256,
    trusted_proxies=("127.0.0.0/8",),  # so X-Forwarded-For is parsed too
)
"""Short timeouts (nothing waits on a client that has shut down writing, but a bug that
does must not hang the fuzzer) and limits within ``-max_len``."""
DEADLINE = 5.0
"""Seconds one input may take; the timeouts above plus the 1 s lingering close are far less."""
PEER = ("127.0.0.1", 50000)


class Upgraded:
    """What ``answer`` returns for a valid upgrade: the 101 to send."""

    def __init__(self, response: bytes) -> None:
        self.response = response


def _no_stub(room_class: type[Room], room: str | RoomId) -> Stub:
    raise AssertionError("the fuzzed answer never calls a room")


SERVER = HttpServer(SETTINGS, Metrics(), _no_stub)


async def answer(request: Request, http_version: bytes, secure: bool) -> Response | Upgraded:
    """The edge's shape of answer: a checked upgrade, or a response naming the request."""
    if is_upgrade(request):
        refusal = check_upgrade(request, http_version)
        return refusal if refusal is not None else Upgraded(accept_response(request))
    if request.method == "POST" and request.body:
        return Response.text(f"{len(request.body)} bytes", 201)
    if request.path.startswith("/missing"):
        return Response.text("not found", 404)
    described = f"{request.method} {request.path} {request.query} from {request.client}"
    return Response.text(described, headers={"x-query": request.query_string[:40]})


def one_input(data: bytes) -> None:
    """Send ``data`` from the client's end, shut down writing, read until the server closes."""
    output = trio.run(_exchange, data)
    if output and not output.startswith(b"HTTP/1.1 "):
        raise AssertionError(f"the server's output is not an HTTP/1.1 response: {output[:80]!r}")


async def _exchange(data: bytes) -> bytes:
    """The server's output for ``data``; what escaped ``serve`` is raised here, outside the
    nursery, so that a finding's traceback is its own rather than an exception group's."""
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    received = bytearray()
    escaped: list[Exception] = []
    with trio.fail_after(DEADLINE), trio.socket.from_stdlib_socket(client_sock) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, server_sock, escaped)
            nursery.start_soon(_send, client, data)
            while True:
                try:
                    chunk = await client.recv(65536)
                except ConnectionResetError:
                    break  # the server closed with our bytes unread (after an upgrade)
                if not chunk:
                    break
                received += chunk
    if escaped:
        raise escaped[0]
    return bytes(received)


async def _serve(sock: socket.socket, escaped: list[Exception]) -> None:
    stream = Stream(sock)
    try:
        upgraded = await SERVER.serve(stream, PEER, answer)
        if upgraded is not None:
            await stream.send_all(upgraded[0].response)
    except ConnectionBroken:
        pass
    except Exception as exc:
        escaped.append(exc)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _send(client: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[await client.send(view) :]
        client.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed first (it answered before the request's end)
