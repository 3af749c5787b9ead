"""Cluster soak (``make cluster-soak``): three nodes of the example chat on PostgreSQL, with the
default lease, under 1,000 messages a second in, for 10 minutes.

    python -m tests.system.cluster_soak [--seconds 600] [--rate 1000] [--rooms 100]

Each room has two chatters, each through another node (so half the traffic crosses a node
link); each sends at ``rate / (2 * rooms)`` messages a second, jittered, and reads all it gets.
The run passes (exit status 0) only if no node was declared dead, none fenced itself and each
joined once (no false death: the lease held under load); no client was closed; every message
came back to its sender (the room stored it); every client saw its room's ``seq`` contiguous;
and each room's history holds every acknowledged message once, at contiguous ``seq``. It
prints each node's event loop lag (p50, p99, p99.9, from ``loop_lag_seconds``) and the
messages' round trip (sent to echoed, p50 to max), and the figures as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from runtime.frames import OP_TEXT, FrameParser, encode_frame
from runtime.metrics import LAGS
from tests.support import Node, cluster_of, fresh_database, metric, raw_request
from tests.system.soak import connect, sample
from tests.system.test_cluster import history


class Chatter:
    """One client of a room through one node: its round trips, what it saw, what broke."""

    def __init__(self, room: str, name: str, node: Node) -> None:
        self.room, self.name, self.node = room, name, node
        self.sent_at: dict[str, float] = {}  # text -> when, until it comes back
        self.round_trips: list[float] = []
        self.acked: dict[str, int] = {}  # text -> seq
        self.last_seq: int | None = None
        self.gaps: list[tuple[int, int]] = []  # (expected seq, seen seq)
        self.closed: str | None = None
        self.ready = trio.Event()

    async def run(self, interval: float, stop: trio.Event) -> None:
        try:
            stream, rest = await connect(self.node.port, f"/api/room/{self.room}/websocket")
        except OSError as exc:
            self.closed = repr(exc)
            return
        mask = os.urandom(4)  # (raw frames: a WebSocket library would cost more than a node)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(self._frame({"name": self.name}, mask))
            nursery.start_soon(self._read, stream, rest, nursery.cancel_scope)
            await self.ready.wait()
            sent, at = 0, trio.current_time() + random.uniform(0, interval)
            while not stop.is_set():
                await trio.sleep_until(at)  # (on a schedule: the rate holds)
                sent += 1
                text = f"{self.name}/{sent}"
                self.sent_at[text] = time.monotonic()
                await stream.send_all(self._frame({"message": text}, mask))
                at += interval * random.uniform(0.8, 1.2)
            with trio.move_on_after(5):  # the last echoes
                while self.sent_at:  # noqa: ASYNC110 - polled, once
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    @staticmethod
    def _frame(message: dict[str, Any], mask: bytes) -> bytes:
        return encode_frame(OP_TEXT, json.dumps(message).encode(), mask=mask)

    async def _read(self, stream: trio.SocketStream, data: bytes, scope: trio.CancelScope) -> None:
        parser = FrameParser(client=True)
        while True:
            for event in parser.feed(data) if data else ():
                if not isinstance(event, str):
                    self.closed = repr(event)  # (a Close: none is expected)
                    scope.cancel()
                    return
                self._saw(json.loads(event))
            data = await stream.receive_some(65536)
            if not data:
                break
        self.closed = "the connection was closed without a Close"
        scope.cancel()

    def _saw(self, data: dict[str, Any]) -> None:
        if "ready" in data:
            self.last_seq = data["seq"]
            self.ready.set()
        if "message" not in data or "seq" not in data or self.last_seq is None:
            return  # (the history sent before ready)
        seq, text = data["seq"], data["message"]
        if seq != self.last_seq + 1:
            self.gaps.append((self.last_seq + 1, seq))
        self.last_seq = seq
        sent = self.sent_at.pop(text, None)
        if sent is not None:
            self.round_trips.append(time.monotonic() - sent)
            self.acked[text] = seq


def rss_mib(node: Node) -> int:
    assert node.proc is not None
    return sample(node.proc.pid)[0] // 1024


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def lag_quantiles(node: Node) -> dict[str, float]:
    """p50, p99 and p99.9 of the node's ``loop_lag_seconds``, in ms, interpolated in its
    buckets as Prometheus' histogram_quantile does."""
    answer = await raw_request(node.port, b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 0.5)
    cumulative: dict[float, float] = {}
    for line in answer.decode().splitlines():
        if line.startswith("rooms_loop_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            cumulative[float(le)] = float(line.split()[-1])
    total = cumulative[float("inf")]
    figures = {}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        rank, lower, below = q * total, 0.0, 0.0
        for bound in (*LAGS, float("inf")):
            if cumulative[bound] >= rank:
                inside = cumulative[bound] - below
                upper = bound if bound != float("inf") else LAGS[-1]
                share = (rank - below) / inside if inside else 1.0
                figures[name] = round((lower + (upper - lower) * share) * 1000, 2)
                break
            lower, below = bound, cumulative[bound]
    return figures


async def soak(dsn: str, logs: Path, args: argparse.Namespace) -> bool:
    async with cluster_of(dsn, 3, logs, CHAT_SECONDS_PER_MESSAGE="0") as nodes:
        chatters = [
            Chatter(f"soak{r}", f"c{r}-{k}", nodes[(r + k) % 3])
            for r in range(args.rooms)
            for k in range(2)
        ]
        interval = len(chatters) / args.rate
        stop = trio.Event()
        begin = time.monotonic()
        async with trio.open_nursery() as nursery:
            for chatter in chatters:
                nursery.start_soon(chatter.run, interval, stop)
            reported = dict.fromkeys(range(len(chatters)), 0)  # round trips printed, each
            while time.monotonic() - begin < args.seconds:
                await trio.sleep(min(30.0, args.seconds / 10))
                window = [t for i, c in enumerate(chatters) for t in c.round_trips[reported[i] :]]
                reported = {i: len(c.round_trips) for i, c in enumerate(chatters)}
                trips = [t for c in chatters for t in c.round_trips]
                dead = [await metric(n.port, "cluster_dead_nodes_total") for n in nodes]
                rss = [rss_mib(n) for n in nodes]
                print(
                    f"{time.monotonic() - begin:5.0f} s  acknowledged {len(trips):8d}  "
                    f"round trip p50 / p99 since the last line {quantile(window, 0.5) * 1000:5.1f}"
                    f" / {quantile(window, 0.99) * 1000:5.1f} ms  nodes' RSS {rss} MiB  "
                    f"found dead {sum(dead)}  closed {sum(bool(c.closed) for c in chatters)}",
                    flush=True,
                )
            stop.set()
            stopped = time.monotonic()
        trips = [t for c in chatters for t in c.round_trips]
        figures: dict[str, Any] = {
            "seconds": args.seconds,
            "messages_in_per_s": round(len(trips) / (stopped - begin)),
            "round_trip_ms": {
                name: round(quantile(trips, q) * 1000, 1)
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
            },
            "loop_lag_ms": [await lag_quantiles(node) for node in nodes],
        }
        counts = {
            name: [await metric(node.port, name) for node in nodes]
            for name in (
                "cluster_dead_nodes_total",
                "cluster_self_fences_total",
                "cluster_registrations_total",
            )
        }
        figures.update(counts)
        lost, twice, contiguous = 0, 0, True
        for room in sorted({c.room for c in chatters}):
            stored = await history(nodes[0], room)
            at = {m["seq"]: m["message"] for m in stored}
            contiguous &= sorted(at) == list(range(1, len(stored) + 1))
            twice += len(stored) - len({m["message"] for m in stored})
            for chatter in (c for c in chatters if c.room == room):
                lost += sum(at.get(seq) != text for text, seq in chatter.acked.items())
    unanswered = sum(len(c.sent_at) for c in chatters)
    gaps = sum(len(c.gaps) for c in chatters)
    closed = [f"{c.name}: {c.closed}" for c in chatters if c.closed]
    checks = {
        "no node declared dead": counts["cluster_dead_nodes_total"] == [0, 0, 0],
        "no node fenced itself": counts["cluster_self_fences_total"] == [0, 0, 0],
        "each node joined once": counts["cluster_registrations_total"] == [1, 1, 1],
        f"no client closed ({closed[:3]})": not closed,
        f"every message came back ({unanswered} did not)": unanswered == 0,
        "every client's messages went through": all(c.acked for c in chatters),
        f"every client saw contiguous seqs ({gaps} gaps)": gaps == 0,
        f"every acknowledged message stored once ({lost} lost, {twice} twice)": lost == twice == 0,
        "each room's history at contiguous seqs": contiguous,
    }
    for check, held in checks.items():
        print(f"{'ok  ' if held else 'FAIL'} {check}")
    print(f"node logs: {logs}")
    print(json.dumps(figures))
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages in per second")
    parser.add_argument("--rooms", type=int, default=100)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="rooms-cluster-soak-"))
    with fresh_database() as dsn:
        return 0 if trio.run(soak, dsn, logs, args) else 1


if __name__ == "__main__":
    sys.exit(main())
