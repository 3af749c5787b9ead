"""Mutation checks of the guarantees: each mutant is the smallest change that breaks one
promise of ``docs/guarantees.md``, and the tests named with it must fail on it.

    make mutants                              # every mutant (make test runs them too)
    python -m tests.mutants gate.broadcast    # some, by name

For each mutant the tracked tree is copied to a temporary folder, the change applied there
(its text must match exactly once: a refactoring that moves the code fails here loudly
instead of testing nothing), and its tests run in that copy. A mutant is caught when they
fail (or time out). The exit status is 1 if one survived, 2 if one no longer applies.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parent.parent
G = "tests/runtime/test_guarantees.py::"
H = "tests/runtime/test_host.py::"
L = "tests/runtime/test_lifecycle.py::"
PG = "tests/runtime/test_postgres.py::"
C = "tests/runtime/test_cluster.py::"
HOSTILE = "tests/system/test_hostile.py::"
PARTITION = (
    "tests/system/test_cluster.py::"
    "test_a_node_cut_off_for_10_s_under_load_loses_nothing_and_serves_again["
)
POST = "        mailbox = self.mailbox\n        if len(mailbox.events) >= mailbox.size:\n"


@attrs.frozen
class Mutant:
    name: str
    guarantee: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "restart.outrun",
        "an event that outruns a restart from a failed commit keeps nothing",
        "runtime/activation.py",
        "        if room is not self.instance:\n            self._outrun(event)\n",
        "        if False:\n            self._outrun(event)\n",
        (G + "test_an_event_that_outruns_a_restart_from_a_failed_commit_keeps_nothing",),
    ),
    Mutant(
        "commits.chain",
        "a failed commit stops the room's later commits in flight",
        "runtime/writer.py",
        "        if not job.after:\n            return None\n",
        "        return None\n",
        (
            "tests/runtime/test_storage.py::test_a_failed_commit_fails_the_rooms_later_ones_in_flight",
        ),
    ),
    Mutant(
        "yjs.store",
        "a Yjs edit anyone has seen is stored",
        "rooms/yjs.py",
        "            self._store(change)\n",
        "",
        ("tests/rooms/test_yjs.py::test_two_editors_converge_and_a_third_gets_the_whole_document",),
    ),
    Mutant(
        "seats.max",
        "no more seated connections than max_clients",
        "runtime/seats.py",
        "free = not self.locked and self.taken < self.max_clients",
        "free = not self.locked and self.taken <= self.max_clients",
        (
            "tests/runtime/test_seats.py::test_simultaneous_joins_never_take_more_seats_than_there_are",
        ),
    ),
    Mutant(
        "seats.once",
        "a seat ticket is good for one connection",
        "runtime/seats.py",
        "if ticket is not None and ticket.nonce in self._used:",
        "if False:",
        ("tests/runtime/test_seats.py::test_a_ticket_admits_one_connection_with_its_identity",),
    ),
    Mutant(
        "activation.one",
        "one activation per room",
        "runtime/host.py",
        "act = self._activations.get(key)",
        "act = None",
        (H + "test_one_activation_per_room_and_idle_rooms_unload",),
    ),
    Mutant(
        "serial.requests_and_calls",
        "one event at a time, every kind of event",
        "runtime/activation.py",
        POST,
        '        if type(event).__name__ in ("Http", "Call"):\n'
        "            self.host.nursery.start_soon(self._handle, event)\n"
        "            return\n" + POST,
        (G + "test_one_event_at_a_time_for_every_kind_of_event",),
    ),
    Mutant(
        "serial.messages",
        "one event at a time, in arrival order",
        "runtime/activation.py",
        POST,
        "        self.host.nursery.start_soon(self._handle, event)\n        return\n" + POST,
        (H + "test_events_run_one_at_a_time_in_arrival_order",),
    ),
    Mutant(
        "atomic.first_write_only",
        "an event's writes commit together",
        "runtime/storage.py",
        "self._room, writes, deleted_all, done",
        "self._room, dict([*writes.items()][:1]), deleted_all, done",
        (H + "test_writes_commit_atomically_and_a_failed_event_loses_its_writes",),
    ),
    Mutant(
        "gate.send",
        "output gate: a message sent after a write waits for it",
        "runtime/activation.py",
        "        if self.gate.open:\n            self.batch.write(transports, frame)",
        "        if True:\n            self.batch.write(transports, frame)",
        (H + "test_messages_wait_until_the_writes_before_them_are_durable",),
    ),
    Mutant(
        "gate.broadcast",
        "output gate: broadcasts too",
        "runtime/activation.py",
        "self.send(transports, encode_message(message))",
        "self.batch.write(transports, encode_message(message))",
        (G + "test_a_broadcast_after_a_write_reaches_nobody_before_the_commit",),
    ),
    Mutant(
        "gate.http_reply",
        "output gate: replies to HTTP requests",
        "runtime/events.py",
        "    def done(self, act: Activation, result: Any) -> None:\n"
        "        act.gate.emit(self.reply.set, result)\n\n"
        "    def tell(self, act: Activation, problem: str) -> None:\n"
        "        act.gate.emit(self.reply.set, Response.text(",
        "    def done(self, act: Activation, result: Any) -> None:\n"
        "        self.reply.set(result)\n\n"
        "    def tell(self, act: Activation, problem: str) -> None:\n"
        "        act.gate.emit(self.reply.set, Response.text(",
        (G + "test_an_http_reply_after_a_write_waits_for_the_commit",),
    ),
    Mutant(
        "gate.call_result",
        "output gate: results of calls",
        "runtime/events.py",
        "    def done(self, act: Activation, result: Any) -> None:\n"
        "        act.gate.emit(self.reply.set, result)\n\n"
        "    def failed(",
        "    def done(self, act: Activation, result: Any) -> None:\n"
        "        self.reply.set(result)\n\n"
        "    def failed(",
        (G + "test_a_call_result_after_a_write_waits_for_the_commit",),
    ),
    Mutant(
        "durable.ack_before_commit",
        "durable: an acknowledgement only after COMMIT",
        "runtime/writer.py",
        "        self.store.run_batch(batch, self._failed_before, self.before_commit)\n",
        "        self.answer([[job.id, None, None] for job in batch if job.commit is not None])\n"
        "        self.store.run_batch(batch, self._failed_before, self.before_commit)\n",
        (G + "test_an_acknowledgement_is_released_only_after_commit",),
    ),
    Mutant(
        "durable.synchronous_off",
        "durable: the synchronous setting reaches SQLite",
        "runtime/sqlite.py",
        'db.execute(f"PRAGMA synchronous={synchronous}")',
        'db.execute("PRAGMA synchronous=OFF")',
        (G + "test_the_synchronous_setting_reaches_sqlite",),
    ),
    Mutant(
        "durable.commit_period",
        "durable: every acknowledged write survives kill -9",
        "runtime/sqlite.py",
        '        self.db.execute("COMMIT")\n',
        '        self._n = getattr(self, "_n", 0) + 1\n'
        "        if self._n % 16 == 0:\n"
        '            self.db.execute("COMMIT")\n',
        ("tests/system/test_durability.py::test_every_acknowledged_write_survives_kill_9",),
    ),
    Mutant(
        "errors.bystanders",
        "errors stay with their origin: a bystander carries on",
        "runtime/events.py",
        "    def tell(self, act: Activation, problem: str) -> None:\n"
        "        self.peer.close(1011, problem)\n\n\n"
        "@attrs.define(slots=True, eq=False)\nclass Closed(",
        "    def tell(self, act: Activation, problem: str) -> None:\n"
        "        for peer in list(act.peers.values()):\n"
        "            peer.close(1011, problem)\n\n\n"
        "@attrs.define(slots=True, eq=False)\nclass Closed(",
        (G + "test_a_failing_handler_costs_its_sender_only",),
    ),
    Mutant(
        "errors.restart",
        "errors: the room restarts from storage, its failed writes dropped",
        "runtime/activation.py",
        '        hook = "on_start" if self.instance is None else event.hook\n'
        "        self._drop_instance()\n",
        '        hook = "on_start" if self.instance is None else event.hook\n',
        (H + "test_writes_commit_atomically_and_a_failed_event_loses_its_writes",),
    ),
    Mutant(
        "alarms.backoff",
        "alarms: a failing on_alarm is retried after 1, 2, 4, 8, 16 and 32 s",
        "runtime/events.py",
        "delay = 2.0**retry",
        "delay = 1.0",
        (G + "test_a_failing_alarm_backs_off_1_2_4_8_16_32_then_is_deleted",),
    ),
    Mutant(
        "alarms.restart",
        "alarms fire at least once, across a restart",
        "runtime/host.py",
        "for key, at, name in await host.backend.alarms():",
        "for key, at, name in []:",
        (L + "test_an_alarm_survives_a_restart",),
    ),
    Mutant(
        "order.burst",
        "order: a burst keeps its order in one write",
        "runtime/gate.py",
        'target.write(b"".join(frames), len(frames))',
        'target.write(b"".join(reversed(frames)), len(frames))',
        (H + "test_a_burst_of_events_is_one_write_per_connection",),
    ),
    Mutant(
        "protocol.close_frame",
        "protocol errors are explained with a Close frame",
        "runtime/websocket.py",
        "            target.end(exc.code, exc.reason, send_close=True)\n",
        "            ws._broken()\n",
        (HOSTILE + "test_protocol_violations_close_with_a_code_and_reason",),
    ),
    Mutant(
        "bounded.body_deadline",
        "bounded: a request body is due whole within body_timeout, not per read",
        "runtime/http.py",
        "            part = await _next_event(h, stream, deadline)\n",
        "            part = await _next_event(h, stream, trio.current_time() + 1.0)\n",
        (HOSTILE + "test_a_trickled_body_is_cut_off_and_others_are_served",),
    ),
    Mutant(
        "bounded.mailbox",
        "bounded: a full mailbox stops the edge reading",
        "runtime/activation.py",
        "        if len(mailbox.events) >= mailbox.size:\n",
        "        if False:\n",
        (H + "test_a_full_mailbox_makes_senders_wait",),
    ),
    Mutant(
        "bounded.outbox",
        "bounded: a client that stops reading is closed with 1008",
        "runtime/websocket.py",
        "if self.pending_bytes > self.settings.max_outbox_bytes and self.state is _OPEN:",
        "if False:",
        ("tests/runtime/test_edge.py::test_a_client_that_stops_reading_is_closed_not_buffered",),
    ),
    Mutant(
        "bounded.inflight",
        "bounded: a room waits for the disk past max_inflight_commits",
        "runtime/activation.py",
        "too_many_commits = gate.inflight >= max_inflight",
        "too_many_commits = False",
        (G + "test_a_room_waits_for_the_disk_past_max_inflight_commits",),
    ),
    Mutant(
        "fence.lock_mode",
        "cluster: a batch's ownership lock blocks a takeover (FOR SHARE, not FOR KEY SHARE)",
        "runtime/postgres.py",
        "ORDER BY room FOR SHARE",
        "ORDER BY room FOR KEY SHARE",
        (PG + "test_a_takeover_waits_for_a_fenced_batch_in_flight_then_sees_its_writes",),
    ),
    Mutant(
        "fence.epoch",
        "cluster: a commit made under an older epoch is refused",
        "runtime/postgres.py",
        "JOIN held o ON o.room = p.room AND o.epoch = p.epoch",
        "JOIN held o ON o.room = p.room",
        (PG + "test_a_commit_under_a_stale_epoch_is_refused_and_changes_nothing",),
    ),
    Mutant(
        "lease.self_fence",
        "cluster: a node cut off from the database stops serving before its lease runs out",
        "runtime/cluster.py",
        "                if trio.current_time() >= deadline and self.registered:\n",
        "                if False:\n",
        (C + "test_a_node_cut_off_from_the_database_fences_itself_before_anyone_may_take_over",),
    ),
    Mutant(
        "link.silence",
        "cluster: the clients across a link that went silent (a cut cable) are told to reconnect",
        "runtime/outlink.py",
        "            if silent >= silence:\n",
        "            if False:\n",
        (PARTITION + "peers]",),
    ),
    Mutant(
        "unreachable.wait",
        "cluster: a client of a room whose node lost the database waits for the room, not a 503",
        "runtime/host.py",
        "and not await self.directory.renewing(placed.node_id):\n",
        "and False:\n",
        (PARTITION + "database]", PARTITION + "all]"),
    ),
    Mutant(
        "claim.one_owner",
        "cluster: a room has one owner, whichever node its first events reach",
        "runtime/cluster.py",
        " WHERE o.node_id IS NULL\n",
        " WHERE TRUE OR o.node_id IS NULL\n",
        (C + "test_first_events_through_three_nodes_at_once_give_the_room_one_owner",),
    ),
    Mutant(
        "order.link_frames",
        "cluster: a client's frames keep their order across the link",
        "runtime/inlink.py",
        "if at is None or self._conn_at.get(conn, -1) > at:",
        "if at is None:",
        (
            "tests/runtime/test_link.py::test_a_frame_queued_again_after_another_keeps_each_clients_order",
        ),
    ),
    Mutant(
        "rules.origin",
        "upgrade-time rules: allowed_origins",
        "runtime/admission.py",
        "if allowed is not None and origin is not None and origin not in allowed:",
        "if False:",
        (H + "test_the_harness_applies_the_upgrade_time_rules",),
    ),
]


def copy_tree(into: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file() and "node_modules" not in source.parts:
            target = into / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    text = path.read_text()
    found = text.count(mutant.find)
    if found != 1:
        raise SystemExit(
            f"mutant {mutant.name}: its text is in {mutant.path} {found} times, not once: "
            "update the mutant to the code"
        )
    path.write_text(text.replace(mutant.find, mutant.replace))


def caught(mutant: Mutant) -> tuple[bool, float, str]:
    """Whether the mutant's tests fail on it, how long they took, and their last line."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        apply(mutant, tree)
        start = time.monotonic()
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            done = subprocess.run(
                [*command, *mutant.tests], cwd=tree, capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired:
            return True, time.monotonic() - start, "timed out"
        lines = done.stdout.strip().splitlines()
        return done.returncode != 0, time.monotonic() - start, lines[-1] if lines else ""


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    survivors = []
    print(f"{'mutant':28} {'caught':7} {'s':>5}  guarantee")
    for mutant in chosen:
        killed, seconds, last = caught(mutant)
        print(f"{mutant.name:28} {'yes' if killed else 'NO':7} {seconds:5.1f}  {mutant.guarantee}")
        if not killed:
            survivors.append(mutant)
            print(f"    survived: {' '.join(mutant.tests)}: {last}")
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
