"""Property tests (hypothesis) of the example chat's protocol, fed anything at all.

Every property is bounded (max_examples, no deadline flakiness on a shared machine)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.chat import app as chat
from rooms.testing import RoomsHarness

BOUNDED = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --------------------------------------------------------------------------------------------
# the chat protocol

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)
frames = (
    st.text(max_size=300)
    | st.binary(max_size=100)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries({"name": json_values}).map(json.dumps)
    | st.fixed_dictionaries({"message": json_values}).map(json.dumps)
    | st.fixed_dictionaries({"message": st.text(max_size=300)}).map(json.dumps)
)


@pytest.fixture
def no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat.RateLimiter, "grace", 1e9)


@BOUNDED
@given(st.lists(frames, min_size=1, max_size=6))
async def test_chat_answers_any_frame_with_json_and_never_breaks(
    no_rate_limit: None, sent: list[str | bytes]
) -> None:
    """Before and after joining, any frame gets JSON objects back (an error frame for what is
    not the protocol); only a name over 32 characters closes the connection; the room never
    fails, and a well-behaved member keeps chatting."""
    async with RoomsHarness(chat.app) as rooms:
        watcher = await rooms.connect("/api/room/fuzz/websocket")
        await watcher.send(json.dumps({"name": "watcher"}))
        fuzzer = await rooms.connect("/api/room/fuzz/websocket")
        for frame in sent:
            if fuzzer.closed:
                break
            await fuzzer.send(frame)
            await rooms.settle()
        await watcher.send(json.dumps({"message": "still fine"}))
        await rooms.settle()
        assert fuzzer.received  # every frame is answered, at least the first one
        for message in [*fuzzer.received, *watcher.received]:
            assert isinstance(message, str)
            assert isinstance(json.loads(message), dict)
        assert json.loads(watcher.received[-1])["message"] == "still fine"
        assert rooms.metrics.handler_errors_total == 0
        if fuzzer.closed:
            assert fuzzer.close_code == 1009
            assert json.loads(fuzzer.received[-1]) == {"error": "Name too long."}
