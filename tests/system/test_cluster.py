"""Cluster mode end to end: real node processes on loopback, one real PostgreSQL, real
WebSocket clients. Rooms are reached through any node; nodes are killed (``kill -9``), paused
(SIGSTOP past their lease) and restarted one by one (SIGTERM) under load, and the chat's
history must hold every acknowledged message exactly once, at contiguous ``seq``, with
nothing a client saw missing from it. (The control plane and the fence alone are in
tests/runtime/test_cluster.py and test_postgres.py.)"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import psycopg
import pytest
import trio
import trio_websocket

from rooms import RoomId
from runtime.frames import OP_BINARY
from runtime.link import LINK_PATH, PROTOCOL
from tests.support import (
    REPO,
    Namespace,
    Node,
    PrivatePostgres,
    cluster_of,
    free_port,
    metric,
    node_env,
    raw_request,
    server,
    wait_for_port,
)
from tests.system.raw import RawWebSocket, frame
from tests.system.raw import upgrade as upgrade_to

QUIET = {"CHAT_SECONDS_PER_MESSAGE": "0"}  # the rate limiter allows everything
# A node holds a client whose room's node it cannot reach until that node is found dead (the
# lease, 3 s, and a second): a client waits longer than that before it tries another node.
CONNECT_TIMEOUT = 6


# -- clients ----------------------------------------------------------------------------------


async def joined(
    nursery: trio.Nursery, url: str, room: str, name: str, after: int | None = None
) -> Any:
    """A chat client in ``room`` through ``url`` (a node), after its ``ready``."""
    ws = await trio_websocket.connect_websocket_url(nursery, f"{url}/api/room/{room}/websocket")
    hello: dict[str, Any] = {"name": name}
    if after is not None:
        hello["after"] = after
    await ws.send_message(json.dumps(hello))
    while "ready" not in json.loads(await ws.get_message()):
        pass
    return ws


async def next_chat(ws: Any) -> dict[str, Any]:
    while True:
        data = json.loads(await ws.get_message())
        if "message" in data:
            return data  # type: ignore[no-any-return]


async def http(node: Node, method: str, path: str) -> tuple[int, Any]:
    """A plain request to ``node``: the status and the body (parsed if it is JSON)."""
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close"
    answer = await raw_request(node.port, f"{head}\r\n\r\n".encode(), closes=True, host=node.host)
    answer_head, _, body = answer.partition(b"\r\n\r\n")
    is_json = b"content-type: application/json" in answer_head.lower()
    return int(answer_head.split()[1]), json.loads(body) if is_json else body.decode()


async def history(node: Node, room: str) -> list[dict[str, Any]]:
    """Every stored message of ``room``, oldest first (page after page of 1000)."""
    messages: list[dict[str, Any]] = []
    query = "limit=1000"
    while True:
        _, page = await http(node, "GET", f"/api/room/{room}/history?{query}")
        messages[:0] = page["messages"]
        if not page["more"]:
            return messages
        query = f"limit=1000&before={messages[0]['seq']}"


def chat_key(room: str) -> str:
    """The storage key of the chat room ``room`` (as ``rooms_owners`` names it)."""
    return f"chat/{RoomId.from_name(room).hex}"


def owners(dsn: str) -> dict[str, str]:
    """Room key -> the port of the node that holds it."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT o.room, n.address FROM rooms_owners o JOIN rooms_nodes n USING (node_id) "
            "WHERE n.status = 'alive'"
        ).fetchall()
    return {room: address.rsplit(":", 1)[1] for room, address in rows}


# -- the data path across nodes -----------------------------------------------------------------


async def test_clients_on_different_nodes_chat_in_one_room(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, **QUIET) as (home, far, third):
        ada = await joined(nursery, home.url, "lobby", "ada")  # the room is claimed here
        bob = await joined(nursery, far.url, "lobby", "bob")  # and reached from there
        await bob.send_message(json.dumps({"message": "hi from far"}))
        for ws in (ada, bob):
            assert (await next_chat(ws))["seq"] == 1
        await ada.send_message(json.dumps({"message": "hi from home"}))
        for ws in (ada, bob):
            got = await next_chat(ws)
            assert (got["seq"], got["name"], got["message"]) == (2, "ada", "hi from home")
        # The room's heartbeat is answered at the client's node; the room never sees it.
        await bob.send_message("ping")
        assert await bob.get_message() == "pong"
        assert await metric(far.port, "auto_replies_total") == 1
        assert await metric(home.port, "auto_replies_total") == 0
        # Plain HTTP to the room, through a third node.
        assert [m["message"] for m in await history(third, "lobby")] == [
            "hi from far",
            "hi from home",
        ]
        assert await metric(far.port, "cluster_forwarded_websockets") == 1
        assert await metric(home.port, "cluster_remote_peers") == 1
        assert set(owners(pg_dsn).values()) == {str(home.port)}  # the chat and its limiter
        report = subprocess.run(  # noqa: ASYNC221 - a short command
            [sys.executable, "-m", "runtime.cli", "cluster", "status", "--cluster", pg_dsn],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = {line.split()[1]: line.split() for line in report.splitlines()[1:4]}
        assert {row[2] for row in rows.values()} == {"alive"}
        assert rows[f"127.0.0.1:{home.port}"][-1] == "2"  # rooms held
        assert rows[f"127.0.0.1:{far.port}"][-1] == "0"
        assert "rooms without a live node: 0" in report
        # Bob leaves: the room hears it (on_close) and tells Ada.
        await bob.aclose()
        assert json.loads(await ada.get_message()) == {"quit": "bob"}
        with trio.fail_after(5):
            while await metric(far.port, "cluster_forwarded_websockets"):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert await metric(home.port, "cluster_remote_peers") == 0


async def test_the_admin_view_of_any_node_shows_every_node_and_acts_on_rooms_held_elsewhere(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The operator's view in cluster mode, asked of one node: every node with its figures,
    the rooms of all of them with the node that holds each (and a room's traffic summed over
    the nodes its clients came through), and a room held by another node opened and acted on
    from this one: the action runs on the room's node and is audited there."""
    async with cluster_of(pg_dsn, 2, tmp_path, **QUIET) as (home, far):
        ada = await joined(nursery, home.url, "alpha", "ada")  # alpha is claimed by home
        bob = await joined(nursery, far.url, "beta", "bob")  # beta by far
        cy = await joined(nursery, far.url, "alpha", "cy")  # through far to home's alpha
        await cy.send_message(json.dumps({"message": "hi"}))
        for ws in (ada, cy):
            await next_chat(ws)
        _, nodes = await http(far, "GET", "/_rooms/admin/nodes")
        far_id = nodes["this"]
        _, nodes = await http(home, "GET", "/_rooms/admin/nodes")
        home_id = nodes["this"]
        figures = {node["node"]: node for node in nodes["nodes"]}
        assert set(figures) == {home_id, far_id} and home_id != far_id
        assert {node["status"] for node in figures.values()} == {"alive"}
        # far: bob, cy and the link home opened to ask it; home: ada and far's link (cy's)
        assert (figures[far_id]["websockets_open"], figures[home_id]["websockets_open"]) == (3, 2)
        assert figures[far_id]["cluster_forwarded_websockets"] == 1
        assert figures[home_id]["cluster_remote_peers"] == 1

        _, found = await http(home, "GET", "/_rooms/admin/rooms?class=ChatRoom")
        rooms = {room["name"]: room for room in found["rooms"]}
        assert (found["total"], found["unreachable"]) == (2, [])
        assert (rooms["alpha"]["node"], rooms["beta"]["node"]) == (home_id, far_id)
        assert (rooms["alpha"]["connections"], rooms["beta"]["connections"]) == (2, 1)
        assert rooms["alpha"]["messages_in"] >= 3  # ada's and cy's hellos, cy's line (far)

        beta = rooms["beta"]["key"]
        status, page = await http(home, "GET", f"/_rooms/admin/room?key={beta}")
        assert status == 200 and page["node"] == far_id, page
        assert [c["client"] for c in page["connections"]] == ["127.0.0.1"]
        body = json.dumps({"key": beta, "action": "notice", "text": "maintenance at noon"})
        head = (
            "POST /_rooms/admin/room HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        answer = await raw_request(home.port, (head + body).encode(), closes=True)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        while True:
            if json.loads(await bob.get_message()).get("notice") == "maintenance at noon":
                break
        assert "operator at 127.0.0.1: notice" in far.log.read_text()
        assert "operator at" not in home.log.read_text()
        missing = f"/_rooms/admin/room?key=chat/{'0' * 64}"
        assert (await http(home, "GET", missing))[0] == 404


async def fifty_quick_plays(nursery: trio.Nursery, urls: list[str]) -> None:
    """50 concurrent quick plays spread over ``urls`` (nodes, or one server), then 50 real
    WebSockets with the URLs returned, each through another node than the one that
    answered: 13 boards, none with more than 4 seated players, every ticket admitted once;
    a ticket used again is refused with 409."""

    async def quickplay(i: int) -> dict[str, Any]:
        body = json.dumps({"name": f"p{i}"})
        head = (
            "POST /api/quickplay HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        port = int(urls[i % len(urls)].rsplit(":", 1)[1])
        answer = await raw_request(port, (head + body).encode(), closes=True)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        return json.loads(answer.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]

    seats: list[dict[str, Any]] = []
    async with trio.open_nursery() as plays:

        async def play(i: int) -> None:
            seats.append(await quickplay(i))

        for i in range(50):
            plays.start_soon(play, i)
    assert len({seat["board"] for seat in seats}) == 13
    seated: dict[str, int] = {}
    for i, seat in enumerate(seats):
        ws = await trio_websocket.connect_websocket_url(
            nursery, f"{urls[(i + 1) % len(urls)]}{seat['path']}"
        )
        hello = json.loads(await ws.get_message())["hello"]
        assert hello["seated"] is True, (i, hello)
        seated[seat["board"]] = seated.get(seat["board"], 0) + 1
    assert sorted(seated.values()) == [2] + [4] * 12
    try:
        async with trio_websocket.open_websocket_url(f"{urls[-1]}{seats[0]['path']}"):
            raise AssertionError("a used ticket was admitted again")
    except trio_websocket.ConnectionRejected as exc:
        assert exc.status_code == 409 and b"used already" in (exc.body or b"")


async def test_fifty_quick_plays_through_three_nodes_seat_every_ticket_once(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, app="examples.game.app:app") as nodes:
        await fifty_quick_plays(nursery, [node.url for node in nodes])


async def test_fifty_quick_plays_on_one_server_seat_every_ticket_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The same on one server (embedded mode), beside its cluster twin."""
    with server("examples.game.app:app", REPO, tmp_path / "data") as (proc, port):
        await wait_for_port(port, proc)
        await fifty_quick_plays(nursery, [f"ws://127.0.0.1:{port}"])


async def test_a_room_with_clients_on_another_node_hibernates_and_wakes_with_their_state(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    app = "tests.system.cluster_app:app"
    async with cluster_of(pg_dsn, 2, tmp_path, app=app) as (home, far):
        ada = await trio_websocket.connect_websocket_url(nursery, f"{home.url}/lounge/x?name=ada")
        bob = await trio_websocket.connect_websocket_url(nursery, f"{far.url}/lounge/x?name=bob")
        await until_metric(home, "rooms_hibernated", 1)  # its clients stay connected
        started = await metric(home.port, "room_activations_total")
        await bob.send_message("ping")  # answered at bob's node: the room stays asleep
        assert await bob.get_message() == "pong"
        assert await metric(home.port, "rooms_hibernated") == 1
        await bob.send_message("hello")  # wakes it, with bob's name and tag from before
        expected = f"bob: hello (on {home.port})"
        assert await ada.get_message() == expected
        assert await bob.get_message() == expected
        assert await metric(home.port, "room_activations_total") == started + 1


async def until_fired(node: Node, path: str) -> None:
    """Until the Timer room at ``path`` says its alarm fired (a 503 "retry shortly" comes
    while the link to a killed node is lost but the node not yet declared dead)."""
    with trio.fail_after(15):
        while True:
            status, body = await http(node, "GET", path)
            if status == 200 and body.get("fired"):
                return
            await trio.sleep(0.2)


async def until_metric(node: Node, name: str, value: int) -> None:
    with trio.fail_after(10):
        while await metric(node.port, name) != value:  # noqa: ASYNC110 - a metric has no event
            await trio.sleep(0.05)


async def test_fifty_clients_joining_a_new_room_through_three_nodes_start_it_once(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, **QUIET) as nodes:
        clients: list[Any] = []

        async def join(i: int) -> None:
            clients.append(await joined(nursery, nodes[i % 3].url, "crowd", f"user{i}"))

        async with trio.open_nursery() as joining:
            for i in range(50):
                joining.start_soon(join, i)
        assert len(clients) == 50
        activations = [await metric(n.port, "room_activations_total") for n in nodes]
        assert sum(activations) == 1
        assert len(owners(pg_dsn)) == 1
        await clients[7].send_message(json.dumps({"message": "one room"}))
        for ws in clients:  # every client is in the same room, wherever it connected
            assert (await next_chat(ws))["message"] == "one room"


async def test_calls_alarms_and_http_reach_rooms_on_other_nodes(
    pg_dsn: str, tmp_path: Path
) -> None:
    app = "tests.system.cluster_app:app"
    async with cluster_of(pg_dsn, 3, tmp_path, app=app) as (a, b, c):
        ports = [str(n.port) for n in (a, b, c)]
        # Each Ring room is claimed where its first event arrives: r1 on a, r2 on b, r3 on c.
        for node, name in ((a, "r1"), (b, "r2"), (c, "r3")):
            assert (await http(node, "GET", f"/hop/{name}"))[1]["nodes"] == [str(node.port)]
        status, body = await http(a, "GET", "/hop/r1?path=r2,r3")
        assert (status, body["nodes"]) == (200, ports)  # a -> b -> c, a call per hop
        status, body = await http(c, "GET", "/hop/r3?path=r1,r2,r3")
        assert status == 409 and "call cycle" in body["cycle"]  # detected across nodes
        # Plain HTTP to a room on another node, and a stub call from a route on a third.
        assert (await http(a, "POST", "/counter/hits"))[1] == {"n": 1, "node": ports[0]}
        assert (await http(b, "POST", "/counter/hits"))[1] == {"n": 2, "node": ports[0]}
        assert (await http(c, "POST", "/add/hits"))[1] == {"n": 3, "node": ports[0]}
        # The alarm of a room whose node died fires on another node, once.
        assert (await http(b, "POST", "/timer/t?in=1.5"))[1] == {"node": ports[1]}
        b.kill_9()
        await until_fired(a, "/timer/t")
        _, fired = await http(c, "GET", "/timer/t")
        assert fired["set_on"] == ports[1] and fired["fired"] == 1
        assert fired["fired_on"] in (ports[0], ports[2])
        # The counter's node still serves it, and nothing of it was lost.
        assert (await http(c, "GET", "/counter/hits"))[1] == {"n": 3, "node": ports[0]}


# -- failures under load ----------------------------------------------------------------------


class Chatter:
    """A chat client that keeps talking through the nodes it is given: it sends a message,
    waits for its echo (the acknowledgement: the room stored it), and on any failure
    reconnects (to the next node) and resumes after the last ``seq`` it saw. It records
    what was acknowledged, what it saw, and any ``seq`` it saw twice."""

    def __init__(self, room: str, name: str, nodes: list[Node], first: int) -> None:
        self.room, self.name, self.nodes, self.turn = room, name, nodes, first
        self.last_seq = 0
        self.acked: dict[str, int] = {}  # text -> seq
        self.seen: dict[int, str] = {}  # seq -> text
        self.twice: list[int] = []
        self.ack_times: list[float] = []
        self.closes: list[tuple[float, int | None]] = []  # (when, code) of the ends it saw
        self.refusals: list[int] = []  # the nodes that turned it away (503), by port
        self._sent = 0

    async def run(self, until: trio.Event) -> None:
        while not until.is_set():
            node = self.nodes[self.turn % len(self.nodes)]
            try:
                await self._session(node, until)
            except (trio_websocket.HandshakeError, h11.ProtocolError):
                # That node refused (trio-websocket's client can trip over a refusal in h11
                # instead of raising its HandshakeError): another.
                self.refusals.append(node.port)
                self.turn += 1
            except (OSError, trio.TooSlowError):  # unreachable or stuck: another
                self.turn += 1
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
                self.closes.append((trio.current_time(), code))
                if code != 1012:
                    self.turn += 1
            await trio.sleep(0.1)

    async def _session(self, node: Node, until: trio.Event) -> None:
        url = f"{node.url}/api/room/{self.room}/websocket"
        async with trio_websocket.open_websocket_url(
            url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=1
        ) as ws:
            await ws.send_message(json.dumps({"name": self.name, "after": self.last_seq}))
            with trio.fail_after(3):
                while True:
                    data = json.loads(await ws.get_message())
                    if "ready" in data:
                        break
                    self._saw(data)
            while not until.is_set():
                self._sent += 1
                text = f"{self.name}/{self._sent}"
                await ws.send_message(json.dumps({"message": text}))
                with trio.fail_after(3):
                    while text not in self.acked:
                        data = json.loads(await ws.get_message())
                        self._saw(data)
                await trio.sleep(0.03)

    def _saw(self, data: dict[str, Any]) -> None:
        if "seq" not in data or "message" not in data:
            return
        seq, text = data["seq"], data["message"]
        if seq <= self.last_seq:
            self.twice.append(seq)
        self.last_seq = max(self.last_seq, seq)
        self.seen[seq] = text
        if text.startswith(f"{self.name}/"):
            self.acked[text] = seq
            self.ack_times.append(trio.current_time())


async def load(nodes: list[Node], rooms: int, during: Any, settle: float = 2.0) -> list[Chatter]:
    """Two chatters per room (each room claimed by node ``i % len(nodes)``, its chatters on
    that node and the next); ``during(chatters)`` runs meanwhile; then the history is
    checked. The chatters, for more checks."""
    chatters: list[Chatter] = []
    for i in range(rooms):
        room = f"room{i}"
        async with trio.open_nursery() as nursery:
            await (await joined(nursery, nodes[i % len(nodes)].url, room, "claim")).aclose()
        chatters += [Chatter(room, f"c{i}a", nodes, i), Chatter(room, f"c{i}b", nodes, i + 1)]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for chatter in chatters:
            nursery.start_soon(chatter.run, stop)
        await during(chatters)
        await trio.sleep(settle)
        stop.set()
    await check_histories(nodes, chatters)
    return chatters


async def check_histories(nodes: list[Node], chatters: list[Chatter]) -> None:
    """Every acknowledged message is in its room's history exactly once at its seq, the
    seqs are contiguous, nothing a client saw is missing, no client saw a seq twice."""
    alive = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    rooms = {c.room for c in chatters}
    for room in sorted(rooms):
        stored = await history(alive[0], room)
        at = {m["seq"]: m["message"] for m in stored}
        assert sorted(at) == list(range(1, len(stored) + 1)), f"{room}: seq not contiguous"
        texts = [m["message"] for m in stored]
        assert len(texts) == len(set(texts)), f"{room}: a message stored twice"
        for chatter in (c for c in chatters if c.room == room):
            assert chatter.acked, f"{chatter.name} never got a message through"
            for text, seq in chatter.acked.items():
                assert at.get(seq) == text, f"{room}: acknowledged {text!r} lost"
            for seq, text in chatter.seen.items():
                assert at.get(seq) == text, f"{room}: {chatter.name} saw {text!r}, not stored"
            assert chatter.twice == [], f"{chatter.name} saw seqs twice"


def gap_after(chatters: list[Chatter], rooms: set[str], since: float) -> float:
    """The longest any of ``rooms`` went without an acknowledgement after ``since``."""
    worst = 0.0
    for room in rooms:
        times = sorted(t for c in chatters if c.room == room for t in c.ack_times if t > since)
        assert times, f"{room} was never served again"
        worst = max(worst, times[0] - since)
    return worst


async def test_kill_9_of_a_node_under_load_loses_nothing_acknowledged(
    pg_dsn: str, tmp_path: Path
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, **QUIET) as nodes:
        victim = nodes[0]
        measured: dict[str, float] = {}

        async def kill(chatters: list[Chatter]) -> None:
            await trio.sleep(2)
            held = {key for key, port in owners(pg_dsn).items() if port == str(victim.port)}
            victim.kill_9()
            killed_at = trio.current_time()
            await trio.sleep(4)
            rooms = {c.room for c in chatters if chat_key(c.room) in held}
            assert len(rooms) == 7  # rooms 0, 3, ... 18
            measured["takeover"] = gap_after(chatters, rooms, killed_at)

        await load(nodes, 20, kill)
    assert measured["takeover"] < 5.0  # (the dead node's session is gone: well under 1 s)


def needs(missing: str | None) -> None:
    """Skip the test for what is ``missing`` (a reason, or None), or fail it where the cluster
    tests must run (ROOMS_REQUIRE_POSTGRES, as CI sets)."""
    if missing is not None:
        if os.environ.get("ROOMS_REQUIRE_POSTGRES"):
            pytest.fail(missing)
        pytest.skip(missing)


async def test_postgresql_restarted_under_load_fast_then_immediate_loses_nothing(
    tmp_path: Path,
) -> None:
    """The cluster's database restarted twice under load, on a server of the test's own:
    a fast shutdown (sessions cut, transactions rolled back), then an immediate one (a crash:
    recovery at start). The nodes survive; a commit that failed closes its clients with a
    clear code (1011 or 1012), and they resume; every room is served again within 10 s of
    the database being back; nothing acknowledged is lost or stored twice."""
    needs(PrivatePostgres.available())
    with PrivatePostgres() as database:
        async with cluster_of(database.dsn, 2, tmp_path, **QUIET) as nodes:
            back: list[float] = []

            async def restarts(chatters: list[Chatter]) -> None:
                for mode in ("fast", "immediate"):
                    await trio.sleep(3)
                    await trio.to_thread.run_sync(database.restart, mode)
                    back.append(trio.current_time())
                await trio.sleep(10)

            chatters = await load(nodes, 2, restarts)
            assert all(node.proc is not None and node.proc.poll() is None for node in nodes)
            rooms = {chatter.room for chatter in chatters}
            for since in back:
                assert gap_after(chatters, rooms, since) < 10.0
            codes = {code for chatter in chatters for _, code in chatter.closes}
            assert codes <= {1011, 1012}, codes


class Listener:
    """A chat client that only reads, from one node, until that node closes it."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.closed: tuple[float, int | None] | None = None

    async def run(self, node: Node, room: str, task_status: trio.TaskStatus[None]) -> None:
        url = f"{node.url}/api/room/{room}/websocket"
        async with trio_websocket.open_websocket_url(url, connect_timeout=3) as ws:
            await ws.send_message(json.dumps({"name": "listener", "after": 0}))
            task_status.started()
            try:
                while True:
                    data = json.loads(await ws.get_message())
                    if "seq" in data and "message" in data:
                        self.seen[data["seq"]] = data["message"]
            except trio_websocket.ConnectionClosed as exc:
                self.closed = (trio.current_time(), exc.reason.code if exc.reason else None)


async def test_a_paused_node_is_taken_over_and_fenced_when_it_wakes(
    pg_dsn: str, tmp_path: Path
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, **QUIET) as nodes:
        sleeper = nodes[0]
        listener = Listener()
        woke: list[float] = []

        async def pause(chatters: list[Chatter]) -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run, sleeper, "room0")  # a room it holds
                await trio.sleep(2)
                sleeper.signal(signal.SIGSTOP)
                await trio.sleep(5)  # past its 3 s lease: its rooms are served elsewhere
                sleeper.signal(signal.SIGCONT)
                woke.append(trio.current_time())
                await trio.sleep(3)

        await load(nodes, 12, pause)
        # Its clients are closed with 1012 as soon as it wakes, and nothing it sent them
        # is missing from the history the new owner kept.
        assert listener.closed is not None
        when, code = listener.closed
        assert code == 1012 and when - woke[0] < 2
        stored = {m["seq"]: m["message"] for m in await history(nodes[1], "room0")}
        assert listener.seen and all(stored.get(s) == t for s, t in listener.seen.items())
        assert await metric(sleeper.port, "cluster_self_fences_total") == 1
        assert await metric(sleeper.port, "cluster_registrations_total") == 2  # joined again


async def test_a_rolling_restart_of_every_node_under_load_loses_nothing(
    pg_dsn: str, tmp_path: Path
) -> None:
    async with cluster_of(pg_dsn, 3, tmp_path, **QUIET) as nodes:
        gaps: list[float] = []

        async def roll(chatters: list[Chatter]) -> None:
            await trio.sleep(1.5)
            for node in nodes:
                stopped_at = trio.current_time()
                assert await node.stop() == 0
                node.start()
                await node.ready()
                await trio.sleep(1.5)
                gaps.append(gap_after(chatters, {c.room for c in chatters}, stopped_at))

        await load(nodes, 9, roll)
    assert max(gaps) < 3.0  # per room, while each node drained and came back


async def test_a_node_link_needs_the_token_and_a_peer_that_breaks_the_protocol_is_dropped(
    pg_dsn: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Links without the cluster's token get 401, and a node that speaks another link protocol
    400 and an error line naming both versions; each is counted. A peer with the token that
    sends garbage, a message of the wrong shape or a frame over the link's limit is closed
    (1002 / 1009, with the reason) and nothing else is disturbed: a client of that node and
    one whose link comes from the other node keep chatting."""
    async with cluster_of(pg_dsn, 2, tmp_path, **QUIET) as (home, far):
        local = await joined(nursery, home.url, "guarded", "local")
        remote = await joined(nursery, far.url, "guarded", "remote")  # over far's link
        link = f"x-rooms-protocol: {PROTOCOL}\r\nx-rooms-node: intruder\r\n".encode()
        version = b"sec-websocket-version: 13\r\n"
        for token in (b"", b"authorization: Bearer guess\r\n"):
            refused = await raw_request(
                home.port, upgrade_to(LINK_PATH, extra=version + link + token)
            )
            assert refused.startswith(b"HTTP/1.1 401 "), refused
        # A node of another version (a rolling upgrade across link protocols): refused, and
        # both sides can read which versions met.
        newer = link.replace(f": {PROTOCOL}".encode(), f": {PROTOCOL + 1}".encode())
        token = b"authorization: Bearer test-token\r\n"
        refused = await raw_request(home.port, upgrade_to(LINK_PATH, extra=version + newer + token))
        assert refused.startswith(b"HTTP/1.1 400 "), refused
        assert f"node link protocol {PROTOCOL + 1} met protocol {PROTOCOL} here".encode() in refused
        assert await metric(home.port, "cluster_link_refusals_total") == 3
        logged = (tmp_path / "node-0.log").read_text()
        said = f"from node intruder at 127.0.0.1: node link protocol {PROTOCOL + 1}"
        assert f"refused a node link {said}" in logged

        peer = link + b"authorization: Bearer test-token\r\n"
        garbage = {
            "not msgpack": (frame(OP_BINARY, b"\xc1\xc1"), 1002, "not msgpack"),
            "wrong shape": (frame(OP_BINARY, b"\x92\x05\xa1x"), 1002, "wrong items"),
            "oversized": (frame(OP_BINARY, b"\0" * (1024 * 1024 + 64 * 1024 + 1)), 1009, ""),
        }
        for data, code, reason in garbage.values():
            intruder = await RawWebSocket.connect(home.port, LINK_PATH, peer)
            await intruder.send(data)
            got_code, got_reason = await intruder.close_received(10)
            assert got_code == code and reason in got_reason, (got_code, got_reason)
            await intruder.aclose()
        for ws, name in ((local, "local"), (remote, "remote")):
            await ws.send_message(json.dumps({"message": f"{name} still here"}))
            seen = {(await next_chat(local))["message"], (await next_chat(remote))["message"]}
            assert seen == {f"{name} still here"}


# -- partitions ---------------------------------------------------------------------------------

DATABASE, PEERS, CLIENTS = 0, 1, 2  # the isolated node's links, in the order they are made
LEASE = 3.0  # cluster_lease_seconds, the default
ADMIN = "test-admin"  # the isolated node's admin_token


@asynccontextmanager
async def partitioned(tmp_path: Path) -> AsyncIterator[tuple[Namespace, list[Node]]]:
    """Three chat nodes on a PostgreSQL of the test's own. The first runs in a network
    namespace and reaches the database, its peers and its clients each by a link of its own
    (``DATABASE``, ``PEERS``, ``CLIENTS``), so a test can cut any of them; the others run
    here, listening where it reaches them."""
    needs(PrivatePostgres.available() or Namespace.available())
    with Namespace() as namespace:
        database_here, _ = namespace.link()
        peers_here, peers_inside = namespace.link()
        _, clients_inside = namespace.link()
        with PrivatePostgres(also_on=[database_here]) as database:
            env = node_env(**QUIET)
            app, ports = "examples.chat.app:app", [free_port() for _ in range(3)]
            logs = [tmp_path / f"node-{i}.log" for i in range(3)]
            (tmp_path / "admin.toml").write_text(f'admin_token = "{ADMIN}"\n')
            inside = ["--host", "0.0.0.0", "--node-address", f"{peers_inside}:{ports[0]}"]
            inside += ["--config", str(tmp_path / "admin.toml")]  # (its metrics, from here)
            nodes = [
                Node(
                    database.dsn_at(database_here),
                    app,
                    ports[0],
                    logs[0],
                    env,
                    host=clients_inside,
                    options=inside,
                    prefix=namespace.prefix,
                )
            ]
            for port, log in zip(ports[1:], logs[1:], strict=True):
                here = ["--host", "0.0.0.0", "--node-address", f"{peers_here}:{port}"]
                nodes.append(Node(database.dsn, app, port, log, env, options=here))
            try:
                for node in nodes:
                    node.start()
                for node in nodes:
                    await node.ready()
                yield namespace, nodes
            finally:
                for node in nodes:
                    node.close()


def longest_silence(times: list[float], since: float, until: float) -> float:
    """The longest stretch of ``since``..``until`` with none of ``times`` in it."""
    marks = [since, *sorted(t for t in times if since < t < until), until]
    return max(b - a for a, b in itertools.pairwise(marks))


@pytest.mark.parametrize(
    "cut", [(DATABASE,), (PEERS,), (DATABASE, PEERS, CLIENTS)], ids=["database", "peers", "all"]
)
async def test_a_node_cut_off_for_10_s_under_load_loses_nothing_and_serves_again(
    tmp_path: Path, cut: tuple[int, ...]
) -> None:
    """The owner of two of six chat rooms under load loses its link to the database, to its
    peers, or every link (its cable pulled), for 10 s. Without the database it fences itself
    within its lease (its clients are closed with 1012, where they can still hear it) and its
    rooms are served elsewhere within 5 s; cut off from its peers only it is alive and keeps
    its rooms: the clients that reached them through other nodes are closed with 1012 and
    served again, through it, before the heal. Either way nothing acknowledged is lost or
    stored twice, and after the heal it serves again (as a new member if it had fenced)."""
    async with partitioned(tmp_path) as (namespace, nodes):
        owner, moves, dsn = nodes[0], DATABASE in cut, nodes[1].dsn
        listener = Listener()
        held: set[str] = set()  # the rooms it holds (chats and their rate limiters)
        kept: set[str] = set()  # those it still held at the end of the cut
        window: list[float] = []  # the cut, and the heal

        async def partition(chatters: list[Chatter]) -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run, owner, "room0")  # a room it holds
                await trio.sleep(2)
                held.update(key for key, port in owners(dsn).items() if port == str(owner.port))
                namespace.cut(*cut)
                window.append(trio.current_time())
                await trio.sleep(10)
                kept.update(key for key, port in owners(dsn).items() if port == str(owner.port))
                namespace.heal(*cut)
                window.append(trio.current_time())
                await trio.sleep(3)
                nursery.cancel_scope.cancel()  # (a listener that heard nothing)

        chatters = await load(nodes, 6, partition)
        cut_at, healed_at = window
        rooms = {c.room for c in chatters if chat_key(c.room) in held}
        assert rooms == {"room0", "room3"}
        silences = {
            room: longest_silence(
                [t for c in chatters if c.room == room for t in c.ack_times], cut_at, healed_at
            )
            for room in rooms
        }
        fences = await metric(owner.port, "cluster_self_fences_total", owner.host, ADMIN)
        joins = await metric(owner.port, "cluster_registrations_total", owner.host, ADMIN)
        if moves:
            assert max(silences.values()) < 5.0, silences  # taken over elsewhere
            # The other nodes held its clients until they could claim the rooms: none was
            # turned away to try its luck elsewhere (it, cut off, turns them away itself).
            refused = {c.name: c.refusals for c in chatters if set(c.refusals) - {owner.port}}
            assert refused == {}, refused
            assert kept & held == set()
            assert (fences, joins) == (1, 2)  # fenced, then joined again as a new member
        else:
            assert max(silences.values()) < 2.0, silences  # its own clients: never stopped
            assert kept >= held
            assert (fences, joins) == (0, 1)
            for chatter in (c for c in chatters if c.room in rooms and c.name.endswith("b")):
                # (its link to the owner went through another node)
                assert any(code == 1012 and when > cut_at for when, code in chatter.closes)
                silence = longest_silence(chatter.ack_times, cut_at, healed_at)
                assert silence < 10.0 - 1.0, (chatter.name, silence)  # served before the heal
        if not moves:
            assert listener.closed is None  # its owner kept serving it all along
        elif CLIENTS not in cut:  # it stopped before anyone may have taken its rooms
            assert listener.closed is not None
            when, code = listener.closed
            assert code == 1012 and when - cut_at < LEASE
        stored = {m["seq"]: m["message"] for m in await history(nodes[1], "room0")}
        assert listener.seen and all(stored.get(s) == t for s, t in listener.seen.items())
        # It serves again: a new client through it chats in a room it held before the cut.
        async with trio.open_nursery() as nursery:
            ws = await joined(nursery, owner.url, "room3", "back")
            await ws.send_message(json.dumps({"message": "back again"}))
            with trio.fail_after(5):
                assert (await next_chat(ws))["message"] == "back again"
            await ws.aclose()
