"""Fixtures every test directory shares (helpers are in ``tests/support.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from runtime.config import Settings


@pytest.fixture
def settings(tmp_path: object) -> Settings:
    return Settings(host="127.0.0.1", port=0, data_dir=str(tmp_path))


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()
