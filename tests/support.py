"""Helpers the tests share: free ports, an in-process server on a real socket, a server
process, raw HTTP, metrics, a raw upgrade request and an app with upgrade-time rules."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from rooms import App
from runtime.config import Settings
from runtime.server import listen, serve
from runtime.storage import SqliteBackend

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started as processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def server_on(port: int, settings: Settings, application: App) -> AsyncIterator[None]:
    """A server on ``port`` for the block; leaving it drains (1012 to every client)."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        listener = listen("127.0.0.1", port)
        await nursery.start(partial(serve, shutdown=shutdown), application, settings, listener)
        yield
        shutdown.set()


async def start_server(nursery: trio.Nursery, app: App, settings: Settings) -> int:
    """Serve ``app`` in ``nursery`` on a free loopback port; return the port."""
    port: int = await nursery.start(serve, app, settings)
    return port


@contextmanager
def server(
    target: str,
    cwd: Path,
    data_dir: Path,
    *options: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m runtime.cli serve TARGET [OPTIONS]`` in ``cwd`` on ``port`` (default: a
    free one), with ``env`` added to the environment; always killed on the way out."""
    port = port or free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    command = [sys.executable, "-m", "runtime.cli", "serve", target, "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--log-level", "WARNING", *options]
    proc = subprocess.Popen(command, cwd=cwd, env=env)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_for_port(port: int, proc: subprocess.Popen[bytes], host: str = "127.0.0.1") -> None:
    with trio.fail_after(15):
        while True:
            assert proc.poll() is None, "the server exited while starting"
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def wait_for_port_sync(port: int, proc: subprocess.Popen[bytes]) -> None:
    """``wait_for_port`` outside trio, for fixtures shared by a module."""
    trio.run(wait_for_port, port, proc)


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


async def raw_request(
    port: int,
    data: bytes,
    read_timeout: float = 5.0,
    closes: bool = False,
    host: str = "127.0.0.1",
) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes (or
    ``read_timeout`` passes: a keep-alive or upgraded connection is then closed by us). With
    ``closes``, the server must close the connection itself within ``read_timeout``."""
    stream = await trio.open_tcp_stream(host, port)
    received = bytearray()
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)  # (the server may answer and close before reading all)
        with (
            trio.move_on_after(read_timeout) as waited,
            contextlib.suppress(trio.BrokenResourceError),
        ):
            while chunk := await stream.receive_some(65536):
                received += chunk
    if closes and waited.cancelled_caught:
        raise AssertionError(f"the server did not close the connection in {read_timeout} s")
    return bytes(received)


async def metric(port: int, name: str, host: str = "127.0.0.1", token: str = "") -> int:
    """The value of ``rooms_<name>`` at ``/_rooms/metrics`` of the server on ``port`` (at
    ``host``: from another host than loopback, with its ``admin_token``)."""
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    request = f"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    answer = await raw_request(port, request, 0.5, host=host)
    for line in answer.decode().splitlines():
        if line.startswith(f"rooms_{name} "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no metric {name}: {answer[:200]!r}")


KEY = base64.b64encode(os.urandom(16)).decode()


def upgrade(path: str, key: str = KEY, version: str = "13", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n"
    ).encode()


def guarded_app() -> Any:
    from rooms import App, Connection, HTTPError, Request, Room

    class Guarded(Room):
        allowed_origins = ("https://ok.example",)

        @classmethod
        async def on_before_connect(cls, request: Request) -> Any:
            token = request.query_param("token")
            if token == "boom":
                raise RuntimeError("a bug in the hook")
            if token != "secret":
                raise HTTPError(401, "a valid ?token= is required")
            return {"user": "ada"}

        async def on_connect(self, conn: Connection, request: Request) -> None:
            conn.send(repr(request.identity))

    class Open(Room):
        async def on_connect(self, conn: Connection, request: Request) -> None:
            conn.send("welcome")

    app = App()
    app.room("/guarded/{name}", Guarded)
    app.room("/open/{name}", Open)
    return app


class HeldCommits:
    """While active, the backend's commits are parked instead of run: nothing written is
    durable, so nothing sent after a write may reach anyone. ``release`` hands them on, in
    order. (A seam for the output gate's tests: ``with HeldCommits(backend) as held:``.)"""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._real = backend.commit
        self.parked: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __enter__(self) -> HeldCommits:
        self._backend.commit = lambda *args, **kwargs: self.parked.append((args, kwargs))
        return self

    def __exit__(self, *exc: object) -> None:
        self._backend.commit = self._real
        self.release()

    def release(self) -> None:
        parked, self.parked = self.parked, []
        for args, kwargs in parked:
            self._real(*args, **kwargs)

    async def wait_for(self, count: int) -> None:
        """Until ``count`` commits are parked (a room reads storage before it writes)."""
        with trio.fail_after(5):
            while len(self.parked) < count:  # noqa: ASYNC110 - the backend has no event
                await trio.sleep(0.001)


class PausedCommit:
    """Pauses the SQLite writer when it is about to ``COMMIT`` a transaction that wrote
    (after the writes, before they are durable), until ``resume``: an acknowledgement
    released meanwhile would be released before its write is durable. (Reads run in
    transactions too: those pass.) A fault of the writer's (``pause_commit``), in effect
    for everything queued after ``install``."""

    def __init__(self) -> None:
        self._backend: SqliteBackend | None = None
        self._reached: trio.Event | None = None

    async def install(self, backend: Any) -> None:
        assert isinstance(backend, SqliteBackend)
        self._backend, self._reached = backend, backend.fault("pause_commit")

    async def wait_reached(self) -> None:
        assert self._reached is not None
        with trio.fail_after(5):
            await self._reached.wait()

    def resume(self) -> None:
        assert self._backend is not None
        self._backend.release()


# -- PostgreSQL (cluster mode) --------------------------------------------------------------

POSTGRES = os.environ.get("ROOMS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
"""The server the cluster tests use: each test gets a database of its own on it."""


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on ``POSTGRES`` (its DSN), dropped afterwards."""
    import psycopg

    name = f"rooms_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Holder:
    """A node as the PostgreSQL backend sees it (``node_id``) for tests of the backend alone;
    ``hold`` makes it the owner of rooms, at an epoch."""

    def __init__(self, dsn: str, node_id: str = "node-a") -> None:
        self.dsn = dsn
        self.node_id = node_id
        self.epochs: dict[str, int] = {}

    def hold(self, room: str, epoch: int = 1) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO rooms_owners (room, node_id, epoch, claimed_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT (room) DO UPDATE "
                "SET node_id = excluded.node_id, epoch = excluded.epoch",
                (room, self.node_id, epoch),
            )
        self.epochs[room] = epoch


class Node:
    """One node of a cluster as a process: ``rooms serve APP --cluster DSN`` on its own
    port, its log in ``log``, reached by the test at ``host``; ``options`` are added to its
    command line, which runs after ``prefix`` (``ip netns exec NAME``, say). Killed on
    ``close``."""

    def __init__(
        self,
        dsn: str,
        app: str,
        port: int,
        log: Path,
        env: dict[str, str],
        host: str = "127.0.0.1",
        options: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        self.dsn, self.app, self.port, self.log, self.env = dsn, app, port, log, env
        self.host, self.options, self.prefix = host, list(options), list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> None:
        command = [*self.prefix, sys.executable, "-m", "runtime.cli", "serve", self.app]
        command += ["--port", str(self.port), "--cluster", self.dsn, "--log-level", "INFO"]
        command += self.options
        env = {**self.env, "ROOMS_TEST_NODE": str(self.port)}  # (cluster_app.py reports it)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=log)

    async def ready(self) -> None:
        assert self.proc is not None
        await wait_for_port(self.port, self.proc, self.host)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill_9(self) -> None:
        assert self.proc is not None
        kill_9(self.proc)

    async def stop(self) -> int:
        """SIGTERM (a drain), and its exit code."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        code: int = await trio.to_thread.run_sync(self.proc.wait, 30)
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def node_env(**env: str) -> dict[str, str]:
    """The environment of a node process: this one's, the checkout importable, the
    cluster's token set, and ``env``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "ROOMS_CLUSTER_TOKEN": "test-token",
        **env,
    }


@asynccontextmanager
async def cluster_of(
    dsn: str, count: int, logs: Path, app: str = "examples.chat.app:app", **env: str
) -> AsyncIterator[list[Node]]:
    """``count`` nodes of ``app`` on ``dsn``, started and ready; ``env`` for their process
    (the cluster's token is set)."""
    environ = node_env(**env)
    nodes = [Node(dsn, app, free_port(), logs / f"node-{i}.log", environ) for i in range(count)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.ready()
        yield nodes
    finally:
        for node in nodes:
            node.close()


PG_BIN = (
    Path("/usr/lib/postgresql")
    / (
        sorted(os.listdir("/usr/lib/postgresql"))[-1]
        if Path("/usr/lib/postgresql").is_dir()
        else "?"
    )
    / "bin"
)


class PrivatePostgres:
    """A PostgreSQL server of one test's own, to restart and stop under load without touching
    the shared one: ``initdb`` in a temporary folder (trust authentication; removed at the
    end) and ``pg_ctl``, run as the ``postgres`` user (PostgreSQL refuses to run as root), on
    a free port, on loopback and on each of ``also_on`` (a host address of a namespace's
    link: the clients of the link's /30 are let in)."""

    def __init__(self, also_on: Sequence[str] = ()) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="rooms-postgres-"))  # (postgres reaches it)
        self.port = free_port()
        self.addresses = ["127.0.0.1", *also_on]
        self.dsn = self.dsn_at("127.0.0.1")

    def dsn_at(self, address: str) -> str:
        return f"postgresql://postgres@{address}:{self.port}/postgres"

    @staticmethod
    def available() -> str | None:
        """Why it cannot run here, or None."""
        if not (PG_BIN / "initdb").exists():
            return f"no PostgreSQL server binaries in {PG_BIN}"
        if os.geteuid() != 0:
            return "a private PostgreSQL runs as the postgres user: run the tests as root"
        return None

    def _pg_ctl(self, *args: str) -> None:
        listen = ",".join(self.addresses)
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={listen}"
        command = [str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "db"), "-w", "-t", "30"]
        command += ["-l", str(self.folder / "postgres.log"), "-o", options, *args]
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command], check=True, stdout=subprocess.DEVNULL
        )

    def __enter__(self) -> PrivatePostgres:
        os.chown(self.folder, *_postgres_ids())
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.folder / "db"), "-A", "trust"]
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *initdb, "-U", "postgres"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(self.folder / "db" / "pg_hba.conf", "a") as hba:
            for address in self.addresses[1:]:
                network = ipaddress.ip_interface(f"{address}/30").network
                hba.write(f"host all all {network} trust\n")
        self._pg_ctl("start")
        return self

    def restart(self, mode: str) -> None:
        """Stop the server with ``mode`` (``fast``: clients are disconnected, transactions
        rolled back; ``immediate``: as a crash, recovery at the next start), then start it."""
        self._pg_ctl("-m", mode, "stop")
        self._pg_ctl("start")

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


class Namespace:
    """A network namespace of one test's own (root only), joined to this one by veth links,
    each a /30 of its own: ``link()`` makes one and returns its two addresses (here, inside);
    ``cut`` takes the inside end of links down (a pulled cable: packets from either side
    are lost, nothing is refused) and ``heal`` brings them up. ``prefix`` runs a command
    inside. On exit its processes are killed and it is deleted, links and all, even when
    the test failed; namespaces a killed test run left behind go at the next start."""

    def __init__(self) -> None:
        self.tag = os.getpid() % 100_000  # (veth names are 15 characters at most)
        self.name = f"rooms-test-{os.getpid()}"
        self.prefix = ["ip", "netns", "exec", self.name]
        self.links: list[str] = []  # the inside ends' names

    @staticmethod
    def available() -> str | None:
        """Why it cannot run here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root: run the tests as root"
        if shutil.which("ip") is None:
            return "no ip command (Debian's iproute2)"
        return None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def __enter__(self) -> Namespace:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith("rooms-test-") and not _alive(int(name.rsplit("-", 1)[1])):
                self._delete(name)  # (a killed run's)
        self._ip("netns", "add", self.name)
        self._ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def link(self) -> tuple[str, str]:
        index = len(self.links)
        base = ipaddress.ip_address(f"10.231.{self.tag % 256}.0") + 4 * index
        here, inside = str(base + 1), str(base + 2)
        outer, inner = f"rt{self.tag}h{index}", f"rt{self.tag}n{index}"
        self._ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", self.name)
        self._ip("addr", "add", f"{here}/30", "dev", outer)
        self._ip("link", "set", outer, "up")
        self._ip("-n", self.name, "addr", "add", f"{inside}/30", "dev", inner)
        self._ip("-n", self.name, "link", "set", inner, "up")
        self.links.append(inner)
        return here, inside

    def cut(self, *indexes: int) -> None:
        for index in indexes:
            self._ip("-n", self.name, "link", "set", self.links[index], "down")

    def heal(self, *indexes: int) -> None:
        for index in indexes:
            self._ip("-n", self.name, "link", "set", self.links[index], "up")

    @staticmethod
    def _delete(name: str) -> None:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def __exit__(self, *exc: object) -> None:
        self._delete(self.name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
