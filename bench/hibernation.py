"""What a connection costs while its room hibernates (``make bench-hibernation``).

Starts ``rooms serve bench.hibernation:app`` twice: once with hibernation off, once with
``hibernate_after`` 1 s. Each time, opens CONNS WebSockets spread over ROOMS rooms; every
client joins (the room keeps its last 50 messages in memory, the connection its name in
``conn.state`` and a tag) and says one line. The server's RSS is read before the clients
connect and once every room is settled (hibernated, in the second run): the difference per
connection is the figure. Then one message per room shows that every room wakes and answers
its clients, and the activation count proves they had really left memory.

    bench/.venv/bin/python bench/hibernation.py [--conns 5000] [--rooms 500]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from rooms import App, Connection, Request, Room

REPO = Path(__file__).resolve().parent.parent


class ChatLike(Room):
    """A chat room's usual memory: recent lines in the instance, a name per connection."""

    hibernate_after = float(os.environ.get("HIBERNATE_AFTER", "1")) or None

    async def on_start(self) -> None:
        self.recent: list[str] = []

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.state = {"name": request.query_param("name"), "joined": self.now()}
        conn.tags.add("member")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        line = f"{conn.state['name']}: {message!s}"
        self.recent = [*self.recent[-49:], line]
        self.broadcast(line, tag="member")


app = App()
app.room("/chat/{name}", ChatLike)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


async def metric(port: int, name: str) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    found = re.search(rf"^rooms_{name} (\d+)$", data.decode(), re.MULTILINE)
    assert found is not None, name
    return int(found.group(1))


async def measure(hibernate_after: str, conns: int, rooms: int) -> dict[str, Any]:
    port = 20000 + os.getpid() % 20000
    env = {**os.environ, "HIBERNATE_AFTER": hibernate_after, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "runtime.cli", "serve", "bench.hibernation:app"]
    command += ["--port", str(port), "--data-dir", ":memory:", "--log-level", "WARNING"]
    server = subprocess.Popen(command, env=env, cwd=REPO)  # noqa: ASYNC220 - returns at once
    try:
        with trio.fail_after(15):
            while True:
                try:
                    await metric(port, "rooms_active")
                    break
                except OSError:
                    await trio.sleep(0.05)
        before = rss_kib(server.pid)
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            done = trio.Event()
            answers = [0]

            async def client(i: int) -> None:
                url = f"ws://127.0.0.1:{port}/chat/r{i % rooms}?name=u{i}"
                async with open_websocket_url(url) as ws:
                    await ws.send_message("hello")
                    await ws.get_message()
                    ready.release()
                    await done.wait()
                    if i < rooms:  # one client per room speaks again: the room must wake
                        await ws.send_message("again")
                    while True:
                        if str(await ws.get_message()).endswith("again"):
                            answers[0] += 1
                            break

            for i in range(conns):
                nursery.start_soon(client, i)
                if i % 200 == 199:
                    await trio.sleep(0.05)
            for _ in range(conns):
                await ready.acquire()
            with trio.fail_after(60):
                if hibernate_after != "0":
                    while await metric(port, "rooms_hibernated") < rooms:  # noqa: ASYNC110
                        await trio.sleep(0.2)
                await trio.sleep(1)
            after = rss_kib(server.pid)
            activations = await metric(port, "room_activations_total")
            result = {
                "hibernate_after": hibernate_after,
                "conns": conns,
                "rooms": rooms,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_conn": (after - before) / conns,
                "rooms_in_memory": await metric(port, "rooms_in_memory"),
                "rooms_hibernated": await metric(port, "rooms_hibernated"),
            }
            done.set()
            with trio.fail_after(60):
                while answers[0] < conns:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            result["activations"] = (activations, await metric(port, "room_activations_total"))
            nursery.cancel_scope.cancel()
        return result
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--rooms", type=int, default=500)
    args = parser.parse_args()
    start = time.monotonic()
    live = trio.run(measure, "0", args.conns, args.rooms)
    hibernated = trio.run(measure, "1", args.conns, args.rooms)
    for run in (live, hibernated):
        state = "hibernated" if run["hibernate_after"] != "0" else "live"
        print(
            f"{state:>10}: {run['conns']} connections in {run['rooms']} rooms: "
            f"RSS {run['rss_before_kib'] / 1024:.1f} -> {run['rss_after_kib'] / 1024:.1f} MiB, "
            f"{run['kib_per_conn']:.2f} KiB per connection; rooms in memory "
            f"{run['rooms_in_memory']}, hibernated {run['rooms_hibernated']}; activations "
            f"{run['activations'][0]} -> {run['activations'][1]} after one message per room"
        )
    print(
        f"({time.monotonic() - start:.0f} s; command: python bench/hibernation.py "
        f"--conns {args.conns} --rooms {args.rooms})"
    )


if __name__ == "__main__":
    main()
