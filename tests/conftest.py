"""Fixtures every test directory shares (helpers are in ``tests/support.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from rooms.testing import virtual_clock
from runtime.config import Settings


@pytest.fixture
def settings(tmp_path: object) -> Settings:
    return Settings(host="127.0.0.1", port=0, data_dir=str(tmp_path))


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A virtual clock (pytest-trio runs a test on a fixture's Clock): hours pass at once,
    and it never jumps while the storage thread is working."""
    return virtual_clock()
