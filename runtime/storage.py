"""Durable storage: the narrow interface every backend implements, the thread machinery the
backends share, and each room's view.

A backend (``runtime.sqlite`` embedded, ``runtime.postgres`` in cluster mode) stores every
room's keys and alarm, commits a room's writes as one atomic batch and says when it is
durable. Their drivers block, so each runs on a thread of its own (``ThreadedBackend``):
rooms hand it jobs through a queue, it runs everything queued as one transaction (group commit
across rooms) and then wakes the rooms, so the event loop never waits on the disk. Jobs run in
queue order, so a read always sees every write the same room submitted before it.
``RoomStorage`` is ``Room.storage``: reads through a per-activation cache, writes buffered
until the event ends, then handed to the backend as one commit (the output gate waits for it).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import trio

from rooms._engine import decode, encode

Done = Callable[[BaseException | None], None]
ListResult = list[tuple[str, bytes]]
AlarmChange = tuple[float | None, str | None]
"""An event's change to its room's alarm: (time, room name) to set it, (None, None) to delete."""
AlarmRows = list[tuple[str, float, str | None]]
"""Every stored alarm: (room, time, room name)."""
Size = tuple[int, int]
"""What a room has stored: (keys, bytes of its keys and values)."""


_IN_FLIGHT: trio.lowlevel.RunVar[list[int]] = trio.lowlevel.RunVar("rooms_storage_in_flight")


def jobs_in_flight() -> list[int]:
    """This trio run's count of storage jobs handed to a backend's thread and not answered
    yet, as a one-item list every backend of the run updates: a test's virtual clock must not
    jump while the disk is still working (``rooms.testing.virtual_clock``)."""
    try:
        return _IN_FLIGHT.get()
    except LookupError:
        counter = [0]
        _IN_FLIGHT.set(counter)
        return counter


class StorageError(RuntimeError):
    """The storage backend failed (disk full, corrupt file, closed)."""


class FencedError(StorageError):
    """The node no longer holds the room at the epoch of these writes (another node took it
    over): nothing was written, and nothing that waited on them may go out."""


# ---------------------------------------------------------------------------------------
# The thread machinery of a backend

Db = TypeVar("Db")
_BATCH_MAX = 1024  # jobs per transaction: bounds the latency of the first job in a batch


class Job(Generic[Db]):
    """One unit of work for a backend's thread; ``fence`` is a commit's (room, epoch);
    ``after``, the same room's previous commit if it was still in flight when this one was
    queued (this one was computed on top of it: if it fails, so must this one)."""

    __slots__ = ("after", "deliver", "error", "fence", "result", "run")

    def __init__(
        self,
        run: Callable[[Db], Any],
        deliver: Callable[[Job[Db]], None],
        fence: tuple[str, int] | None = None,
        after: Job[Db] | None = None,
    ) -> None:
        self.run = run
        self.deliver = deliver
        self.fence = fence
        self.after = after
        self.result: Any = None
        self.error: BaseException | None = None


def earlier_failure(job: Job[Any]) -> StorageError | None:
    """Why ``job`` must not run: the room's previous commit, which it was built on, failed
    (a room's commits apply in order, and a failed one stops the rest: the room restarts
    from what is stored). None if it may."""
    after = job.after
    if after is None or after.error is None:
        return None
    return StorageError(f"an earlier commit of this room failed ({after.error})")


class ThreadedBackend(Generic[Db]):
    """One thread that owns the database connection and runs the queued jobs in batches
    (see the module's docstring). Subclasses open the connection and run a batch."""

    name = "storage"

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job[Db] | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._in_flight = jobs_in_flight()
        self._closed = False
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name=f"rooms-{self.name}", daemon=True
        )
        self._thread.start()
        error = ready.get()
        if error is not None:
            raise StorageError(self._open_failed(error)) from error

    def _open(self) -> Db:
        raise NotImplementedError

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open the {self.name} database: {error}"

    def _close(self, db: Db) -> None:
        raise NotImplementedError

    def _run_batch(self, db: Db, batch: list[Job[Db]]) -> None:
        """Run ``batch`` as one transaction, setting each job's result or error."""
        raise NotImplementedError

    def _main(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            db = self._open()
        except Exception as exc:
            ready.put(exc)
            return
        ready.put(None)
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _BATCH_MAX:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._run_batch(db, batch)
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._deliver_batch, batch)
                if stop:
                    return
        finally:
            self._close(db)

    def _deliver_batch(self, batch: list[Job[Db]]) -> None:
        self._in_flight[0] -= len(batch)
        for job in batch:
            job.after = None  # (its outcome is known: the chain of commits ends here)
            job.deliver(job)

    def _submit(
        self,
        run: Callable[[Db], Any],
        deliver: Callable[[Job[Db]], None],
        fence: tuple[str, int] | None = None,
        after: Job[Db] | None = None,
    ) -> Job[Db]:
        if self._closed:
            raise StorageError("storage is closed (the server is shutting down)")
        self._in_flight[0] += 1
        job = Job(run, deliver, fence, after)
        self._jobs.put(job)
        return job

    async def _call(self, run: Callable[[Db], Any]) -> Any:
        """Run ``run`` on the thread, in queue order; its result."""
        finished = trio.Event()
        outcome: list[Job[Db]] = []

        def deliver(job: Job[Db]) -> None:
            outcome.append(job)
            finished.set()

        self._submit(run, deliver)
        with trio.CancelScope(shield=True):
            # The thread will answer; leaving early would only orphan the answer.
            await finished.wait()
        job = outcome[0]
        if job.error is not None:
            raise StorageError(f"storage read failed: {job.error}") from job.error
        return job.result

    async def aclose(self) -> None:
        """Finish every queued job, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)


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
        the operator; reads their rows, on the backend's thread like every job."""
        ...

    async def alarms(self) -> AlarmRows:
        """Every stored alarm: (room, time, room name)."""
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
