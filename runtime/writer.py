"""The storage writer: a backend's database connection in a process of its own.

Why a process: the database drivers block, so they cannot run on the event loop, and on a
thread of the server they share its interpreter lock. SQLite's driver gives the lock up around
every statement and takes it back after, so each statement made the event loop wait for the
lock (and, on a busy machine, for a core): on the chat's data path at 100 rooms, commits took
a few milliseconds but messages 14-50 ms (``docs/performance.md``). Here the server only
packs requests and unpacks answers.

The server (``storage.ProcessBackend``) and this process speak msgpack over a socket pair:
requests in the order the rooms made them, answers after each batch. Everything queued when a
batch starts runs as one transaction, in queue order (group commit across rooms; a read sees
every write queued before it), and each run of consecutive commits is written as a few
statements (``Merged``). If anything in a batch fails, the batch runs again with each request
in its own savepoint, so that the bad one fails alone. A commit made on top of the same room's
previous one (``after``) fails, unwritten, if that one failed: the room restarts from what is
stored, and must not find a gap. The process ends when the server closes its end (after
answering what it was sent), and dies with the server: a ``kill -9`` of the server leaves it
nothing to read.

No trio here, so that the process starts in about 30 ms: ``python -m runtime.sqlite``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import msgpack

# Requests: [kind, id, ...]; answers: [id, error or None, result], and log lines (``_ToServer``).
COMMIT = 0  # room, writes {key: value or None}, delete_all, alarm [at, name] or None,
# the id of the room's previous commit if in flight (or 0), and in cluster mode the epoch
# the room is held at and this node's id (or None, None)
READ = 1  # what (a store's read), its arguments
FORGET = 2  # ids of failed commits the server knows the outcome of (none may name them now)
HOLD = 3  # start no batch until RELEASE (answered at once; tests: a batch of what follows)
RELEASE = 4
TEST = 5  # a fault for tests: what, its arguments (answered once in effect; see Writer._take)

BATCH_MAX = 1024
"""Requests per transaction: bounds the latency of the first one in a batch."""

FENCED = "fenced: "
"""How a commit's error starts when its node no longer holds the room at its epoch."""

AlarmChange = tuple[float | None, str | None]
"""An event's change to its room's alarm: (time, room name) to set it, (None, None) to delete."""
Held = tuple[str, int | None]
"""A commit's (room, epoch): in cluster mode a stale epoch's writes are dropped whole."""


class StorageError(RuntimeError):
    """The storage backend failed (disk full, corrupt file, closed)."""


class FencedError(StorageError):
    """The node no longer holds the room at the epoch of these writes (another node took it
    over): nothing was written, and nothing that waited on them may go out."""


class Commit:
    """One room's commit: what its event wrote, under the epoch it held the room at, as
    which node (cluster mode)."""

    __slots__ = ("alarm", "delete_all", "epoch", "node", "room", "writes")

    def __init__(
        self,
        room: str,
        writes: Mapping[str, bytes | None],
        delete_all: bool,
        alarm: AlarmChange | None,
        epoch: int | None = None,
        node: str | None = None,
    ) -> None:
        self.room, self.epoch, self.node = room, epoch, node
        self.writes, self.delete_all, self.alarm = writes, delete_all, alarm


class Merged:
    """What a run of commits ends as, applied in their order: each key of each (room, epoch)
    ends put or deleted (``keys``, None: deleted), rooms ``wiped`` first by delete_all lose
    the keys they do not put again, and each alarm ends set or cleared. A backend writes it
    with a few statements whatever the number of commits: per statement, a driver costs more
    than the database does."""

    __slots__ = ("alarms", "keys", "wiped")

    def __init__(self, commits: Iterable[Commit]) -> None:
        self.wiped: set[Held] = set()
        self.keys: dict[Held, dict[str, bytes | None]] = {}
        self.alarms: dict[Held, AlarmChange] = {}
        for commit in commits:
            room = (commit.room, commit.epoch)
            if commit.delete_all:
                self.wiped.add(room)
                self.keys[room] = {}
            keys = self.keys.get(room)
            if keys is None:
                keys = self.keys[room] = {}
            keys.update(commit.writes)
            if commit.alarm is not None:
                self.alarms[room] = commit.alarm

    def puts(self) -> list[tuple[str, str, bytes, int | None]]:
        """(room, key, value, epoch) of every key put."""
        return [
            (room, key, value, epoch)
            for (room, epoch), keys in self.keys.items()
            for key, value in keys.items()
            if value is not None
        ]

    def deletes(self) -> list[tuple[str, str, int | None]]:
        """(room, key, epoch) of every key deleted (a wiped room's are gone with the wipe)."""
        return [
            (room, key, epoch)
            for (room, epoch), keys in self.keys.items()
            if (room, epoch) not in self.wiped
            for key, value in keys.items()
            if value is None
        ]


class Job:
    """One request of a batch: a commit, or a read (``what``, ``args``); a store sets its
    ``result`` or its ``error`` (a sentence for the server)."""

    __slots__ = ("after", "args", "commit", "error", "id", "result", "what")

    def __init__(
        self, id: int, commit: Commit | None, what: str = "", args: Any = (), after: int = 0
    ) -> None:
        self.id, self.commit, self.what, self.args, self.after = id, commit, what, args, after
        self.result: Any = None
        self.error: str | None = None


def runs(batch: list[Job]) -> Iterator[list[Job]]:
    """``batch`` as runs of consecutive commits and single reads, in order."""
    run: list[Job] = []
    for job in batch:
        if run and (job.commit is None or run[-1].commit is None):
            yield run
            run = []
        run.append(job)
    if run:
        yield run


class Store(Protocol):
    """A database as the writer runs it."""

    info: dict[str, Any]
    """What the server is told once the database is open (its settings, as it reports them)."""

    def run_batch(
        self,
        batch: list[Job],
        failed: Callable[[Job], str | None],
        before_commit: Callable[[bool], None],
    ) -> None:
        """Run ``batch`` as one transaction, setting each job's result or error; a commit
        for which ``failed`` gives a reason must fail with it, unwritten. ``before_commit``
        (whether the transaction wrote) right before it commits."""
        ...

    def test(self, what: str, args: Any) -> None:
        """Put a store's own fault in, for a test."""
        ...

    def close(self) -> None: ...


class Writer:
    """The loop of the process (see the module's docstring)."""

    def __init__(self, sock: socket.socket, store: Store) -> None:
        self.sock = sock
        self.store = store
        self._unpacker = msgpack.Unpacker(raw=False)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._sending = threading.Lock()
        self._buffer = bytearray(1 << 16)
        self._queued: list[Job] = []
        self._forget: list[int] = []
        self._failed: dict[int, str] = {}  # failed commits a later one may still name
        self._running: dict[int, Job] = {}  # the running batch's commits
        self._held = False
        self._eof = False
        self._pause: int | None = None  # the request (``pause_commit``) to answer when paused

    def run(self) -> None:
        self.answer([[0, None, self.store.info]])
        while True:
            self._read(wait=not self._queued or self._held)
            if self._eof and (self._held or not self._queued):
                return
            if not self._held and self._queued:
                self._run_batch()

    def answer(self, answers: list[list[Any]]) -> None:
        with self._sending:  # (log lines may come from another thread: the checkpointer's)
            pack = self._packer.pack
            self.sock.sendall(b"".join(pack(one) for one in answers))

    def before_commit(self, wrote: bool) -> None:
        """A test's ``pause_commit``: a transaction that wrote waits right before its COMMIT
        (reading, and queueing what comes) until the server's RELEASE."""
        if not wrote or self._pause is None:
            return
        self.answer([[self._pause, None, None]])
        self._held = True
        while self._held and not self._eof:
            self._read(wait=True)

    def _run_batch(self) -> None:
        batch, self._queued = self._queued[:BATCH_MAX], self._queued[BATCH_MAX:]
        self._running = {job.id: job for job in batch if job.commit is not None}
        self.store.run_batch(batch, self._failed_before, self.before_commit)
        self._running = {}
        for job in batch:
            if job.commit is not None and job.error is not None:
                self._failed[job.id] = job.error
        if not self._queued:  # (a request sent before a FORGET may still name its ids)
            for id in self._forget:
                self._failed.pop(id, None)
            self._forget.clear()
        self.answer([[job.id, job.error, job.result] for job in batch])

    def _failed_before(self, job: Job) -> str | None:
        if not job.after:
            return None
        earlier = self._failed.get(job.after)
        if earlier is None:
            before = self._running.get(job.after)  # (the same batch's)
            earlier = None if before is None else before.error
        if earlier is None:
            return None
        return f"an earlier commit of this room failed ({earlier})"

    def _read(self, wait: bool) -> None:
        """Take in what the server sent: everything there is, waiting for some if ``wait``."""
        while not self._eof:
            try:
                size = self.sock.recv_into(self._buffer, 0, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except ConnectionResetError:
                size = 0
            if not size:
                self._eof, self._held = True, False  # (run what is queued, then stop)
                return
            wait = False
            self._unpacker.feed(memoryview(self._buffer)[:size])
            for request in self._unpacker:
                self._take(request)

    def _take(self, request: list[Any]) -> None:
        kind, id, *args = request
        if kind == COMMIT:
            room, writes, delete_all, alarm, after, epoch, node = args
            alarm = None if alarm is None else (alarm[0], alarm[1])
            commit = Commit(room, writes, delete_all, alarm, epoch, node)
            self._queued.append(Job(id, commit, after=after))
        elif kind == READ:
            self._queued.append(Job(id, None, args[0], args[1]))
        elif kind == FORGET:
            self._forget.extend(args[0])
        elif kind == HOLD:
            self._held = True
            self.answer([[id, None, None]])
        elif kind == RELEASE:
            self._held, self._pause = False, None
        elif kind == TEST and args[0] == "pause_commit":
            self._pause = id  # (answered once paused)
        elif kind == TEST:
            self.store.test(args[0], args[1])
            self.answer([[id, None, None]])


def range_query(
    table: str,
    mark: str,
    room: str,
    lower: list[Any],
    upper: list[Any],
    reverse: bool,
    limit: int | None,
) -> tuple[str, list[Any]]:
    """A backend's SELECT of ``room``'s keys at or above every ``lower`` bound and below
    every ``upper`` one, in key order (``mark``: the driver's placeholder), and its values."""
    where = [f"room = {mark}", *[f"key >= {mark}"] * len(lower), *[f"key < {mark}"] * len(upper)]
    sql = f"SELECT key, value FROM {table} WHERE {' AND '.join(where)} ORDER BY key"
    sql += " DESC" if reverse else ""
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, [room, *lower, *upper]


class _ToServer(logging.Handler):
    """The process's log lines go to the server, which logs them as its own (``[0, level,
    message]``: id 0 is no request's)."""

    def __init__(self, writer: Writer) -> None:
        super().__init__(logging.WARNING)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.answer([[0, record.levelname, record.getMessage()]])


def serve(fd: int, open_store: Callable[[], Store]) -> None:
    """The process's main: open the store, then serve the server at the socket ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        store = open_store()
    except Exception as exc:
        sock.sendall(msgpack.packb([0, f"{type(exc).__name__}: {exc}", None]))
        raise SystemExit(1) from None
    writer = Writer(sock, store)
    logging.getLogger().addHandler(_ToServer(writer))
    try:
        writer.run()
    except BrokenPipeError:
        pass  # (the server is gone: nobody waits for the answers)
    finally:
        store.close()
