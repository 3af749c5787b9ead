"""``rooms dev`` as a real process on an app in a folder of its own: a saved change restarts
the server (one log line), a connected ``rooms.client`` is closed with 1012 and comes back to
the new code by itself, storage writes under the data folder restart nothing, and a syntax
error is reported while the supervisor waits for the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

import rooms.client
from tests.support import REPO, free_port, wait_for_port

APP = """
from rooms import App, Connection, Request, Room


class Hello(Room):
    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send("VERSION")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.storage.put("count", await self.storage.get("count", 0) + 1)
        conn.send("stored")


app = App()
app.room("/hello/{name}", Hello)
"""


def write_app(folder: Path, version: str) -> None:
    (folder / "app.py").write_text(APP.replace("VERSION", version))


async def until_logged(log: Path, text: str) -> None:
    with trio.fail_after(20):
        while text not in await trio.Path(log).read_text():  # noqa: ASYNC110 - polling a file
            await trio.sleep(0.05)


async def test_a_saved_change_restarts_and_clients_come_back(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    write_app(project, "v1")
    port = free_port()
    log = tmp_path / "dev.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "runtime.cli", "dev", "app:app", "--port", str(port)]
    command += ["--data-dir", str(project / "data")]
    with log.open("wb") as stderr:
        proc = subprocess.Popen(command, cwd=project, env=env, stderr=stderr)  # noqa: ASYNC220
    try:
        await wait_for_port(port, proc)
        url = f"ws://127.0.0.1:{port}/hello/a"
        async with rooms.client.connect(url, min_delay=0.05, max_delay=0.5) as room:
            assert await room.receive() == "v1"
            for _ in range(20):  # each one writes the database under project/data
                await room.send("x")
                assert await room.receive() == "stored"
            await trio.sleep(1.0)  # longer than the watcher's debounce
            assert "restarting" not in log.read_text()

            write_app(project, "v2")
            with trio.fail_after(20):
                assert await room.receive() == "v2"  # reconnected to the new code
            assert room.last_close is not None and room.last_close[0] == 1012
            assert "rooms dev: app.py changed; restarting" in log.read_text()

            (project / "app.py").write_text("oops(\n")
            await until_logged(log, "the server exited with 1; fix the error")
            assert proc.poll() is None  # the supervisor waits for the fix
            write_app(project, "v3")
            with trio.fail_after(20):
                assert await room.receive() == "v3"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
