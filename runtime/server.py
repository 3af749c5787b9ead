"""Assemble a server: storage, host and edge (``run_engine``), listening on a socket.

Embedded mode (the default): SQLite under ``data_dir``, every room in this process. Cluster
mode (``cluster`` set): this process is one node; the cluster (``runtime.cluster``) says which
rooms it holds, PostgreSQL stores every node's rooms (``runtime.postgres``), and the links
reach the rooms of the other nodes (``runtime.link``). psycopg is imported in cluster mode
only: it is an optional extra.
"""

from __future__ import annotations

import functools
import gc
import logging
import resource
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from rooms import App

from .config import ConfigError, Settings
from .edge import Edge
from .host import Host
from .metrics import Metrics
from .outlink import Links
from .storage import Backend, PgBackend, SqliteBackend

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("rooms.server")

_LAG_EVERY = 0.1  # seconds between looks at the event loop's lag
_LAG_LOGGED = 1.0  # a lag this long is logged


async def watch_loop_lag(metrics: Metrics) -> None:
    """How late the event loop wakes a task that sleeps a tenth of a second, into
    ``loop_lag_seconds``. A second or more is logged: something blocked the loop (in a
    cluster, a lag near the lease fences the node)."""
    while True:
        asleep = trio.current_time()
        await trio.sleep(_LAG_EVERY)
        lag = max(0.0, trio.current_time() - asleep - _LAG_EVERY)
        metrics.loop_lag_seconds.observe(lag)
        if lag >= _LAG_LOGGED:
            log.warning(
                "the event loop was blocked for %.1f s: every room and connection of this "
                "process waited (look for blocking calls in room code, or an overloaded "
                "machine)",
                lag,
            )


def database_path(settings: Settings) -> str:
    """The SQLite database file under ``data_dir`` (":memory:" for none)."""
    if settings.data_dir == ":memory:":
        return ":memory:"
    return str(Path(settings.data_dir) / "rooms.sqlite3")


def prepare_data_dir(settings: Settings) -> None:
    """Create ``data_dir`` if needed; ConfigError naming the setting and the folder if it
    cannot be (checked before serving, so the error is one line)."""
    if settings.data_dir == ":memory:":
        return
    folder = Path(settings.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"setting 'data_dir': cannot create the folder {str(folder)!r}: {exc.strerror}"
        ) from None


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _close(listener: socket.socket) -> None:
    if listener.fileno() != -1:
        trio.lowlevel.notify_closing(listener)
        listener.close()


def tune_process() -> None:
    """Allow many open sockets, and collect garbage less often: a server with thousands of
    long-lived connection objects otherwise spends a large share of its time in the GC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gc.set_threshold(50_000, 20, 100)


async def run_engine(
    app: App,
    settings: Settings,
    backend: Backend,
    metrics: Metrics,
    listener: socket.socket | None = None,
    *,
    cluster: Cluster | None = None,
    task_status: trio.TaskStatus[Edge] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The engine of one server: a host for ``app``'s rooms over ``backend`` and the edge in
    front of it (accepting on ``listener``, if given), until cancelled;
    ``task_status.started`` gets the edge (``edge.host`` is the host). ``serve`` runs it
    behind a listener, ``runtime.local`` in process for the test harness (again over the
    same backend to simulate a restart): one assembly for both. Connections and rooms share
    one nursery, so a connection ending during shutdown can still tell its room. With
    ``cluster`` (started), this engine is that node of a cluster."""
    edge: Edge | None = None
    host: Host | None = None
    try:
        async with trio.open_nursery() as nursery:
            host = Host(backend, settings, metrics, nursery, app.room_classes(), cluster)
            backend.answered.append(host.flush_released)
            links = None
            if cluster is not None:
                token, queue = settings.cluster_token, settings.max_link_queue_bytes
                links = host.links = Links(cluster, token, queue, metrics)
                await nursery.start(links.run)
                cluster.on_fenced = lambda: host.fence_all("this node lost its cluster lease")
                cluster.on_node_dead = links.node_dead
                nursery.start_soon(cluster.run)
            edge = Edge(app, settings, host, metrics, links)
            if listener is not None:
                nursery.start_soon(edge.serve, listener)
                nursery.start_soon(watch_loop_lag, metrics)
            task_status.started(edge)
            await trio.sleep_forever()
    finally:
        if host is not None:
            backend.answered.remove(host.flush_released)  # (a restart reuses the backend)
        if edge is not None:
            edge.usage.close()


def open_backend(settings: Settings) -> SqliteBackend:
    """The storage backend the settings name (SQLite under ``data_dir``, created if needed)."""
    prepare_data_dir(settings)
    return SqliteBackend(database_path(settings), settings.synchronous)


async def serve(
    app: App,
    settings: Settings,
    listener: socket.socket | None = None,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled, or until ``shutdown`` is set and the server has
    drained; ``task_status.started`` gets the port listened on.

    Draining (a graceful restart): the listener closes, every WebSocket is closed with 1012
    after its room has answered what its client sent, and running events and storage
    commits finish, all within ``settings.drain_timeout``; then everything left is cancelled.
    ``listener`` is a bound, listening socket; by default one is opened on the settings'
    host and port."""
    if listener is None:
        listener = listen(settings.host, settings.port)
    metrics = Metrics()
    cluster: Cluster | None = None
    backend: Backend
    if settings.cluster:
        from .cluster import Cluster  # (psycopg: the optional extra)

        cluster = Cluster(settings, metrics)
        await cluster.start()
        backend = PgBackend(settings.cluster, cluster)
    else:
        backend = open_backend(settings)
    try:
        async with trio.open_nursery() as nursery:
            edge: Edge = await nursery.start(
                functools.partial(run_engine, cluster=cluster),
                app,
                settings,
                backend,
                metrics,
                listener,
            )
            port: int = listener.getsockname()[1]
            scheme = "https" if settings.certfile else "http"
            log.info("serving on %s://%s:%d (data: %s)", scheme, settings.host, port, backend.path)
            task_status.started(port)
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown.wait()
            _close(listener)
            with trio.move_on_after(settings.drain_timeout) as drain:
                await edge.drain()
                await edge.host.wait_idle()  # running events and their commits
                if cluster is not None:
                    await cluster.leave()  # the others take its rooms at once
            if drain.cancelled_caught:
                log.warning(
                    "drain_timeout (%g s) reached with %d WebSockets still open; stopping",
                    settings.drain_timeout,
                    metrics.websockets_open,
                )
            nursery.cancel_scope.cancel()
    finally:
        _close(listener)
        with trio.CancelScope(shield=True):
            await backend.aclose()
        if cluster is not None:
            cluster.close()
