"""Property tests (hypothesis) of the msgpack value codec (``rooms._codec``) behind storage,
connection state and calls, and of call payloads end to end.

Every property is bounded (max_examples, no deadline flakiness on a shared machine)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
