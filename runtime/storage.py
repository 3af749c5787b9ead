"""Durable storage: the narrow interface every backend implements, the machinery the
backends share, and each room's view.

A backend (``SqliteBackend`` embedded, ``PgBackend`` in cluster mode) stores every
room's keys and alarm, commits a room's writes as one atomic batch and says when it is
durable. Their drivers block, so each runs in a writer process of its own
(``ProcessBackend``, ``runtime.writer``; on a thread of the server, SQLite's held up the
event loop at every statement): it takes everything queued as one transaction (group commit
across rooms), in queue order, so a read always sees every write the same room submitted
before it, and then wakes the rooms.
``RoomStorage`` is ``Room.storage``: reads through a per-activation cache, writes buffered
until the event ends, then handed to the backend as one commit (the output gate waits for it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    MutableSequence,
    Sequence,
)
from pathlib import Path
from typing import IO, Any, Protocol

import msgpack
import trio

from rooms._engine import decode, encode

from .config import ConfigError
from .writer import COMMIT, FENCED, FORGET, HOLD, READ, RELEASE, TEST, AlarmChange
from .writer import FencedError as FencedError
from .writer import StorageError as StorageError

log = logging.getLogger("rooms.storage")

Done = Callable[[BaseException | None], None]
ListResult = list[tuple[str, bytes]]
AlarmRows = list[tuple[str, float, str | None]]
"""Every stored alarm: (room, time, room name)."""
Size = tuple[int, int]
"""What a room has stored: (keys, bytes of its keys and values)."""


_IN_FLIGHT: trio.lowlevel.RunVar[list[int]] = trio.lowlevel.RunVar("rooms_storage_in_flight")


def jobs_in_flight() -> list[int]:
    """This trio run's count of storage jobs handed to a backend and not answered
    yet, as a one-item list every backend of the run updates: a test's virtual clock must not
    jump while the disk is still working (``rooms.testing.virtual_clock``)."""
    try:
        return _IN_FLIGHT.get()
    except LookupError:
        counter = [0]
        _IN_FLIGHT.set(counter)
        return counter


# ---------------------------------------------------------------------------------------
# A backend whose connection is in a writer process (``runtime.writer``)


class Pending:
    """A request sent to the writer and its answer (``answered``: its ``error``, a sentence,
    or its ``result``); a commit's is the handle a room's next commit names as ``after``."""

    __slots__ = ("answered", "counted", "deliver", "error", "id", "result")

    def __init__(self, id: int, deliver: Callable[[Pending], None]) -> None:
        self.id, self.deliver = id, deliver
        self.answered = False
        self.counted = False  # (in ``jobs_in_flight``: storage work, not a test's hold)
        self.error: str | None = None
        self.result: Any = None


class ProcessBackend:
    """The server's side of a writer process (see ``runtime.writer``): requests are packed
    and written to the writer's socket as the rooms make them (what does not fit goes with a
    task), and the answers of each batch are read by a task, which wakes the rooms and then
    calls ``answered``."""

    name = "storage"
    restart_after = 1.0
    """A writer that dies this many seconds after it started is not started again (it would
    only die again: a full disk, a bug)."""

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        keep_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._command = [sys.executable, "-m", module, "FD", *args]
        self._keep_fds = tuple(keep_fds)
        self._env = {**os.environ, **(env or {}), "PYTHONPATH": _importable_from()}
        self._packer = msgpack.Packer(use_bin_type=True)
        self._token = trio.lowlevel.current_trio_token()
        self._in_flight = jobs_in_flight()
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self._closed = False
        self._lost: str | None = None  # why there is no writer (it died, and again at once)
        self._started_at = 0.0
        self.answered: list[Callable[[], None]] = []
        self._start()

    def _start(self) -> None:
        """Start a writer process, wait until its database is open, and the tasks that
        talk to it."""
        ours, theirs = socket.socketpair()
        with theirs:
            command = [str(theirs.fileno()) if a == "FD" else a for a in self._command]
            self._proc = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(), *self._keep_fds),
                stdin=subprocess.DEVNULL,
                env=self._env,
            )
        self._started_at = time.monotonic()
        self._unpacker = msgpack.Unpacker(raw=False)
        try:
            info = self._opened(ours)
        except BaseException:
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise
        self.info: dict[str, Any] = info
        """What the writer reported once the database was open (SQLite: its pragmas)."""
        ours.setblocking(False)
        self._raw = ours
        self._sock = trio.socket.from_stdlib_socket(ours)
        self._out = bytearray()
        self._wake: trio.Event | None = None
        self._answers_done = trio.Event()
        name = f"rooms-{self.name}-writer-{self._proc.pid}"
        trio.lowlevel.spawn_system_task(self._send_requests, self._sock, name=name + "-requests")
        trio.lowlevel.spawn_system_task(self._read_answers, self._sock, name=name + "-answers")

    def _opened(self, sock: socket.socket) -> dict[str, Any]:
        """Wait for the writer's first answer: the database is open, or why not."""
        sock.settimeout(30)
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise StorageError(self._open_failed("its writer did not start in 30 s")) from None
            if not data:
                code = self._proc.wait()
                raise StorageError(self._open_failed(f"its writer exited ({code})"))
            self._unpacker.feed(data)
            for _, error, info in self._unpacker:
                if error is not None:
                    self._proc.wait()
                    raise StorageError(self._open_failed(error))
                result: dict[str, Any] = info
                return result

    def _open_failed(self, error: str) -> str:
        return f"cannot open the {self.name} database: {error}"

    # -- requests -----------------------------------------------------------------------

    def _send(self, kind: int, args: list[Any], deliver: Callable[[Pending], None]) -> Pending:
        if self._closed or self._lost:
            raise StorageError(self._lost or "storage is closed (the server is shutting down)")
        id, self._next_id = self._next_id, self._next_id + 1
        pending = Pending(id, deliver)
        try:
            packed = self._packer.pack([kind, id, *args])
        except Exception as exc:  # (a value or key no database takes: it fails alone)
            self._packer.reset()
            self._fail_soon(pending, f"{type(exc).__name__}: {exc}")
            return pending
        if kind not in (FORGET, RELEASE):  # (those two are never answered)
            self._pending[id] = pending
        if kind in (COMMIT, READ):
            pending.counted = True
            self._in_flight[0] += 1
        if not self._out:
            # Straight to the writer (one system call, cheaper than waking a task to send
            # the loop pass's requests together, and a loop pass sooner); what does not fit
            # in the socket's buffer goes with the request task.
            try:
                sent = self._raw.send(packed)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(packed)  # (the writer is gone: reading its answers says so)
            packed = packed[sent:]
            if not packed:
                return pending
        self._out += packed
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        return pending

    def _after_answers(self) -> None:
        """A run of answers is delivered: let the hosts flush what it released."""
        for callback in self.answered:
            callback()

    def _fail_soon(self, pending: Pending, error: str) -> None:
        """Answer ``pending`` with ``error`` without the writer, as it would: later."""
        pending.answered, pending.error = True, error
        self._in_flight[0] += 1

        def deliver() -> None:
            self._in_flight[0] -= 1
            pending.deliver(pending)
            self._after_answers()

        self._token.run_sync_soon(deliver)

    def commit(
        self,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        done: Done,
        alarm: AlarmChange | None = None,
        epoch: int | None = None,
        after: Any = None,
    ) -> Pending:
        def deliver(pending: Pending) -> None:
            error = pending.error
            if error is None:
                done(None)
            elif error.startswith(FENCED):
                done(FencedError(error.removeprefix(FENCED)))
            else:
                done(StorageError(f"commit failed: {error}"))

        fence = self._fence(room, epoch)
        after_id = 0
        if isinstance(after, Pending):
            if after.answered and after.error is not None:
                pending = Pending(0, deliver)
                self._fail_soon(pending, f"an earlier commit of this room failed ({after.error})")
                return pending
            after_id = 0 if after.answered else after.id
        alarm_ = None if alarm is None else list(alarm)
        return self._send(COMMIT, [room, writes, delete_all, alarm_, after_id, *fence], deliver)

    def _fence(self, room: str, epoch: int | None) -> list[Any]:
        """What a commit carries for fencing: (epoch, node id) in cluster mode."""
        return [None, None]

    async def _call(self, kind: int, args: list[Any]) -> Pending:
        finished = trio.Event()
        pending = self._send(kind, args, lambda _: finished.set())
        with trio.CancelScope(shield=True):
            # The writer will answer; leaving early would only orphan the answer.
            await finished.wait()
        return pending

    async def _read(self, what: str, *args: Any) -> Any:
        """The result of the store's read ``what``, in queue order."""
        pending = await self._call(READ, [what, list(args)])
        if pending.error is not None:
            raise StorageError(f"storage read failed: {pending.error}")
        return pending.result

    async def get_many(self, room: str, keys: list[str]) -> dict[str, bytes]:
        result: dict[str, bytes] = await self._read("get_many", room, keys)
        return result

    async def list(
        self,
        room: str,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> ListResult:
        rows = await self._read("list", room, prefix, start, end, reverse, limit)
        return [(key, value) for key, value in rows]

    async def get_alarm(self, room: str) -> float | None:
        at: float | None = await self._read("get_alarm", room)
        return at

    async def sizes(self, rooms: Sequence[str]) -> dict[str, Size]:
        found = await self._read("sizes", list(rooms))
        return {room: (keys, size) for room, (keys, size) in found.items()}

    async def alarms(self) -> AlarmRows:
        rows = await self._read("alarms")
        return [(room, at, name) for room, at, name in rows]

    # -- for tests ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """The writer starts no batch while in the body: what the body queues runs as one."""
        await self._call(HOLD, [])
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """End a hold, or a ``pause_commit`` fault."""
        if not (self._lost or self._closed):
            self._send(RELEASE, [], lambda _: None)

    def fault(self, what: str, args: Any = None) -> trio.Event:
        """Put a fault of the store in (``sqlite.SqliteStore.test``) for what is queued
        after; the event is set once it is in effect (a paused COMMIT: once reached)."""
        done = trio.Event()
        self._send(TEST, [what, args], lambda _: done.set())
        return done

    # -- the tasks ----------------------------------------------------------------------

    async def _send_requests(self, sock: trio.socket.SocketType) -> None:
        """Send what did not fit in the socket's buffer at once, until closed."""
        try:
            while True:
                while not self._out:
                    if self._closed or sock is not self._sock:
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                data, self._out = self._out, bytearray()
                view = memoryview(data)
                while view:
                    view = view[await sock.send(view) :]
        except OSError:
            pass  # (the writer is gone: reading its answers says so)
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # the writer finishes, then ends

    async def _read_answers(self, sock: trio.socket.SocketType) -> None:
        # (into one buffer: a recv(n) allocates n bytes each time before it shrinks them,
        # which fragmented the heap: the server's RSS grew by 25 MiB over 50,000 rooms)
        buffer = bytearray(1 << 16)
        try:
            while True:
                try:
                    size = await sock.recv_into(buffer)
                except OSError:
                    size = 0
                if not size:
                    break
                self._unpacker.feed(memoryview(buffer)[:size])
                failed = [
                    id for id, error, result in self._unpacker if self._answer(id, error, result)
                ]
                if failed:
                    self._send(FORGET, [failed], lambda _: None)
                self._after_answers()
        finally:
            self._answers_done.set()
            if not self._closed:
                self._writer_lost()

    def _writer_lost(self) -> None:
        """The writer died (killed, out of memory): everything in flight fails (its rooms
        restart from storage) and a new writer takes over, unless the last one had just
        started: then the server can store nothing until it is restarted."""
        proc = self._proc
        proc.kill()  # (if it only closed its end)
        code = proc.wait()
        why = f"the {self.name} writer process (pid {proc.pid}) ended unexpectedly ({code})"
        self._raw.close()
        if time.monotonic() - self._started_at < self.restart_after:
            self._lost = f"{why}, just after it started: restart the server"
        else:
            try:
                self._start()
            except StorageError as exc:
                self._lost = f"{why}, and no new one could start ({exc}): restart the server"
        then = "no new writer: this server can store nothing until it is restarted"
        if not self._lost:
            then = f"a new writer (pid {self._proc.pid}) took over"
        log.error("%s; %d requests in flight failed; %s", why, len(self._pending), then)
        pending, self._pending = self._pending, {}
        for one in pending.values():
            if one.counted:
                self._in_flight[0] -= 1
            one.answered, one.error = True, why
            one.deliver(one)
        self._after_answers()

    async def aclose(self) -> None:
        """Answer every queued request, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()  # (the request task sends what is left, then closes our end)
        elif not self._out:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        await self._answers_done.wait()
        await trio.to_thread.run_sync(self._proc.wait)
        self._sock.close()

    def _answer(self, id: int, error: str | None, result: Any) -> bool:
        """Deliver one answer; whether it is a failed commit's (the writer may forget it)."""
        if id == 0:  # (a log line of the writer's: its level, its message)
            log.log(logging.getLevelName(error or "ERROR"), "%s (the %s writer)", result, self.name)
            return False
        pending = self._pending.pop(id, None)
        if pending is None:
            return False
        if pending.counted:
            self._in_flight[0] -= 1
        pending.answered, pending.error, pending.result = True, error, result
        pending.deliver(pending)
        return error is not None


def _importable_from() -> str:
    """PYTHONPATH for a writer process: where this ``runtime`` package is, then the rest."""
    here = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


class SqliteBackend(ProcessBackend):
    """SQLite in WAL mode (``runtime.sqlite``), one file per server, behind its writer
    process. ``synchronous="NORMAL"`` (default) makes a commit survive the server being
    killed; ``"FULL"`` also survives power loss, at the cost of an fsync per transaction.
    ``path=":memory:"`` keeps everything in memory (tests)."""

    name = "sqlite"

    def __init__(self, path: str | Path, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = str(path)
        # The writer holds the claim too: it may finish a batch after a killed server.
        self._lock = None if self.path == ":memory:" else _lock(self.path + ".lock")
        keep = [] if self._lock is None else [self._lock.fileno()]
        try:
            super().__init__("runtime.sqlite", [self.path, synchronous.upper()], keep)
        except BaseException:
            self._unlock()
            raise

    def _open_failed(self, error: str) -> str:
        return f"cannot open the database {self.path!r}: {error}"

    async def aclose(self) -> None:
        await super().aclose()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (the lock goes with the last file descriptor)
            self._lock = None


class Node(Protocol):
    """The node whose commits a backend fences (``cluster.Cluster``)."""

    node_id: str


class PgBackend(ProcessBackend):
    """Cluster storage for this node (``runtime.postgres``) behind its writer process;
    ``directory``: whose ``node_id`` a commit's rooms must be held by (it changes when the
    node joins again)."""

    name = "postgres"

    def __init__(self, dsn: str, directory: Node) -> None:
        from .postgres import without_password  # (psycopg: cluster mode's optional extra)

        self.dsn = dsn
        self.directory = directory
        self.path = without_password(dsn)
        # (the DSN may hold a password: not on a command line other users can read)
        super().__init__("runtime.postgres", env={"ROOMS_CLUSTER_DSN": dsn})

    def _open_failed(self, error: str) -> str:
        return f"cannot use the cluster database {self.path}: {error}"

    def _fence(self, room: str, epoch: int | None) -> list[Any]:
        if epoch is None:
            raise StorageError(f"room {room}: a cluster commit needs the room's epoch")
        return [epoch, self.directory.node_id]

    async def alarms(self) -> AlarmRows:
        """The alarms of the rooms this node holds (the others fire where they live, or are
        claimed by whichever node finds them due: ``cluster.Cluster.due_alarms``)."""
        rows = await self._read("alarms", self.directory.node_id)
        return [(room, at, name) for room, at, name in rows]


def _lock(path: str, wait: float = 5.0) -> IO[str] | None:
    """This server's claim on a database: SQLite would let a second server open the file
    too, and both would then serve the same rooms. Released when the server and its writer
    have ended, however they end; a server started right after a killed one waits up to
    ``wait`` seconds for the old writer to finish its last batch."""
    try:
        file = open(path, "a+")  # noqa: SIM115 (held as long as the backend)
    except OSError:
        return None  # (no such folder: opening the database says so)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        folder = os.path.dirname(path) or "."
        raise ConfigError(
            f"setting 'data_dir': {folder!r} is in use by another rooms server ({holder} holds "
            f"{path}); stop it, or give this server its own data_dir"
        ) from None
    file.truncate(0)
    file.write(f"pid {os.getpid()}\n")
    file.flush()
    return file


class Backend(Protocol):
    """The narrow interface every storage backend implements (``runtime.sqlite`` today)."""

    async def get_many(self, room: str, keys: list[str]) -> dict[str, bytes]: ...

    async def list(
        self,
        room: str,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> ListResult: ...

    def commit(
        self,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        done: Done,
        alarm: AlarmChange | None = None,
        epoch: int | None = None,
        after: Any = None,
    ) -> Any:
        """Queue an atomic batch; ``done(error)`` is called on the trio thread once durable.
        ``epoch``: the ownership epoch under which the room made the writes (cluster mode);
        a backend that fences refuses them with ``FencedError`` if the node no longer holds
        the room at that epoch. ``after``: what this returned for the room's previous commit
        (if that one fails, this one fails too, unwritten). Returns the commit's handle."""
        ...

    async def get_alarm(self, room: str) -> float | None: ...

    async def sizes(self, rooms: Sequence[str]) -> dict[str, Size]:
        """What each of ``rooms`` has stored (rooms with nothing stored are left out), for
        the operator; reads their rows, in the writer like every job."""
        ...

    async def alarms(self) -> AlarmRows:
        """Every stored alarm: (room, time, room name)."""
        ...

    @property
    def answered(self) -> MutableSequence[Callable[[], None]]:
        """Called after each run of answers is delivered (the host flushes what they
        released: one write per connection for all of them)."""
        ...

    async def aclose(self) -> None: ...


_ABSENT = None  # in the cache: known not to exist
_ENTRY_COST = 64  # bytes a cached entry costs beyond its key and value (the dict's, roughly)


class RoomStorage:
    """What ``Room.storage`` is: reads through a per-activation cache, writes buffered until
    the event ends (``commit``), then handed to the backend as one atomic commit."""

    __slots__ = (
        "_alarm",
        "_alarm_change",
        "_backend",
        "_cache",
        "_cache_bytes",
        "_cache_limit",
        "_deleted_all",
        "_dirty",
        "_epoch",
        "_last_commit",
        "_name",
        "_on_cache_full",
        "_on_first_write",
        "_room",
    )

    def __init__(
        self,
        backend: Backend,
        room: str,
        on_first_write: Callable[[], None],
        name: str | None = None,
        epoch: int | None = None,
        cache_bytes: int = 256 * 1024,
        on_cache_full: Callable[[], None] = lambda: None,
    ) -> None:
        self._backend = backend
        self._room = room
        self._epoch = epoch  # cluster mode: this node's claim on the room, checked at commit
        self._name = name  # the room's name, kept with its alarm to start it again
        self._on_first_write = on_first_write
        # What was read or written, for reads again: at most ``cache_bytes`` (keys, values
        # and an entry's overhead); past it, it starts over (``on_cache_full``).
        self._cache: dict[str, bytes | None] = {}
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._on_cache_full = on_cache_full
        self._dirty: dict[str, bytes | None] = {}
        self._deleted_all = False
        self._alarm: float | _Unknown | None = _UNKNOWN  # as stored (durable or on its way)
        self._alarm_change: AlarmChange | None = None  # this event's
        self._last_commit: Any = None  # (the backend's handle of the previous commit)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        found = await self.get_many([key])
        return found.get(key, default)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        result: dict[str, Any] = {}
        missing: list[str] = []
        for key in keys:
            _check_key(key)
            if key in self._dirty:
                raw = self._dirty[key]
            elif self._deleted_all:
                raw = None
            elif key in self._cache:
                raw = self._cache[key]
            else:
                missing.append(key)
                continue
            if raw is not None:
                result[key] = decode(raw)
        if missing:
            fetched = await self._backend.get_many(self._room, missing)
            self._remember({k: fetched.get(k, _ABSENT) for k in missing})
            for key in missing:
                # a write made by this event while the read was in flight wins
                raw = self._dirty.get(key, fetched.get(key)) if not self._deleted_all else None
                if raw is not None:
                    result[key] = decode(raw)
        return {k: result[k] for k in keys if k in result}

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Any]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        stored: dict[str, bytes | None] = {}
        if not self._deleted_all:
            # Pending deletes may remove fetched rows, so fetch enough to still fill `limit`.
            fetch_limit = None if limit is None else limit + len(self._dirty)
            rows = await self._backend.list(self._room, prefix, start, end, reverse, fetch_limit)
            stored.update(rows)
        for key, raw in self._dirty.items():
            if _in_range(key, prefix, start, end):
                stored[key] = raw
        keys = sorted((k for k, v in stored.items() if v is not None), reverse=reverse)
        if limit is not None:
            keys = keys[:limit]
        return {k: decode(stored[k]) for k in keys if stored[k] is not None}  # type: ignore[arg-type]

    # -- writes ---------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        _check_key(key)
        self._write(key, encode(value, f"the value for key {key!r}"))

    def put_many(self, entries: dict[str, Any]) -> None:
        encoded = {}
        for key, value in entries.items():
            _check_key(key)
            encoded[key] = encode(value, f"the value for key {key!r}")
        for key, raw in encoded.items():
            self._write(key, raw)

    def delete(self, key: str) -> None:
        _check_key(key)
        self._write(key, None)

    def delete_all(self) -> None:
        self._will_write()
        self._dirty.clear()
        self._deleted_all = True

    def _write(self, key: str, raw: bytes | None) -> None:
        self._will_write()
        self._dirty[key] = raw

    def _will_write(self) -> None:
        """Called before each write: the event's first one tells the host (output gate)."""
        if not self.has_writes:
            self._on_first_write()

    # -- the alarm ------------------------------------------------------------------------

    async def get_alarm(self) -> float | None:
        if self._alarm_change is not None:
            return self._alarm_change[0]
        if isinstance(self._alarm, _Unknown):
            self._alarm = await self._backend.get_alarm(self._room)
        return self._alarm

    def set_alarm(self, at: float) -> None:
        self._will_write()
        self._alarm_change = (float(at), self._name)

    def delete_alarm(self) -> None:
        self._will_write()
        self._alarm_change = (None, None)

    @property
    def alarm_change(self) -> AlarmChange | None:
        """What this event did to the alarm (None: nothing), until it commits."""
        return self._alarm_change

    # -- for the host ---------------------------------------------------------------------

    @property
    def has_writes(self) -> bool:
        return bool(self._dirty) or self._deleted_all or self._alarm_change is not None

    def commit(self, done: Done) -> None:
        """Hand this event's writes to the backend as one atomic batch."""
        writes, deleted_all, alarm = self._dirty, self._deleted_all, self._alarm_change
        self._dirty, self._deleted_all, self._alarm_change = {}, False, None
        if deleted_all:
            self._forget_cache()
        self._remember(writes)
        if alarm is not None:
            self._alarm = alarm[0]
        self._last_commit = self._backend.commit(
            self._room, writes, deleted_all, done, alarm, epoch=self._epoch, after=self._last_commit
        )

    def rollback(self) -> None:
        """Forget this event's writes and everything cached (the room restarts, from what is
        stored: its next commit depends on none before)."""
        self._last_commit = None
        self._dirty.clear()
        self._deleted_all = False
        self._forget_cache()
        self._alarm, self._alarm_change = _UNKNOWN, None

    def _remember(self, entries: Mapping[str, bytes | None]) -> None:
        cache = self._cache
        for key, raw in entries.items():
            if key in cache:
                self._cache_bytes -= _cost(key, cache[key])
            cost = _cost(key, raw)
            if self._cache_bytes + cost > self._cache_limit:
                self._forget_cache()  # (the newest entry is kept: it is read next, likely)
                self._on_cache_full()
            cache[key] = raw
            self._cache_bytes += cost

    def _forget_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0


def _cost(key: str, raw: bytes | None) -> int:
    return len(key) + (0 if raw is None else len(raw)) + _ENTRY_COST


class _Unknown:
    """Not read from the backend yet."""


_UNKNOWN = _Unknown()


MAX_KEY_BYTES = 2048
"""A storage key's bound (UTF-8), in both backends: PostgreSQL's indexes take no more than
about 2.7 KB per entry; Durable Objects have the same 2 KiB."""


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__} ({key!r})")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ValueError(f"storage key {key!r} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"storage key {key[:40]!r}... is {size} bytes in UTF-8; keys are at most "
            f"{MAX_KEY_BYTES}: store long names in the value, under a shorter key"
        )


def _in_range(key: str, prefix: str | None, start: str | None, end: str | None) -> bool:
    return (
        (prefix is None or key.startswith(prefix))
        and (start is None or key >= start)
        and (end is None or key < end)
    )
