"""An acknowledged write survives `kill -9` of a real server process.

A client's acknowledgement is a message the room sent after the write: the output gate
releases it only once the write is durable, so every acknowledged write must be there after
the process is killed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

REPO = Path(__file__).resolve().parent.parent

APP = """
from rooms import App, Connection, Room

class Ledger(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "count":
            items = await self.storage.list(prefix="item:")
            conn.send(f"{await self.storage.get('n', 0)} {len(items)}")
            return
        n = await self.storage.get("n", 0)
        self.storage.put("n", n + 1)
        self.storage.put(f"item:{n:06d}", message)
        conn.send(str(n + 1))

app = App()
app.room("/ledger/{name}", Ledger)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(app_dir: Path, data_dir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "runtime.cli", "serve", "ledger:app"]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--log-level", "WARNING"]
    proc = subprocess.Popen(command, cwd=app_dir, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(15):
        while True:
            assert proc.poll() is None, "the server exited while starting"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def count(port: int) -> tuple[int, int]:
    async with open_websocket_url(f"ws://127.0.0.1:{port}/ledger/main") as ws:
        await ws.send_message("count")
        n, items = str(await ws.get_message()).split()
        return int(n), int(items)


async def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    (tmp_path / "ledger.py").write_text(APP)
    data = tmp_path / "data"
    port = free_port()
    acked = 0
    with server(tmp_path, data, port) as proc:
        await wait_for_port(port, proc)
        with trio.fail_after(30):
            async with (
                open_websocket_url(f"ws://127.0.0.1:{port}/ledger/main") as ws,
                trio.open_nursery() as nursery,
            ):

                async def send_all() -> None:
                    for i in range(300):
                        await ws.send_message(f"entry {i}")

                # pipelined: 300 writes in flight, acknowledgements counted as they come
                nursery.start_soon(send_all)
                while acked < 150:
                    assert int(await ws.get_message()) == acked + 1
                    acked += 1
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream, writes still in flight
                nursery.cancel_scope.cancel()
        assert proc.wait(10) == -signal.SIGKILL

    with server(tmp_path, data, port) as proc:
        await wait_for_port(port, proc)
        with trio.fail_after(15):
            n, items = await count(port)
    # every acknowledged write is there, and what is there is whole: no gaps, no partial event
    assert n >= acked
    assert items == n
