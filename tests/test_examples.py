"""The README's examples, run as written."""

from __future__ import annotations

from pathlib import Path

from examples.counter.app import app
from rooms.testing import RoomsHarness


async def test_counter() -> None:
    async with RoomsHarness(app) as rooms:
        alice = await rooms.connect("/counter/lobby")
        assert await alice.receive() == "0"
        await alice.send("+1")
        assert await alice.receive() == "1"
        response = await rooms.request("GET", "/counter/lobby")
        assert response.status == 426


async def test_counter_survives_a_restart(tmp_path: Path) -> None:
    for expected in ("0", "1"):
        async with RoomsHarness(app, data_dir=tmp_path) as rooms:
            bob = await rooms.connect("/counter/kept")
            assert await bob.receive() == expected
            await bob.send("+1")
            assert await bob.receive() == str(int(expected) + 1)
