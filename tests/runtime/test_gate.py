"""Unit tests of ``runtime.gate``: the output gate (``OutputGate``), the one-shot ``Reply`` and
the burst batch (``Batch``), driven by hand against fake transports that record their calls."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from runtime.gate import Batch, Deliver, OutputGate, Reply

# -- helpers ---------------------------------------------------------------------------------


class FakeTransport:
    """A ``Transport`` that records every call (hashable by identity, as a batch needs)."""

    def __init__(self, name: str = "t") -> None:
        self.name = name
        self.writes: list[tuple[bytes, int]] = []
        self.closes: list[tuple[int, str]] = []

    def write(self, frame: bytes, messages: int = 1) -> None:
        self.writes.append((frame, messages))

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def __repr__(self) -> str:
        return f"FakeTransport({self.name!r})"

    @property
    def frames(self) -> list[bytes]:
        return [frame for frame, _ in self.writes]


def closer(transport: FakeTransport) -> Deliver:
    """A deliver function that closes ``transport`` with its item, ``(code, reason)``."""

    def deliver(item: tuple[int, str]) -> None:
        transport.close(*item)

    return deliver


def committed_event(gate: OutputGate, transport: FakeTransport, *frames: bytes) -> None:
    """Run one event that writes to storage, then sends ``frames``; its commit is submitted."""
    gate.wrote()
    for frame in frames:
        gate.emit(transport.write, frame)
    gate.submit()


# -- OutputGate: open and held ---------------------------------------------------------------


def test_a_new_gate_is_open_with_nothing_in_flight() -> None:
    gate = OutputGate()
    assert gate.open
    assert (gate.submitted, gate.durable, gate.inflight) == (0, 0, 0)
    assert not gate.releasable


def test_an_open_gate_delivers_at_once() -> None:
    gate, t = OutputGate(), FakeTransport()
    gate.emit(t.write, b"a")
    gate.emit(t.write, b"b")
    assert t.writes == [(b"a", 1), (b"b", 1)]
    assert gate.open


def test_after_a_write_outputs_are_held_until_the_commit_lands_and_is_released() -> None:
    gate, t = OutputGate(), FakeTransport()
    gate.wrote()
    gate.emit(t.write, b"x")
    assert t.writes == []
    assert not gate.open
    gate.submit()
    assert t.writes == []
    assert not gate.releasable
    gate.landed()
    assert gate.releasable
    assert t.writes == []  # landing alone delivers nothing: release does
    gate.release()
    assert t.frames == [b"x"]
    assert gate.open
    assert not gate.releasable


def test_release_before_the_commit_lands_delivers_nothing() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"x")
    gate.release()
    assert t.writes == []
    assert not gate.open


def test_outputs_sent_before_the_first_write_go_out_at_once() -> None:
    gate, t = OutputGate(), FakeTransport()
    gate.emit(t.write, b"before")
    gate.wrote()
    gate.emit(t.write, b"after")
    assert t.frames == [b"before"]


def test_a_later_output_without_writes_waits_behind_a_held_one() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"x")
    gate.emit(t.write, b"y")  # the next event made no write
    assert t.writes == []
    gate.landed()
    gate.release()
    assert t.frames == [b"x", b"y"]


def test_outputs_of_the_event_after_a_commit_wait_for_that_commit() -> None:
    # The commit is in flight but nothing is held: the next event's sends still wait for it.
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t)
    gate.emit(t.write, b"y")
    assert t.writes == []
    gate.landed()
    gate.release()
    assert t.frames == [b"y"]


def test_an_output_sent_between_landing_and_release_waits_behind_the_held_ones() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"x")
    gate.landed()
    gate.emit(t.write, b"y")  # x is releasable but not yet released: y must not overtake it
    assert t.writes == []
    gate.release()
    assert t.frames == [b"x", b"y"]


def test_hold_queues_an_output_behind_the_held_ones() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"x")
    gate.hold(t.write, b"y")
    assert t.writes == []
    gate.landed()
    gate.release()
    assert t.frames == [b"x", b"y"]


def test_several_commits_in_flight_release_in_order_each_when_its_commit_landed() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"a1", b"a2")
    committed_event(gate, t, b"b1")
    gate.emit(t.write, b"c")  # a third event, without writes: waits for commit 2
    assert gate.inflight == 2
    gate.landed()
    assert gate.releasable
    gate.release()
    assert t.frames == [b"a1", b"a2"]
    assert not gate.releasable
    assert not gate.open
    gate.landed()
    gate.release()
    assert t.frames == [b"a1", b"a2", b"b1", b"c"]
    assert gate.open


def test_release_keeps_the_order_across_connections_and_kinds_of_output() -> None:
    gate, a, b = OutputGate(), FakeTransport("a"), FakeTransport("b")
    order: list[str] = []
    gate.wrote()
    gate.emit(lambda item: order.append(f"a:{item}"), "1")
    gate.emit(lambda item: order.append(f"b:{item}"), "2")
    gate.emit(lambda item: order.append(f"a:{item}"), "3")
    gate.emit(closer(b), (1000, "bye"))
    gate.emit(a.write, b"last")
    gate.submit()
    gate.landed()
    gate.release()
    assert order == ["a:1", "b:2", "a:3"]
    assert b.closes == [(1000, "bye")]
    assert a.frames == [b"last"]


def test_inflight_counts_submitted_commits_that_have_not_landed() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t)
    committed_event(gate, t)
    committed_event(gate, t)
    assert (gate.submitted, gate.durable, gate.inflight) == (3, 0, 3)
    gate.landed()
    assert (gate.submitted, gate.durable, gate.inflight) == (3, 1, 2)
    gate.landed()
    gate.landed()
    assert gate.inflight == 0


def test_releasable_is_false_when_a_commit_lands_with_nothing_held() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t)
    gate.landed()
    assert not gate.releasable
    assert gate.open


# -- OutputGate: rollback and fail -----------------------------------------------------------


def test_rollback_drops_what_the_failed_event_sent_after_its_first_write() -> None:
    gate, t = OutputGate(), FakeTransport()
    gate.wrote()
    gate.emit(t.write, b"depends on the lost write")
    gate.rollback()
    assert gate.open
    assert not gate.releasable
    gate.emit(t.write, b"next")  # the next event's output goes straight out
    assert t.frames == [b"next"]


def test_rollback_keeps_earlier_held_outputs() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"a")  # commit 1, in flight
    gate.emit(t.write, b"b-before-write")  # the failing event, before its first write
    gate.wrote()
    gate.emit(t.write, b"b-after-write")
    gate.rollback()
    gate.emit(t.write, b"c")  # the event after: still behind commit 1
    assert t.writes == []
    gate.landed()
    gate.release()
    assert t.frames == [b"a", b"b-before-write", b"c"]
    assert gate.inflight == 0


def test_rollback_without_a_write_drops_nothing() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"a")
    gate.emit(t.write, b"b")
    gate.rollback()
    gate.landed()
    gate.release()
    assert t.frames == [b"a", b"b"]


def test_fail_drops_every_held_output_for_good() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"a")
    gate.emit(closer(t), (1000, "done"))
    gate.landed()
    gate.fail(RuntimeError("disk full"))
    assert not gate.releasable
    gate.release()
    assert t.writes == []
    assert t.closes == []
    assert gate.open


def test_fail_drops_outputs_waiting_for_later_commits_too() -> None:
    gate, t = OutputGate(), FakeTransport()
    committed_event(gate, t, b"a")
    committed_event(gate, t, b"b")
    gate.landed()
    gate.fail(RuntimeError("disk full"))
    gate.landed()
    gate.release()
    assert t.writes == []


async def test_fail_fails_held_replies_with_the_error() -> None:
    gate, t = OutputGate(), FakeTransport()
    error = RuntimeError("disk full")
    answer, call = Reply(), Reply()
    gate.wrote()
    gate.emit(answer.set, "the answer")
    gate.emit(t.write, b"frame")
    gate.emit(call.fail, ValueError("the call's own error"))
    gate.submit()
    gate.landed()
    gate.fail(error)
    with trio.fail_after(1), pytest.raises(RuntimeError) as first:
        await answer.wait()
    assert first.value is error
    with trio.fail_after(1), pytest.raises(RuntimeError) as second:
        await call.wait()
    assert second.value is error
    assert t.writes == []


async def test_fail_leaves_replies_delivered_before_it_alone() -> None:
    gate = OutputGate()
    reply = Reply()
    gate.emit(reply.set, 42)  # the gate is open: answered at once
    gate.wrote()
    gate.submit()
    gate.landed()
    gate.fail(RuntimeError("disk full"))
    with trio.fail_after(1):
        assert await reply.wait() == 42


async def test_a_held_reply_gets_its_value_once_released() -> None:
    gate, t = OutputGate(), FakeTransport()
    reply = Reply()
    committed_event(gate, t)
    gate.emit(reply.set, "ok")
    gate.landed()
    gate.release()
    with trio.fail_after(1):
        assert await reply.wait() == "ok"


# -- Reply -----------------------------------------------------------------------------------


async def test_reply_wait_returns_the_value() -> None:
    reply = Reply()
    reply.set({"n": 1})
    with trio.fail_after(1):
        assert await reply.wait() == {"n": 1}


async def test_reply_wait_returns_a_none_value() -> None:
    reply = Reply()
    reply.set(None)
    with trio.fail_after(1):
        assert await reply.wait() is None


async def test_reply_wait_raises_the_error() -> None:
    reply = Reply()
    error = KeyError("missing")
    reply.fail(error)
    with trio.fail_after(1), pytest.raises(KeyError) as raised:
        await reply.wait()
    assert raised.value is error


async def test_reply_wait_blocks_until_the_reply_is_set() -> None:
    reply = Reply()
    got: list[Any] = []

    async def waiter() -> None:
        got.append(await reply.wait())

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            reply.set("late")
    assert got == ["late"]


# -- Batch -----------------------------------------------------------------------------------


def test_a_closed_batch_writes_straight_through() -> None:
    batch, a, b = Batch(), FakeTransport("a"), FakeTransport("b")
    assert not batch.open
    batch.write([a, b], b"f1")
    batch.write([a], b"f2")
    assert a.writes == [(b"f1", 1), (b"f2", 1)]
    assert b.writes == [(b"f1", 1)]


def test_an_open_batch_keeps_frames_until_the_flush() -> None:
    batch, a = Batch(), FakeTransport()
    batch.start()
    assert batch.open
    batch.write([a], b"f1")
    batch.write([a], b"f2")
    assert a.writes == []


def test_flush_writes_once_per_transport_with_the_joined_frames_and_their_count() -> None:
    batch, a, b = Batch(), FakeTransport("a"), FakeTransport("b")
    batch.start()
    batch.write([a, b], b"one")
    batch.write([a], b"two")
    batch.write([a], b"three")
    batch.flush()
    assert a.writes == [(b"onetwothree", 3)]
    assert b.writes == [(b"one", 1)]


def test_flush_closes_the_batch() -> None:
    batch, a = Batch(), FakeTransport()
    batch.start()
    batch.write([a], b"kept")
    batch.flush()
    assert not batch.open
    batch.write([a], b"direct")
    assert a.writes == [(b"kept", 1), (b"direct", 1)]


def test_flush_of_one_transport_writes_only_its_frames_and_keeps_the_batch_open() -> None:
    batch, a, b = Batch(), FakeTransport("a"), FakeTransport("b")
    batch.start()
    batch.write([a, b], b"x")
    batch.write([a, b], b"y")
    batch.flush(a)
    assert a.writes == [(b"xy", 2)]
    assert b.writes == []
    assert batch.open
    batch.write([a], b"z")  # kept again, not written
    assert a.writes == [(b"xy", 2)]
    batch.flush()
    assert a.writes == [(b"xy", 2), (b"z", 1)]
    assert b.writes == [(b"xy", 2)]


def test_flush_of_a_transport_with_nothing_kept_writes_nothing() -> None:
    batch, a, b = Batch(), FakeTransport("a"), FakeTransport("b")
    batch.start()
    batch.write([b], b"x")
    batch.flush(a)
    assert a.writes == []
    assert b.writes == []
    assert batch.open


def test_flush_of_a_closed_batch_writes_nothing() -> None:
    batch, a = Batch(), FakeTransport()
    batch.write([a], b"direct")
    batch.flush()
    batch.flush(a)
    assert a.writes == [(b"direct", 1)]
    assert not batch.open


def test_outputs_a_commit_releases_into_an_open_batch_go_out_as_one_write() -> None:
    gate, batch, a = OutputGate(), Batch(), FakeTransport()

    def send(frame: bytes) -> None:
        batch.write([a], frame)

    gate.wrote()
    gate.emit(send, b"1")
    gate.emit(send, b"2")
    gate.submit()
    gate.emit(send, b"3")
    gate.landed()
    batch.start()
    gate.release()
    assert a.writes == []
    batch.flush()
    assert a.writes == [(b"123", 3)]
