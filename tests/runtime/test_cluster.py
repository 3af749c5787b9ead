"""The cluster's control plane against a real PostgreSQL: nodes (``runtime.cluster.Cluster``
objects, several in one process here) claim rooms, renew leases, find dead nodes and fence
themselves. The data path across nodes is in tests/system/test_cluster.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import psycopg
import trio

from runtime.cluster import Cluster, status
from runtime.config import Settings
from runtime.metrics import Metrics

LEASE = 1.5


def node(dsn: str, port: int) -> Cluster:
    settings = Settings(port=port, cluster=dsn, cluster_token="t", cluster_lease_seconds=LEASE)
    return Cluster(settings, Metrics())


@asynccontextmanager
async def running(*nodes: Cluster, renew: bool = True) -> AsyncIterator[trio.Nursery]:
    """The nodes started (their leases renewed, dead nodes looked for, unless not
    ``renew``), and closed afterwards."""
    try:
        async with trio.open_nursery() as nursery:
            for each in nodes:
                await each.start()
                if renew:
                    nursery.start_soon(each.run)
            yield nursery
            nursery.cancel_scope.cancel()
    finally:
        for each in nodes:
            each.close()


async def until(condition: Callable[[], bool], timeout: float) -> float:
    """Wait for ``condition``; how long it took."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - the state is in another object's hands
            await trio.sleep(0.01)
    return trio.current_time() - started


async def test_first_events_through_three_nodes_at_once_give_the_room_one_owner(
    pg_dsn: str,
) -> None:
    nodes = [node(pg_dsn, 9001 + i) for i in range(3)]
    async with running(*nodes):
        found = []

        async def locate(each: Cluster) -> None:
            found.append(await each.locate("Chat/new-room"))

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(locate, nodes[i % 3])
        assert len(set(found)) == 1  # every node agrees: one node, one epoch
        owner = found[0]
        assert owner.epoch == 1
        assert [n.node_id for n in nodes if "Chat/new-room" in n.epochs] == [owner.node_id]
        assert sum(n.metrics.cluster_claims_total for n in nodes) == 1


async def test_a_node_whose_lease_ran_out_is_declared_dead_and_its_rooms_claimed_again(
    pg_dsn: str,
) -> None:
    silent, other = node(pg_dsn, 9001), node(pg_dsn, 9002)
    dead: list[str] = []
    other.on_node_dead = dead.append
    async with running(silent, renew=False), running(other):
        first = await silent.locate("Chat/r")
        assert first.node_id == silent.node_id
        assert (await other.locate("Chat/r")) == first  # while its lease lasts
        waited = await until(lambda: dead == [silent.node_id], 2 * LEASE + 1)
        assert waited < LEASE + 1  # judged by the database's clock: the lease, then a look
        assert other.metrics.cluster_dead_nodes_total == 1
        taken = await other.locate("Chat/r")
        assert (taken.node_id, taken.epoch) == (other.node_id, 2)
        # The silent node learns it at its next renewal: it stops serving, joins again.
        fenced: list[bool] = []
        silent.on_fenced = lambda: fenced.append(True)
        old_id = silent.node_id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(silent.run)
            await until(lambda: silent.node_id != old_id and silent.registered, 3 * LEASE)
            nursery.cancel_scope.cancel()
        assert fenced == [True] and silent.epochs == {}
        assert (await silent.locate("Chat/r")).node_id == other.node_id


async def test_a_node_cut_off_from_the_database_fences_itself_before_anyone_may_take_over(
    pg_dsn: str,
) -> None:
    async with trio.open_nursery() as nursery:
        info = psycopg.conninfo.conninfo_to_dict(pg_dsn)
        proxy = Cuttable(str(info.get("host", "127.0.0.1")), int(str(info.get("port", 5432))))
        port = await nursery.start(proxy.serve)
        cut_dsn = psycopg.conninfo.make_conninfo(pg_dsn, host="127.0.0.1", port=port)
        cut_off, other = node(cut_dsn, 9001), node(pg_dsn, 9002)
        fenced_at: list[float] = []
        cut_off.on_fenced = lambda: fenced_at.append(trio.current_time())
        async with running(cut_off, other):
            await cut_off.locate("Chat/r")
            await trio.sleep(LEASE / 2)
            proxy.cut()
            cut_at = trio.current_time()
            dead: list[str] = []
            other.on_node_dead = dead.append
            await until(lambda: bool(dead), 3 * LEASE)
            declared_at = trio.current_time()
            taken = await other.locate("Chat/r")
        nursery.cancel_scope.cancel()
    assert taken.node_id == other.node_id and taken.epoch == 2
    assert fenced_at, "the cut-off node never fenced itself"
    assert cut_at < fenced_at[0] < declared_at  # it stopped before the others could start
    assert cut_off.metrics.cluster_self_fences_total == 1


async def test_a_node_whose_database_session_is_gone_is_dead_as_soon_as_its_link_breaks(
    pg_dsn: str,
) -> None:
    alive, gone, other = node(pg_dsn, 9001), node(pg_dsn, 9002), node(pg_dsn, 9003)
    async with running(alive, gone, other):
        await gone.locate("Chat/r")
        await other.link_lost(alive.node_id)  # its session still holds its lock: alive
        assert other.metrics.cluster_dead_nodes_total == 0
        gone.close()  # (what a kill -9 does to its sessions)
        with trio.fail_after(LEASE / 2):  # no wait for the lease
            await other.link_lost(gone.node_id)
        assert other.metrics.cluster_dead_nodes_total == 1
        assert (await other.locate("Chat/r")).node_id == other.node_id


async def test_a_node_that_leaves_gives_its_rooms_back_at_once(pg_dsn: str) -> None:
    leaving, other = node(pg_dsn, 9001), node(pg_dsn, 9002)
    async with running(leaving, other):
        await leaving.locate("Chat/a")
        await leaving.locate("Chat/b")
        report = status(pg_dsn)
        assert {n["node"]: n["rooms"] for n in report["nodes"]} == {
            leaving.node_id: 2,
            other.node_id: 0,
        }
        with trio.fail_after(1):
            await leaving.leave()
            taken = await other.locate("Chat/a")
        assert (taken.node_id, taken.epoch) == (other.node_id, 2)
        states = {n["node"]: n["status"] for n in status(pg_dsn)["nodes"]}
        assert states == {leaving.node_id: "left", other.node_id: "alive"}


class Cuttable:
    """A TCP relay to PostgreSQL that can be cut: bytes stop flowing both ways but the
    sockets stay open (a partition, not a refused connection)."""

    def __init__(self, host: str, port: int) -> None:
        self._to = (host, port)
        self._flowing = True
        self._cut = trio.Event()

    def cut(self) -> None:
        self._flowing = False
        self._cut.set()

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self._to)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server)
            nursery.start_soon(self._pipe, server, client)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while self._flowing:
            data = await source.receive_some(65536)
            if not data or not self._flowing:
                break
            await sink.send_all(data)
        await trio.sleep_forever()  # cut: hold the sockets, pass nothing
