"""Smoke test with wscat (npm), the client Cloudflare's WebSockets page recommends for
troubleshooting: it must talk to a Rooms server like to any other.

``make test`` installs it into tests/system/wscat/node_modules; without npm the test is skipped
with the reason, except under ``ROOMS_REQUIRE_WSCAT=1`` (set by ``.ci/run``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
import trustme

from tests.support import REPO, server, wait_for_port

WSCAT = REPO / "tests" / "system" / "wscat" / "node_modules" / ".bin" / "wscat"


@pytest.fixture
def wscat() -> Path:
    if WSCAT.exists():
        return WSCAT
    reason = f"wscat is not installed at {WSCAT}: cd tests/system/wscat && npm ci"
    if os.environ.get("ROOMS_REQUIRE_WSCAT") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_wscat_talks_to_a_room(wscat: Path, tmp_path: Path, tls: bool) -> None:
    options: list[str] = []
    scheme, ca_options = "ws", []
    if tls:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
            str(tmp_path / "server.pem")
        )
        options = ["--certfile", str(tmp_path / "server.pem")]  # key and chain in one file
        scheme, ca_options = "wss", ["--ca", str(tmp_path / "ca.pem")]
    with server("examples.echo.app:app", REPO, tmp_path / "data", *options) as (proc, port):
        await wait_for_port(port, proc)
        command = [str(wscat), *ca_options, "-c", f"{scheme}://localhost:{port}/room/wscat"]
        client = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert client.stdin is not None and client.stdout is not None
        seen = b""

        async def until(text: bytes) -> None:
            nonlocal seen
            assert client.stdout is not None
            while text not in seen:
                chunk = await client.stdout.receive_some(4096)
                assert chunk, seen
                seen += chunk

        try:
            with trio.fail_after(15):
                # Piped, wscat prints no "Connected" line and drops what is typed before
                # it is connected: say it until the room's broadcast comes back.
                while b"hello from wscat\n" not in seen:
                    await client.stdin.send_all(b"hello from wscat\n")
                    with trio.move_on_after(0.5):
                        await until(b"hello from wscat\n")
                await client.stdin.aclose()  # wscat closes the WebSocket and exits
                assert await client.wait() == 0, seen
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
