"""The `rooms` command and the settings it loads."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from runtime.cli import main
from runtime.config import ConfigError, load_settings

from .conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def test_print_config_with_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text("max_message_bytes = 2048\nhandshake_timeout = 3\nport = 7000\n")
    argv = ["serve", "examples.echo.app:app", "--config", str(config), "--port", "9001"]
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "port = 9001" in out  # the flag wins over the file
    assert "max_message_bytes = 2048" in out
    assert "handshake_timeout = 3.0" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_mesage_bytes = 5\n", "unknown setting 'max_mesage_bytes'"),
        ('max_message_bytes = "big"\n', "'max_message_bytes' must be int"),
        ("close_timeout = -1\n", "'close_timeout' must not be negative"),
        ("port = [\n", "not valid TOML"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(config)


def test_bad_apps_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="cannot import module 'no_such_module'"):
        main(["serve", "no_such_module:app"])
    with pytest.raises(SystemExit, match=r"not a rooms\.App"):
        main(["serve", "examples.echo.app:nothing"])


async def test_serve_and_connect_as_real_processes(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "runtime.cli", "serve", "examples.echo.app:app"]
    command += ["--port", str(port), "--data-dir", str(tmp_path), "--log-level", "WARNING"]
    server = subprocess.Popen(command, cwd=REPO)  # noqa: ASYNC220 (killed in finally)
    try:
        with trio.fail_after(15):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            url = f"ws://127.0.0.1:{port}/echo/x"
            client = await trio.run_process(
                [sys.executable, "-m", "runtime.cli", "connect", url, "-x", "hello", "-w", "0.5"],
                cwd=REPO,
                capture_stdout=True,
                capture_stderr=True,
            )
            assert client.stdout.decode().splitlines() == ["hello"]
            server.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(server.wait) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
