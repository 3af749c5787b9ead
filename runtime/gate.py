"""How a room's outputs leave it: the output gate, then the burst batch.

The output gate: no client sees a message whose state could still be lost.

A room's storage writes commit when the event that made them ends, off the event loop; the
gate holds what the room sends after a write until that write is durable. Commits are
numbered in the order they are submitted and land in that order. Each output carries the
number of the commit it waits for (its horizon); it goes out once that many commits are
durable. While nothing waits, outputs go straight out. Once something waits, everything
after it queues behind it, so nothing can overtake: per-connection FIFO and the room's total
order of broadcasts hold whatever each message waits for. Replies to HTTP requests and calls
pass the same gate. If a commit fails, nothing held goes out: held replies fail instead.

The burst batch: frames a room writes while it works through a burst of queued events (or
that one group commit releases) go out as one write per connection when the burst ends: one
system call per connection per burst instead of one per frame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol

import trio

Deliver = Callable[[Any], None]
"""Sends one held output (its item) now: frames to write, a close, a reply."""


class Reply:
    """A one-shot answer to an HTTP request or a call, waited on by whoever posted it."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class OutputGate:
    """One room's gate (see the module's docstring). ``submitted`` and ``durable`` count
    the room's commits handed to storage and landed."""

    __slots__ = ("_held", "_horizon", "durable", "submitted")

    def __init__(self) -> None:
        self.submitted = 0
        self.durable = 0
        self._horizon = 0  # the commit that what is sent now waits for
        self._held: deque[tuple[int, Deliver, Any]] = deque()

    @property
    def open(self) -> bool:
        """No write made so far is on its way to disk, and nothing is held."""
        return self._horizon <= self.durable and not self._held

    @property
    def inflight(self) -> int:
        """Commits handed to storage that have not landed yet."""
        return self.submitted - self.durable

    def emit(self, deliver: Deliver, item: Any) -> None:
        """Deliver ``item`` now, or once every write made before it is durable."""
        if self._horizon <= self.durable and not self._held:
            deliver(item)
        else:
            self._held.append((self._horizon, deliver, item))

    def hold(self, deliver: Deliver, item: Any) -> None:
        """Queue ``item`` behind the writes before it (the caller found the gate closed)."""
        self._held.append((self._horizon, deliver, item))

    # -- the event's writes ------------------------------------------------------------

    def wrote(self) -> None:
        """The running event made its first write: what it sends from now on waits for
        the commit that will carry it (the next one to be submitted)."""
        self._horizon = self.submitted + 1

    def submit(self) -> None:
        """The running event's writes were handed to storage as the next commit."""
        self.submitted += 1

    def rollback(self) -> None:
        """The running event failed: its writes are dropped, and so is what it sent after
        its first write (it depended on them)."""
        held = self._held
        while held and held[-1][0] > self.submitted:
            held.pop()
        self._horizon = self.submitted

    # -- commits landing ---------------------------------------------------------------

    def landed(self) -> None:
        """The oldest commit in flight is durable."""
        self.durable += 1

    @property
    def releasable(self) -> bool:
        """Something held may go out now (``release``)."""
        return bool(self._held) and self._held[0][0] <= self.durable

    def release(self) -> None:
        """Deliver, in order, every held output whose writes are durable."""
        held, durable = self._held, self.durable
        while held and held[0][0] <= durable:
            _, deliver, item = held.popleft()
            deliver(item)

    def fail(self, error: BaseException) -> None:
        """A commit failed: what is held may depend on lost writes, so it never goes out.
        Held replies fail with ``error``, so that their waiters do not hang."""
        held, self._held = self._held, deque()
        for _, deliver, _item in held:
            reply = getattr(deliver, "__self__", None)  # Reply.set or Reply.fail, bound
            if isinstance(reply, Reply):
                reply.fail(error)


class Transport(Protocol):
    """A client connection as a room sees it: the edge's ``WebSocket``, or a test's fake."""

    def write(self, frame: bytes, messages: int = 1) -> None:
        """Queue encoded frames (``messages`` of them); never blocks. Ignored once the
        connection is closing."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send a Close frame and finish the connection."""
        ...


class Batch:
    """One room's burst batch (see the module's docstring): while ``open``, frames are kept
    per connection; ``flush`` writes them."""

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: dict[Transport, list[bytes]] | None = None

    @property
    def open(self) -> bool:
        return self._frames is not None

    def start(self) -> None:
        """Keep frames from now on, until ``flush``."""
        self._frames = {}

    def write(self, transports: Collection[Transport], frame: bytes) -> None:
        """Write ``frame`` to each of ``transports`` now, or keep it for the flush."""
        batch = self._frames
        if batch is None:
            for transport in transports:
                transport.write(frame)
            return
        for transport in transports:
            frames = batch.get(transport)
            if frames is None:
                batch[transport] = [frame]
            else:
                frames.append(frame)

    def flush(self, transport: Transport | None = None) -> None:
        """Write what was kept, one write per connection, and stop keeping; with
        ``transport``, only that connection's (the batch stays open)."""
        if self._frames is None:
            return
        if transport is None:
            batch, self._frames = self._frames, None
        else:
            frames = self._frames.pop(transport, None)
            batch = {transport: frames} if frames else {}
        for target, frames in batch.items():
            if len(frames) == 1:
                target.write(frames[0])
            else:
                target.write(b"".join(frames), len(frames))
