"""The `rooms` command and the settings it loads."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from runtime.cli import main
from runtime.config import ConfigError, Settings, load_settings
from tests.support import REPO, free_port

ROOMS = [sys.executable, "-m", "runtime.cli"]


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "rooms.toml"
    config.write_text(text)
    return config


# ---------------------------------------------------------------------------------------
# settings


def test_defaults() -> None:
    assert load_settings() == Settings()
    assert load_settings(None, port=None, host=None) == Settings()  # None means "not given"
    settings = Settings()
    assert settings.port == 8000 and settings.max_message_bytes == 1024 * 1024
    assert settings.synchronous == "NORMAL" and settings.handshake_timeout == 10.0


def test_a_config_file_sets_values_and_overrides_win(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        'max_message_bytes = 2048\nhandshake_timeout = 3\nport = 7000\nadmin_token = "s3"\n',
    )
    settings = load_settings(config)
    assert settings.max_message_bytes == 2048
    assert settings.handshake_timeout == 3.0 and isinstance(settings.handshake_timeout, float)
    assert settings.port == 7000 and settings.admin_token == "s3"
    assert settings.mailbox_size == Settings().mailbox_size  # untouched keys keep defaults
    overridden = load_settings(config, port=9001, max_message_bytes=None)
    assert overridden.port == 9001
    assert overridden.max_message_bytes == 2048  # None does not override the file


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "examples.echo.app:app", "--print-config", "--port", "9001"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "port = 9001" in lines
    assert 'host = "127.0.0.1"' in lines
    assert f"max_message_bytes = {1024 * 1024}" in lines
    assert 'synchronous = "NORMAL"' in lines
    assert len(lines) == len(attrs.fields(Settings))  # every setting, one per line


def test_printed_config_is_a_config_file_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, 'trusted_proxies = ["10.0.0.0/8", "::1"]\nport = 9002\n')
    assert main(["serve", "examples.echo.app:app", "--config", str(config), "--print-config"]) == 0
    (tmp_path / "again").mkdir()
    printed = write_config(tmp_path / "again", capsys.readouterr().out)
    assert load_settings(printed) == load_settings(config)
    assert load_settings(printed).trusted_proxies == ("10.0.0.0/8", "::1")


def test_a_trusted_proxy_that_is_not_an_address_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'trusted_proxies'"):
        load_settings(write_config(tmp_path, 'trusted_proxies = ["proxy.local"]\n'))


def test_print_config_with_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        "max_message_bytes = 2048\nhandshake_timeout = 3\nport = 7000\n"
        'synchronous = "NORMAL"\ndata_dir = "from-file"\n',
    )
    argv = ["serve", "examples.echo.app:app", "--config", str(config), "--print-config"]
    assert main([*argv, "--port", "9001", "--synchronous", "FULL"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "port = 9001" in lines  # the flag wins over the file
    assert 'synchronous = "FULL"' in lines
    assert 'data_dir = "from-file"' in lines  # no flag: the file's value
    assert "max_message_bytes = 2048" in lines
    assert "handshake_timeout = 3.0" in lines
    assert main(argv) == 0
    assert "port = 7000" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_mesage_bytes = 5\n", "unknown setting 'max_mesage_bytes'"),
        ("[server]\nport = 1\n", "unknown setting 'server'"),
        ('max_message_bytes = "big"\n', "setting 'max_message_bytes' must be int, got str"),
        ("port = 80.5\n", "setting 'port' must be int, got float"),
        ("port = true\n", "setting 'port' must be int, got bool"),
        ("port = [1]\n", "setting 'port' must be int, got list"),
        ('handshake_timeout = "3"\n', "setting 'handshake_timeout' must be float, got str"),
        ("handshake_timeout = false\n", "setting 'handshake_timeout' must be float, got bool"),
        ("host = 5\n", "setting 'host' must be str, got int"),
        ("close_timeout = -1\n", "setting 'close_timeout' must not be negative"),
        ("mailbox_size = -5\n", "setting 'mailbox_size' must not be negative"),
        ("port = [\n", "is not valid TOML"),
        ("port = 1\nport = 2\n", "is not valid TOML"),
        ('cluster = "mysql://db"\n', "setting 'cluster' must be a postgresql://"),
        ('cluster = "postgresql://db"\n', "setting 'cluster_token' is required"),
        (
            'cluster = "postgresql://db"\ncluster_token = "t"\nhost = "0.0.0.0"\n',
            "setting 'node_address'",
        ),
        (
            'cluster = "postgresql://db"\ncluster_token = "t"\ncertfile = "c.pem"\n',
            "setting 'certfile': cluster mode",
        ),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert message in str(refused.value)


def test_a_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_settings(tmp_path / "nope.toml")


def test_bad_overrides_are_errors_too() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(prot=1)
    with pytest.raises(ConfigError, match="'port' must not be negative"):
        load_settings(port=-1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_mesage_bytes = 5\n", "unknown setting 'max_mesage_bytes'"),
        ('max_message_bytes = "big"\n', "'max_message_bytes' must be int"),
        ("port = [\n", "is not valid TOML"),
    ],
)
def test_serve_reports_a_bad_config_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = write_config(tmp_path, text)
    assert main(["serve", "examples.echo.app:app", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rooms serve: ")
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1  # one clear line, not a traceback


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('synchronous = "SOMETIMES"\n', "synchronous"),
        ('synchronous = "OFF"\n', "synchronous"),  # the kill -9 guarantee would not hold
        ('log_level = "LOUD"\n', "log_level"),
    ],
)
def test_bad_setting_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_settings(write_config(tmp_path, text))


def test_a_port_out_of_range_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'port'"):
        load_settings(write_config(tmp_path, "port = 70000\n"))


# ---------------------------------------------------------------------------------------
# loading the app


def test_an_app_that_cannot_be_imported() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "nonexistent.module:app"])
    assert "cannot import module 'nonexistent.module'" in str(exited.value.code)


def test_a_missing_attribute_is_named_with_the_apps_the_module_has() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "examples.echo.app:nothing"])
    assert str(exited.value.code) == (
        "rooms serve: module examples.echo.app has no attribute 'nothing'; "
        "its rooms.App objects: app"
    )


def test_an_app_in_a_folder_named_rooms_gets_a_hint() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "rooms.app:app"])
    assert "rename the folder" in str(exited.value.code)


def test_a_data_dir_that_cannot_be_created_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "examples.echo.app:app", "--data-dir", "/proc/nope"]) == 2
    assert capsys.readouterr().err == (
        "rooms serve: setting 'data_dir': cannot create the folder '/proc/nope': "
        "No such file or directory\n"
    )


def test_a_database_that_cannot_be_opened_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rooms.sqlite3").write_bytes(b"not a database at all, just text" * 100)
    argv = ["serve", "examples.echo.app:app", "--data-dir", str(tmp_path)]
    assert main([*argv, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rooms serve: cannot open the database ")
    assert err.count("\n") == 1


def test_an_attribute_that_is_not_an_app() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "examples.echo.app:EchoRoom"])
    assert "not a rooms.App" in str(exited.value.code)


@pytest.mark.parametrize("target", ["examples.echo.app", "examples.echo.app:", ":app"])
def test_a_target_that_is_not_module_colon_app(target: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", target])
    assert "expected MODULE:APP" in str(exited.value.code)


def test_usage_errors_exit_with_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in [[], ["bogus"], ["serve"], ["serve", "x:app", "--synchronous", "SOMETIMES"]]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
    assert "invalid choice: 'SOMETIMES'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# real processes


def server_log(log: Path) -> str:
    return log.read_text()


async def _kill(process: trio.Process) -> None:
    process.kill()


async def start_server(
    nursery: trio.Nursery, target: str, port: int, data_dir: Path, log: Path, *options: str
) -> trio.Process:
    """Start ``rooms serve`` as a process and wait until its port accepts connections."""
    command = [*ROOMS, "serve", target, "--port", str(port), "--data-dir", str(data_dir)]
    command += options
    with log.open("ab") as stderr:
        server: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [*command, "--log-level", "INFO"],
                cwd=REPO,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                deliver_cancel=_kill,  # a failed test leaves no process behind
            )
        )
    with trio.fail_after(10):
        while True:
            assert server.returncode is None, server_log(log)
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return server


async def stop(server: trio.Process, signum: signal.Signals) -> int:
    server.send_signal(signum)
    with trio.fail_after(10):
        return await server.wait()


async def connect(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(10):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [*ROOMS, "connect", url, *args],
            cwd=REPO,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
        )
    return result


async def test_serve_and_connect_as_real_processes(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, "examples.echo.app:app", port, tmp_path, log)
        client = await connect(f"ws://127.0.0.1:{port}/echo/x", "-x", "hello", "-w", "1")
        assert client.returncode == 0, client.stderr
        assert client.stdout.decode().splitlines() == ["hello"]
        assert "closed: 1000" in client.stderr.decode()
        assert await stop(server, signal.SIGTERM) == 0, server_log(log)
    assert "SIGTERM: draining" in server_log(log)
    assert (tmp_path / "rooms.sqlite3").is_file()


async def test_the_log_goes_to_log_file_as_json_lines(tmp_path: Path) -> None:
    port, stderr, log_file = free_port(), tmp_path / "stderr.log", tmp_path / "rooms.log"
    config = write_config(tmp_path, f'log_file = "{log_file}"\nlog_format = "json"\n')
    async with trio.open_nursery() as nursery:
        server = await start_server(
            nursery, "examples.echo.app:app", port, tmp_path, stderr, "--config", str(config)
        )
        client = await connect(f"ws://127.0.0.1:{port}/echo/x", "-x", "hello", "-w", "0")
        assert client.returncode == 0, client.stderr
        assert await stop(server, signal.SIGTERM) == 0, server_log(stderr)
    assert server_log(stderr) == ""  # everything went to the file
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    messages = [line["message"] for line in lines]
    assert any(m.startswith(f"serving on http://127.0.0.1:{port}") for m in messages), messages
    assert any(m.startswith("SIGTERM: draining") for m in messages), messages


def test_a_log_file_that_cannot_be_opened_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'log_file = "{tmp_path}/missing/rooms.log"\n')
    assert main(["serve", "examples.echo.app:app", "--config", str(config)]) == 2
    assert "setting 'log_file': cannot open" in capsys.readouterr().err


async def test_a_signal_stops_the_server_with_its_writes_durable(tmp_path: Path) -> None:
    url_path, log = "/counter/lobby", tmp_path / "server.log"
    async with trio.open_nursery() as nursery:
        port = free_port()
        server = await start_server(nursery, "examples.counter.app:app", port, tmp_path, log)
        first = await connect(f"ws://127.0.0.1:{port}{url_path}", "-x", "a", "-x", "b", "-w", "0.5")
        assert first.returncode == 0, first.stderr
        assert first.stdout.decode().splitlines() == ["0", "1", "2"]
        assert await stop(server, signal.SIGINT) == 0, server_log(log)

        port = free_port()
        server = await start_server(nursery, "examples.counter.app:app", port, tmp_path, log)
        second = await connect(f"ws://127.0.0.1:{port}{url_path}", "-x", "c", "-w", "0.5")
        assert second.returncode == 0, second.stderr
        assert second.stdout.decode().splitlines() == ["2", "3"]
        assert await stop(server, signal.SIGTERM) == 0, server_log(log)


async def test_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [*ROOMS, "serve", "examples.echo.app:app", "--port", str(port)]
        with trio.fail_after(10):
            result = await trio.run_process(
                [*command, "--data-dir", str(tmp_path)],
                cwd=REPO,
                check=False,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
            )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith(f"rooms serve: cannot listen on 127.0.0.1:{port}: "), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------
# graceful restart


async def test_sigterm_closes_websockets_with_1012_and_exits_0(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, "examples.chat.app:app", port, tmp_path, log)
        url = f"ws://127.0.0.1:{port}/api/room/restart/websocket"
        async with open_websocket_url(url) as alice, open_websocket_url(url) as bob:
            await alice.send_message(json.dumps({"name": "alice"}))
            await bob.send_message(json.dumps({"name": "bob"}))
            await alice.send_message(json.dumps({"message": "before the restart"}))
            server.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                for ws in (alice, bob):
                    seen = []
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            seen.append(json.loads(await ws.get_message()))
                    # the room answered everything first: the acknowledgement is there
                    assert any(m.get("message") == "before the restart" for m in seen), seen
                    reason = closed.value.reason
                    assert reason is not None
                    assert (reason.code, reason.reason) == (
                        1012,
                        "server restarting: reconnect shortly",
                    )
                assert await server.wait() == 0
    assert "SIGTERM: draining" in server_log(log)


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """A client that never answers the Close would hold the drain for close_timeout (5 s):
    the second SIGTERM does not wait for it."""
    port, log = free_port(), tmp_path / "server.log"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, "examples.echo.app:app", port, tmp_path, log)
        stuck = await trio.open_tcp_stream("127.0.0.1", port)
        await stuck.send_all(
            b"GET /echo/stuck HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert b" 101 " in await stuck.receive_some(4096)
        server.send_signal(signal.SIGTERM)
        await trio.sleep(0.5)
        assert server.poll() is None  # still draining: the client has not answered
        started = trio.current_time()
        assert await stop(server, signal.SIGTERM) == 0
        assert trio.current_time() - started < 4  # not the 5 s close_timeout of a drain
        await stuck.aclose()
    assert "SIGTERM again: stopping now" in server_log(log)


def test_a_folder_named_rooms_in_the_current_directory_does_not_hide_the_sdk(
    tmp_path: Path,
) -> None:
    # e.g. a clone named "rooms" next to one's app, with the current directory first on the
    # path as pytest and "python app.py" put it: the installed SDK must still win.
    (tmp_path / "rooms").mkdir()
    (tmp_path / "rooms" / "README.md").write_text("a clone, not a package")
    code = "import sys; sys.path.insert(0, ''); from rooms import App; print(App.__module__)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "rooms"), done.stderr
