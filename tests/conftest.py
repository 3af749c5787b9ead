"""Fixtures every test directory shares (helpers are in ``tests/support.py``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from rooms.testing import virtual_clock
from runtime.config import Settings
from tests.support import POSTGRES, fresh_database


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


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped after the test. Without a
    server the test is skipped, unless ROOMS_REQUIRE_POSTGRES is set (CI sets it): then it
    fails."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("the cluster tests need psycopg: pip install -e '.[dev]'")
    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL at {POSTGRES} (set ROOMS_TEST_POSTGRES): {exc}"
        if os.environ.get("ROOMS_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    with fresh_database() as dsn:
        yield dsn
