"""Property tests (hypothesis) for the codecs and parsers we own besides the frame codec
(which has its own in test_frames.py): the msgpack value codec behind storage, connection
state and calls; call payloads end to end; and the chat protocol, fed anything at all.

Every property is bounded (max_examples, no deadline flakiness on a shared machine)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.chat import app as chat
from rooms import App, Room
from rooms._codec import decode, encode
from rooms.testing import RoomsHarness

BOUNDED = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50)
)
# What the codec promises to round-trip: msgpack's own types, lists for arrays, dicts with
# str, int or bytes keys.
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.integers(-1000, 1000), inner, max_size=5)
    ),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Equality that also holds for -0.0 vs 0.0 and int-valued floats kept as floats."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@BOUNDED
@given(values)
def test_codec_round_trips_every_value_it_promises(value: Any) -> None:
    assert same(decode(encode(value, "the value")), value)


hashable = scalars | st.tuples(scalars, scalars) | st.frozensets(st.integers()) | st.builds(object)
anything = st.recursive(
    scalars
    | st.integers()  # past 64 bits
    | st.floats()  # NaN too
    | st.builds(object)
    | st.sets(st.integers(), max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(hashable, inner, max_size=4)
    ),
    max_leaves=20,
)


@BOUNDED
@given(anything)
def test_codec_either_refuses_with_a_clear_error_or_reads_back(value: Any) -> None:
    """Whatever it is given, ``encode`` raises TypeError naming the value or returns bytes
    that ``decode`` reads back: never a value stored that every later read would fail on."""
    try:
        packed = encode(value, "'my-key'")
    except TypeError as exc:
        assert "'my-key'" in str(exc)
        return
    decode(packed)


# --------------------------------------------------------------------------------------------
# call payloads


class Mirror(Room):
    async def reflect(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]


def mirror_app() -> App:
    app = App()
    app.room("/mirror/{name}", Mirror)
    return app


@BOUNDED
@given(
    st.lists(values, max_size=4),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), values, max_size=3),
)
async def test_call_arguments_and_results_arrive_as_msgpack_copies(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    async with RoomsHarness(mirror_app()) as rooms:
        result = await rooms.stub(Mirror, "m").reflect(*args, **kwargs)
    assert same(result, [args, kwargs])


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
        for message in [*fuzzer.received, *watcher.received]:
            assert isinstance(message, str)
            assert isinstance(json.loads(message), dict)
        assert json.loads(watcher.received[-1])["message"] == "still fine"
        assert rooms.metrics.handler_errors_total == 0
        if fuzzer.closed:
            assert fuzzer.close_code == 1009
            assert json.loads(fuzzer.received[-1]) == {"error": "Name too long."}
