"""One Yjs document under load: Rooms' DocRoom against y-websocket's own server
(``make bench-yjs``; ``make bench`` runs it after the WebSocket table).

Servers, in the same run, fresh for each measurement: ``rooms`` (``bench/yjs.py:app``, a
``rooms.yjs.DocRoom`` that stores every update in SQLite before relaying it) and
``y-websocket-server`` (``@y/websocket-server`` on Node, the reference y-websocket's own
README points to; in memory, it stores nothing). For E editors (10, 100) on one document:

- memory: the server's RSS after E editors synced, less before, per editor;
- updates/s: the editors send, in all, DELIVERIES / E updates a second (small inserts,
  valid Yjs updates of their own documents) for SECONDS, so that the server has DELIVERIES
  frames a second to send whatever E (20,000 by default: what this process's clients can
  read; more and the clients, not the servers, are measured); an observer editor counts the
  updates it receives and the latency of a probe editor's updates to it, p50 / p99;
- idle: IDLE editors over IDLE / 10 documents (Rooms only), each having synced, made one
  edit and sent its awareness: the server's RSS per editor once every document hibernated,
  against the same with hibernation off (every document in memory).

    .venv/bin/python bench/yjs.py [--editors 10,100] [--deliveries 20000] [--seconds 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from pycrdt import (
    Doc,
    Text,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    read_message,
)
from trio_websocket import WebSocketConnection, connect_websocket_url

from rooms import App
from rooms.yjs import DocRoom, _awareness

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class BenchDoc(DocRoom):
    shape = {"probe": Text}
    hibernate_after = float(os.environ.get("HIBERNATE_AFTER", "10")) or None


app = App()
app.room("/yjs/{name}", BenchDoc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(
    server: str, port: int, data: str, hibernate_after: str = "10"
) -> tuple[list[str], dict[str, str]]:
    if server == "rooms":
        args = [sys.executable, "-m", "runtime.cli", "serve", "bench.yjs:app", "--port", str(port)]
        env = {"PYTHONPATH": str(REPO), "HIBERNATE_AFTER": hibernate_after}
        return [*args, "--data-dir", data, "--log-level", "WARNING"], env
    script = HERE / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
    return ["node", str(script)], {"HOST": "127.0.0.1", "PORT": str(port)}


async def listening(port: int) -> None:
    """Once the server started on ``port`` accepts connections."""
    with trio.fail_after(15):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.05)


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


async def synced(url: str, nursery: trio.Nursery) -> tuple[WebSocketConnection, Doc[Any]]:
    """An editor: connected, its (empty) document sent as sync step 1."""
    ws = await connect_websocket_url(nursery, url, max_message_size=1 << 24)
    doc: Doc[Any] = Doc()
    await ws.send_message(create_sync_message(doc))
    return ws, doc


async def measure(server: str, editors: int, offered: float, seconds: float) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        args, env = command(server, port, data)
        proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env})  # noqa: ASYNC220
        try:
            return await load(proc, port, editors, offered, seconds)
        finally:
            proc.kill()
            proc.wait()


async def load(
    proc: subprocess.Popen[bytes], port: int, editors: int, offered: float, seconds: float
) -> dict[str, Any]:
    await listening(port)
    url = f"ws://127.0.0.1:{port}/yjs/bench"
    before = rss_kib(proc.pid)
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        clients = [await synced(url, nursery) for _ in range(editors)]
        await trio.sleep(1)
        result["kib_per_editor"] = (rss_kib(proc.pid) - before) / editors
        observer, probe = clients[0], clients[1]
        received = [0]
        sent_at: dict[int, float] = {}
        latencies: list[float] = []
        observed: Doc[Any] = Doc()
        probe_text = observed.get("probe", type=Text)

        async def observe() -> None:
            while True:
                message = await observer[0].get_message()
                if isinstance(message, bytes) and message[:2] == b"\x00\x02":
                    received[0] += 1
                    length = len(probe_text)
                    observed.apply_update(read_message(message[2:]))
                    if len(probe_text) != length and len(probe_text) in sent_at:
                        latencies.append(time.perf_counter() - sent_at.pop(len(probe_text)))

        async def drain(ws: WebSocketConnection) -> None:
            while True:
                await ws.get_message()

        nursery.start_soon(observe)
        for ws, _ in clients[1:]:
            nursery.start_soon(drain, ws)

        async def write(ws: WebSocketConnection, doc: Doc[Any], root: str, rate: float) -> None:
            text = doc.get(root, type=Text)
            interval, next_at = 1 / rate, trio.current_time()
            while True:
                before_state = doc.get_state()
                text.insert(len(text), "x")
                if root == "probe":
                    sent_at[len(text)] = time.perf_counter()
                await ws.send_message(create_update_message(doc.get_update(before_state)))
                next_at += interval
                await trio.sleep_until(next_at)

        writers = clients[1:]
        per_writer = offered / len(writers)
        started = received[0]
        t0 = trio.current_time()
        async with trio.open_nursery() as sending:
            sending.start_soon(write, probe[0], probe[1], "probe", min(per_writer, 20.0))
            for i, (ws, doc) in enumerate(writers[1:]):
                sending.start_soon(write, ws, doc, f"t{i}", per_writer)
            await trio.sleep(seconds)
            sending.cancel_scope.cancel()
        elapsed = trio.current_time() - t0
        result["updates_per_s"] = (received[0] - started) / elapsed
        result["deliveries_per_s"] = result["updates_per_s"] * editors
        ordered = sorted(latencies) or [float("nan")]
        result["p50_ms"] = statistics.median(ordered) * 1000
        result["p99_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        nursery.cancel_scope.cancel()
    return result


async def idle(editors: int, hibernate_after: str) -> dict[str, Any]:
    """RSS per idle editor of Rooms, its documents hibernated or (``"0"``) in memory."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        args, env = command("rooms", port, data, hibernate_after)
        proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env})  # noqa: ASYNC220
        try:
            await listening(port)
            before = rss_kib(proc.pid)
            async with trio.open_nursery() as nursery:
                for i in range(editors):
                    ws, doc = await synced(
                        f"ws://127.0.0.1:{port}/yjs/doc{i % (editors // 10)}", nursery
                    )
                    nursery.start_soon(_drain_forever, ws)
                    state = doc.get_state()
                    doc.get("probe", type=Text).insert(0, f"editor {i} ")
                    await ws.send_message(create_update_message(doc.get_update(state)))
                    cursor = json.dumps({"user": {"name": f"editor {i}"}, "cursor": i})
                    await ws.send_message(awareness_frame(i + 1, cursor))
                await trio.sleep(3 if hibernate_after != "0" else 1)
                hibernated = await metric(port, "rooms_hibernated")
                per_editor = (rss_kib(proc.pid) - before) / editors
                nursery.cancel_scope.cancel()
            return {"kib_per_editor": per_editor, "documents_hibernated": hibernated}
        finally:
            proc.kill()
            proc.wait()


async def _drain_forever(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


def awareness_frame(client: int, state: str) -> bytes:
    return create_awareness_message(_awareness([(client, (1, state))]))


async def metric(port: int, name: str) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    found = re.search(rf"^rooms_{name} (\d+)", data.decode(), re.MULTILINE)
    return int(found.group(1)) if found else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editors", default="10,100")
    parser.add_argument("--deliveries", type=float, default=20_000.0, help="frames/s out")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="idle editors (0: skip)")
    args = parser.parse_args()
    servers = ["rooms", "y-websocket-server"]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    started = time.monotonic()
    for rep in range(args.reps):
        for editors in (int(e) for e in args.editors.split(",")):
            for server in servers if rep % 2 == 0 else reversed(servers):
                offered = args.deliveries / editors
                run = trio.run(measure, server, editors, offered, args.seconds)
                runs.setdefault((server, editors), []).append(run)
    table = ["| editors | server | updates/s | deliveries/s | p50 / p99 ms | KiB per editor |"]
    table.append("|---|---|---|---|---|---|")
    report: dict[str, dict[str, float]] = {}
    for (server, editors), done in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        median = {k: statistics.median(one[k] for one in done) for k in done[0]}
        report[f"{server}/{editors}"] = median
        table.append(
            f"| {editors} | {server} | {median['updates_per_s']:.0f} | "
            f"{median['deliveries_per_s']:.0f} | {median['p50_ms']:.1f} / "
            f"{median['p99_ms']:.1f} | {median['kib_per_editor']:.1f} |"
        )
    if args.idle:
        for label, after in (("hibernated", "1"), ("in memory", "0")):
            found = [trio.run(idle, args.idle, after) for _ in range(args.reps)]
            per = statistics.median(run["kib_per_editor"] for run in found)
            docs = min(run["documents_hibernated"] for run in found)
            report[f"idle/{label}"] = {"kib_per_editor": per, "documents_hibernated": docs}
            table.append(
                f"| {args.idle} idle, {args.idle // 10} documents {label} "
                f"({docs} hibernated) | rooms | | | | {per:.1f} |"
            )
    print(json.dumps(report, indent=2))
    print("\n".join(table))
    print(
        f"(medians of {args.reps}; {time.monotonic() - started:.0f} s; command: python "
        f"bench/yjs.py --editors {args.editors} --deliveries {args.deliveries:g} --seconds "
        f"{args.seconds:g} --reps {args.reps} --idle {args.idle})"
    )


if __name__ == "__main__":
    main()
