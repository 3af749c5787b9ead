"""``rooms connect``: the client against real servers started in the test (trio-websocket or raw).

The servers are written here so these tests do not depend on the rest of the project.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
import trustme

from runtime.connect import add_arguments, run
from runtime.console import describe_binary
from tests.support import REPO

ROOT = REPO
TIME_LIMIT = 10

Handler = Callable[[trio_websocket.WebSocketRequest], Awaitable[None]]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rooms connect")
    add_arguments(parser)
    return parser.parse_args(argv)


async def handler(request: trio_websocket.WebSocketRequest) -> None:
    """Echo server; some paths behave differently to exercise the client."""
    path = request.path
    if path == "/reject":
        await request.reject(403, body=b"nope")
        return
    offered = request.proposed_subprotocols
    ws = await request.accept(subprotocol=offered[0] if offered else None)
    try:
        if path == "/close1011":
            await ws.aclose(1011, "boom")
            return
        if path == "/bye":
            await ws.send_message("bye")
            await ws.aclose(1000, "done")
            return
        if path == "/headers":
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            await ws.send_message(json.dumps({"headers": headers, "subprotocol": ws.subprotocol}))
        if path == "/close-on-bye":
            while (await ws.get_message()) != "bye":
                pass
            await ws.aclose(1011, "asked to")
            return
        while True:
            await ws.send_message(await ws.get_message())
    except trio_websocket.ConnectionClosed:
        pass


@asynccontextmanager
async def websocket_server(
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context
        )
        yield server.port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tcp_server(serve: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def accept_then_drop(stream: trio.SocketStream) -> None:
    """Complete the opening handshake by hand, then close TCP without a close frame."""
    request = await read_request(stream)
    match = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request)
    assert match is not None
    digest = hashlib.sha1(match.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n"
    )
    await trio.sleep(0.1)
    await stream.aclose()


async def drop_during_handshake(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def lines(text: str) -> list[str]:
    return text.splitlines()


# --------------------------------------------------------------------------- in process


async def test_execute_messages_are_echoed_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            args = parse([f"ws://127.0.0.1:{port}/x", "-x", "hello", "-x", "world", "-w", "0.5"])
            code = await run(args)
    out, err = capsys.readouterr()
    assert code == 0
    assert lines(out) == ["hello", "world"]
    assert "closed: 1000" in err


async def test_binary_messages(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(
                parse([f"ws://127.0.0.1:{port}/", "--binary", "-x", "abc", "-w", "0.5"])
            )
    out, _ = capsys.readouterr()
    assert code == 0
    assert lines(out) == ["<binary 3 bytes: 616263>"]
    assert describe_binary(bytes(40)) == "<binary 40 bytes: " + "00" * 32 + "...>"


async def test_headers_origin_and_subprotocol_are_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            argv = [f"ws://127.0.0.1:{port}/headers", "-H", "X-Token: s3cret", "-H", "X-Empty:"]
            argv += ["-o", "https://example.test", "-s", "chat.v1", "-s", "chat.v0", "-w", "0.5"]
            argv += ["-x", "ping"]
            code = await run(parse(argv))
    out, _ = capsys.readouterr()
    assert code == 0
    first, echo = lines(out)
    seen = json.loads(first)
    assert seen["headers"]["x-token"] == "s3cret"
    assert seen["headers"]["x-empty"] == ""
    assert seen["headers"]["origin"] == "https://example.test"
    assert seen["subprotocol"] == "chat.v1"
    assert echo == "ping"


async def test_interactive_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"one\r\n\ntwo\nh\xc3\xa9"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(parse([f"ws://127.0.0.1:{port}/", "-w", "0.5"]))
    out, _ = capsys.readouterr()
    assert code == 0
    assert lines(out) == ["one", "", "two", "hé"]


async def test_refused_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        code = await run(parse([f"ws://127.0.0.1:{free_port()}/", "-x", "hi"]))
    _, err = capsys.readouterr()
    assert code == 1
    assert "could not connect" in err


async def test_rejected_handshake_exits_1_with_status_and_body(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(parse([f"ws://127.0.0.1:{port}/reject", "-x", "hi"]))
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert "HTTP 403" in err
    assert "nope" in err


async def test_handshake_dropped_exits_1_without_waiting_for_the_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with tcp_server(drop_during_handshake) as port:
            started = trio.current_time()
            code = await run(parse([f"ws://127.0.0.1:{port}/", "-x", "hi"]))
            elapsed = trio.current_time() - started
    _, err = capsys.readouterr()
    assert code == 1
    assert "closed the connection during the WebSocket handshake" in err
    assert elapsed < 5  # the connect timeout is 10 s


async def test_wss_against_a_plain_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(parse([f"wss://127.0.0.1:{port}/", "-x", "hi"]))
    _, err = capsys.readouterr()
    assert code == 1
    assert "TLS handshake failed" in err


async def test_server_close_1011_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(parse([f"ws://127.0.0.1:{port}/close1011", "-x", "hi", "-w", "-1"]))
    _, err = capsys.readouterr()
    assert code == 3
    assert "closed: 1011 boom" in err


async def test_server_close_1000_exits_0_after_printing(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            code = await run(parse([f"ws://127.0.0.1:{port}/bye", "-x", "hi", "-w", "-1"]))
    out, err = capsys.readouterr()
    assert code == 0
    assert lines(out) == ["bye"]
    assert "closed: 1000 done" in err


async def test_dropped_connection_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with tcp_server(accept_then_drop) as port:
            code = await run(parse([f"ws://127.0.0.1:{port}/", "-w", "-1", "-x", "hi"]))
    _, err = capsys.readouterr()
    assert code == 3
    assert "closed: 1006" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["http://127.0.0.1/"],
        ["ws:///no-host"],
        ["ws://127.0.0.1/", "-H", "no colon"],
        ["ws://127.0.0.1/", "--connect-timeout", "0"],
        ["ws://127.0.0.1/", "-w", "soon"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 from a throwaway CA (trustme) that no client trusts."""
    issued = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


async def test_wss_verification_and_insecure(
    certificate: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server(server_context) as port:
            url = f"wss://127.0.0.1:{port}/"
            refused = await run(parse([url, "-x", "hi"]))
            _, err = capsys.readouterr()
            assert refused == 1
            assert "certificate verify failed" in err
            assert "--insecure" in err
            code = await run(parse([url, "--insecure", "-x", "secure hi", "-w", "0.5"]))
    out, _ = capsys.readouterr()
    assert code == 0
    assert lines(out) == ["secure hi"]


# --------------------------------------------------------------------------- subprocess


def client_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.connect", *args]


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


async def test_interactive_stdin_pipe_subprocess() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            result = await trio.run_process(
                client_command(f"ws://127.0.0.1:{port}/room/lobby", "-w", "1"),
                stdin=b"first\nsecond\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
                env=client_env(),
            )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["first", "second"]
    assert b"closed: 1000" in result.stderr


async def test_server_close_ends_interactive_session_while_stdin_stays_open() -> None:
    """The stdin reader must not keep the client alive once the server has closed."""
    with trio.fail_after(TIME_LIMIT):
        async with websocket_server() as port:
            process = await trio.lowlevel.open_process(
                client_command(f"ws://127.0.0.1:{port}/close-on-bye", "-w", "-1"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
                env=client_env(),
            )
            assert process.stdin is not None and process.stderr is not None
            assert process.stdout is not None
            try:
                await process.stdin.send_all(b"bye\n")  # stdin is left open
                err = b""
                while chunk := await process.stderr.receive_some():
                    err += chunk
                assert await process.wait() == 3, err
            finally:
                process.kill()
                await process.wait()
                for pipe in (process.stdin, process.stdout, process.stderr):
                    await pipe.aclose()
    assert b"closed: 1011 asked to" in err
