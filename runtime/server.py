"""Assemble a server: storage, host and edge, listening on a socket."""

from __future__ import annotations

import gc
import logging
import resource
import socket
from pathlib import Path

import trio

from rooms import App

from .config import Settings
from .edge import Edge
from .host import Host
from .metrics import Metrics
from .storage import SqliteBackend

log = logging.getLogger("rooms.server")


def database_path(settings: Settings) -> str:
    if settings.data_dir == ":memory:":
        return ":memory:"
    folder = Path(settings.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "rooms.sqlite3")


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
    backend = SqliteBackend(database_path(settings), settings.synchronous)
    metrics = Metrics()
    try:
        async with trio.open_nursery() as rooms_nursery:
            host = Host(backend, settings, metrics, rooms_nursery, app.room_classes())
            edge = Edge(app, settings, host, metrics)
            port: int = listener.getsockname()[1]
            scheme = "https" if settings.certfile else "http"
            log.info("serving on %s://%s:%d (data: %s)", scheme, settings.host, port, backend.path)
            rooms_nursery.start_soon(edge.serve, listener)
            task_status.started(port)
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown.wait()
            _close(listener)
            with trio.move_on_after(settings.drain_timeout) as drain:
                await edge.drain()
                for _ in range(int(settings.drain_timeout * 100) + 1):  # running events
                    if host.idle():
                        break
                    await trio.sleep(0.01)
            if drain.cancelled_caught:
                log.warning(
                    "drain_timeout (%g s) reached with %d WebSockets still open; stopping",
                    settings.drain_timeout,
                    metrics.websockets_open,
                )
            rooms_nursery.cancel_scope.cancel()
    finally:
        _close(listener)
        with trio.CancelScope(shield=True):
            await backend.aclose()
