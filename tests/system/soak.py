"""Soak test (``make soak``): thousands of connections with steady traffic for minutes, and the
server's memory and open file descriptors must stay flat.

    python -m tests.system.soak [--connections 2000] [--rooms 200] [--seconds 180] [--interval 2]

Starts ``rooms serve examples.echo.app:app`` as a process, opens the connections spread over
the rooms (``/room/<name>`` broadcasts to everyone in the room), and has each connection send a
small message every ``interval`` seconds (jittered) while reading everything it receives. The
server's RSS and descriptor count are sampled every few seconds. After a warm-up (the first
fifth of the run) RSS may not grow by more than 10 % (and 16 MiB), descriptors may not change,
no connection may be closed, and every broadcast must arrive. Exit status 0 only if all hold.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

from runtime.frames import OP_TEXT, FrameParser, encode_frame
from tests.support import REPO, server, wait_for_port_sync


class Totals:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.closed = 0


async def connect(port: int, path: str) -> tuple[trio.SocketStream, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nhost: soak\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake to {path}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101 "):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    return stream, head.split(b"\r\n\r\n", 1)[1]


async def client(
    stream: trio.SocketStream, rest: bytes, interval: float, totals: Totals, stop: trio.Event
) -> None:
    parser = FrameParser(client=True)

    async def reader() -> None:
        data = rest
        while True:
            for event in parser.feed(data) if data else ():
                if isinstance(event, str):
                    totals.received += 1
                else:
                    totals.closed += 1  # a Close from the server: not expected
                    return
            data = await stream.receive_some(65536)
            if not data:
                totals.closed += 1
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        mask = os.urandom(4)
        await trio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            await stream.send_all(
                encode_frame(OP_TEXT, b"soak message %030d" % totals.sent, mask=mask)
            )
            totals.sent += 1
            await trio.sleep(interval * random.uniform(0.8, 1.2))
        await trio.sleep(2)  # the last broadcasts arrive
        nursery.cancel_scope.cancel()


def sample(pid: int) -> tuple[int, int]:
    """The server's RSS in KiB and its open descriptors."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def soak(port: int, pid: int, args: argparse.Namespace) -> bool:
    totals = Totals()
    stop = trio.Event()
    per_room = args.connections // args.rooms
    samples: list[tuple[float, int, int]] = []
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        limiter = trio.CapacityLimiter(200)
        streams: list[tuple[trio.SocketStream, bytes]] = []

        async def open_one(i: int) -> None:
            async with limiter:
                streams.append(await connect(port, f"/room/soak-{i % args.rooms}"))

        async with trio.open_nursery() as opening:
            for i in range(args.rooms * per_room):
                opening.start_soon(open_one, i)
        print(f"{len(streams)} connections open in {time.monotonic() - started:.1f} s")
        for stream, rest in streams:
            nursery.start_soon(client, stream, rest, args.interval, totals, stop)

        begin = time.monotonic()
        while (elapsed := time.monotonic() - begin) < args.seconds:
            rss, fds = sample(pid)
            samples.append((elapsed, rss, fds))
            print(
                f"{elapsed:6.0f} s  RSS {rss / 1024:7.1f} MiB  fds {fds:5d}  "
                f"sent {totals.sent:8d}  received {totals.received:9d}  closed {totals.closed}"
            )
            await trio.sleep(min(5.0, args.seconds / 20))
        stop.set()
    rss = samples[-1][1]

    warm = [s for s in samples if s[0] >= args.seconds / 5]
    growth = warm[-1][1] - warm[0][1]
    expected = totals.sent * per_room
    checks = {
        f"RSS after warm-up grew {growth / 1024:.1f} MiB (limit: 10 % and 16 MiB)": growth
        <= min(warm[0][1] * 0.10, 16 * 1024)
        or growth <= 0,
        f"descriptors after warm-up: {sorted({s[2] for s in warm})} (must not change)": len(
            {s[2] for s in warm}
        )
        == 1,
        f"connections closed by the server: {totals.closed}": totals.closed == 0,
        f"broadcasts received {totals.received} of {expected}": totals.received == expected,
    }
    print()
    for text, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    print(
        f"\n{args.connections} connections, {args.rooms} rooms, {args.seconds:.0f} s: "
        f"{totals.sent / args.seconds:.0f} messages/s in, "
        f"{totals.received / args.seconds:.0f} deliveries/s out; "
        f"RSS {rss / 1024:.1f} MiB ({rss / args.connections:.1f} KiB per connection)"
    )
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as data,
        server("examples.echo.app:app", REPO, Path(data)) as (proc, port),
    ):
        wait_for_port_sync(port, proc)
        ok = trio.run(soak, port, proc.pid, args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
