"""TLS: with ``certfile``/``keyfile`` the server speaks https and wss (certificates: trustme)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from examples.echo.app import app as echo_app
from rooms import App, Request, Response
from runtime.config import ConfigError, Settings, load_settings
from tests.support import REPO, free_port, raw_request, server, start_server, wait_for_port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_settings(ca: trustme.CA, settings: Settings, tmp_path: Path) -> Settings:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return settings.replace(certfile=str(certfile), keyfile=str(keyfile))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def https_get(port: int, path: str, context: ssl.SSLContext) -> bytes:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        received = bytearray()
        try:
            while chunk := await stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass  # some servers skip close_notify; ours sends it, checked below
        return bytes(received)


app = App()


@app.route("/hello")
async def hello(request: Request) -> Response:
    return Response.json({"hello": request.client[0]})


app.routes += echo_app.routes


async def test_https_and_wss_round_trips(
    nursery: trio.Nursery, tls_settings: Settings, ca: trustme.CA
) -> None:
    port = await start_server(nursery, app, tls_settings)
    context = client_context(ca)
    with trio.fail_after(20):
        response = await https_get(port, "/hello", context)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(body) == {"hello": "127.0.0.1"}

        async with open_websocket_url(f"wss://127.0.0.1:{port}/echo/t", context) as ws:
            await ws.send_message("hello over TLS")
            assert await ws.get_message() == "hello over TLS"
            # Messages spanning many TLS records, and many small ones in a burst.
            big = bytes(range(256)) * 4096  # 1 MiB
            await ws.send_message(big)
            assert await ws.get_message() == big
            for i in range(200):
                await ws.send_message(f"m{i}")
            assert [await ws.get_message() for _ in range(200)] == [f"m{i}" for i in range(200)]


async def test_a_client_that_reads_late_gets_every_byte(
    nursery: trio.Nursery, tls_settings: Settings, ca: trustme.CA
) -> None:
    """What the kernel does not take waits as TLS records in the outbox, in order."""
    port = await start_server(nursery, app, tls_settings)
    url = f"wss://127.0.0.1:{port}/room/late"
    with trio.fail_after(30):
        async with (
            open_websocket_url(url, client_context(ca), message_queue_size=0) as slow,
            open_websocket_url(url, client_context(ca)) as sender,
        ):
            # `slow` reads nothing while 3 MiB are broadcast to it (below max_outbox_bytes).
            chunks = [bytes([i]) * 65536 for i in range(48)]
            for chunk in chunks:
                await sender.send_message(chunk)
                assert await sender.get_message() == chunk
            await trio.sleep(0.5)
            assert [await slow.get_message() for _ in chunks] == chunks


async def test_plain_http_on_the_tls_port_is_closed_and_counted(
    nursery: trio.Nursery, tls_settings: Settings, ca: trustme.CA
) -> None:
    port = await start_server(nursery, app, tls_settings)
    with trio.fail_after(10):
        answer = await raw_request(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in answer  # a TLS alert at most, never the page in clear
        untrusting = ssl.create_default_context()  # does not know the test CA
        with pytest.raises(trio.BrokenResourceError):
            await https_get(port, "/hello", untrusting)
        # The server carries on, and counted both failures.
        response = await https_get(port, "/_rooms/metrics", client_context(ca))
        assert b"rooms_tls_handshake_failures_total 2" in response


async def test_tls_settings_are_checked_with_the_key_named(
    tls_settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="'certfile': no such file"):
        load_settings(None, certfile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="'keyfile' needs 'certfile'"):
        load_settings(None, keyfile=tls_settings.keyfile)
    with pytest.raises(ConfigError, match="cannot load the certificate and key"):
        load_settings(None, certfile=tls_settings.keyfile, keyfile=tls_settings.keyfile)
    assert load_settings(None, certfile=tls_settings.certfile, keyfile=tls_settings.keyfile)


async def test_rooms_serve_with_certfile_and_keyfile(
    tls_settings: Settings, ca: trustme.CA, tmp_path: Path
) -> None:
    port = free_port()
    options = ("--certfile", tls_settings.certfile, "--keyfile", tls_settings.keyfile)
    with server("examples.echo.app:app", REPO, tmp_path, *options, port=port) as (proc, _):
        await wait_for_port(port, proc)
        with trio.fail_after(10):
            url = f"wss://localhost:{port}/echo/cli"
            async with open_websocket_url(url, client_context(ca)) as ws:
                await ws.send_message(b"\x00binary")
                assert await ws.get_message() == b"\x00binary"


async def test_a_tls_handshake_that_does_not_finish_is_cut_at_handshake_timeout(
    nursery: trio.Nursery, tls_settings: Settings, ca: trustme.CA
) -> None:
    port = await start_server(nursery, app, tls_settings.replace(handshake_timeout=0.5))
    silent = await trio.open_tcp_stream("127.0.0.1", port)  # connects, never says hello
    start = trio.current_time()
    async with silent:
        with trio.fail_after(5):
            assert await silent.receive_some(1024) == b""  # the server closed it
    assert 0.4 <= trio.current_time() - start < 4
    metrics = await https_get(port, "/_rooms/metrics", client_context(ca))
    assert b"rooms_tls_handshake_failures_total 1" in metrics
