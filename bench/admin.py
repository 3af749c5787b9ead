"""What the operator's view costs a busy server (``make bench-admin``).

Starts ``rooms serve bench.admin:app`` and opens CONNS WebSockets spread over ROOMS rooms
(each connection stores a key when it joins). Then, with every connection open:

- the live page's update: its socket (``/_rooms/admin/live``) is opened and each pushed
  snapshot says what the one before cost the server to build, encode and queue
  (``update_ms``: the event loop does nothing else meanwhile);
- the rooms list and one room's page (``/_rooms/admin/rooms``, by connections and by stored
  bytes; ``/_rooms/admin/room``): their round trips;
- responsiveness: the round trip of an echo probe (one message every 10 ms) with the page
  closed, then open, p50 and p99.

    .venv/bin/python bench/admin.py [--conns 10000] [--rooms 1000] [--checkout before=DIR]

With ``--checkout NAME=DIR`` the server also runs from another tree (a checkout with this
file), the trees taking turns ``--reps`` times; the figures are medians per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from rooms import App, Connection, Request, Room

REPO = Path(__file__).resolve().parent.parent


class Echo(Room):
    """Echoes to the sender; each connection stores a key as it joins."""

    async def on_connect(self, conn: Connection, request: Request) -> None:
        self.storage.put(f"member:{conn.id}", {"joined": self.now()})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(message)


app = App()
app.room("/room/{name}", Echo)


async def get(port: int, path: str) -> tuple[float, dict[str, Any]]:
    """A GET's round trip in ms, and its JSON."""
    started = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    elapsed = (time.perf_counter() - started) * 1000
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return elapsed, json.loads(body)


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max": round(ordered[-1], 2),
    }


async def probe(port: int, seconds: float) -> list[float]:
    """Echo round trips (ms), one every 10 ms for ``seconds``."""
    times = []
    async with open_websocket_url(f"ws://127.0.0.1:{port}/room/probe") as ws:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await ws.send_message("ping")
            await ws.get_message()
            times.append((time.perf_counter() - started) * 1000)
            await trio.sleep(0.01)
    return times


async def measure(
    tree: Path, config: Path, conns: int, rooms: int, seconds: float
) -> dict[str, Any]:
    with socket.socket() as probe_socket:  # a free port
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "runtime.cli", "serve", "bench.admin:app"]
    command += ["--port", str(port), "--data-dir", ":memory:", "--log-level", "WARNING"]
    command += ["--config", str(config)]
    server = subprocess.Popen(command, env=env, cwd=tree)  # noqa: ASYNC220 - returns at once
    try:
        with trio.fail_after(15):
            while True:
                try:
                    await get(port, "/_rooms/usage")
                    break
                except OSError:
                    await trio.sleep(0.05)
        result: dict[str, Any] = {"conns": conns, "rooms": rooms}
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)

            async def client(i: int) -> None:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/room/r{i % rooms}") as ws:
                    await ws.send_message("hello")
                    await ws.get_message()
                    ready.release()
                    await trio.sleep_forever()

            for i in range(conns):
                nursery.start_soon(client, i)
                if i % 200 == 199:
                    await trio.sleep(0.05)
            with trio.fail_after(120):
                for _ in range(conns):
                    await ready.acquire()
            await trio.sleep(1)
            result["probe_closed_ms"] = quantiles(await probe(port, seconds))

            updates: list[float] = []
            probed: list[float] = []
            seen: dict[str, Any] = {}
            async with open_websocket_url(f"ws://127.0.0.1:{port}/_rooms/admin/live") as live:
                await live.send_message("")

                async def read_updates() -> None:
                    while True:
                        snapshot = seen["last"] = json.loads(await live.get_message())
                        if snapshot["update_ms"] is not None:
                            updates.append(snapshot["update_ms"])

                async with trio.open_nursery() as inner:
                    inner.start_soon(read_updates)
                    probed = await probe(port, seconds)
                    inner.cancel_scope.cancel()
                assert updates, "no snapshot came"
            result["open_websockets"] = seen["last"]["metrics"]["websockets_open"]
            result["update_ms"] = quantiles(updates)
            result["probe_page_open_ms"] = quantiles(probed)
            for name, path in (
                ("rooms_by_connections_ms", "/_rooms/admin/rooms"),
                ("rooms_by_stored_ms", "/_rooms/admin/rooms?sort=stored"),
            ):
                result[name] = quantiles([(await get(port, path))[0] for _ in range(10)])
            _, found = await get(port, "/_rooms/admin/rooms?limit=1")
            key = found["rooms"][0]["key"]
            result["room_page_ms"] = quantiles(
                [(await get(port, f"/_rooms/admin/room?key={key}"))[0] for _ in range(10)]
            )
            result["rooms_found"] = found["total"]
            nursery.cancel_scope.cancel()
        return result
    finally:
        server.kill()
        server.wait()


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over ``runs``."""
    merged: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, dict):
            merged[name] = {k: statistics.median(run[name][k] for run in runs) for k in value}
        else:
            merged[name] = statistics.median(run[name] for run in runs)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR")
    args = parser.parse_args()
    trees = {"this": REPO}
    for given in args.checkout:
        name, _, folder = given.partition("=")
        trees[name] = Path(folder).resolve()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # (No keepalive pings: this process's 10,000 clients answering a round of them would
    # stall the probe for half a second, which says nothing of the server.)
    config = Path(f"/tmp/rooms-bench-admin-{os.getpid()}.toml")
    config.write_text(f"max_connections = {args.conns + 100}\nping_interval = 3600.0\n")
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    try:
        for rep in range(args.reps):
            for name in list(trees) if rep % 2 == 0 else list(reversed(trees)):
                figures = args.conns, args.rooms, args.seconds
                runs[name].append(trio.run(measure, trees[name], config, *figures))
    finally:
        config.unlink()
    print(json.dumps({name: medians(found) for name, found in runs.items()}, indent=2))
    options = "".join(f" --checkout {given}" for given in args.checkout)
    print(
        f"({time.monotonic() - started:.0f} s; command: python bench/admin.py --conns "
        f"{args.conns} --rooms {args.rooms} --seconds {args.seconds:g} --reps {args.reps}"
        f"{options})"
    )


if __name__ == "__main__":
    main()
