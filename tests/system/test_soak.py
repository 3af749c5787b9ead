"""A short soak inside the suite (``make soak`` runs the long one, 3 minutes): 500 WebSockets
in 50 rooms of a real server process, each sending once a second for 20 s; after a warm-up
its RSS and descriptors stay flat, no connection is closed and every broadcast arrives."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio

from tests.support import REPO, server, wait_for_port_sync
from tests.system.soak import soak


def test_a_short_soak_is_flat_and_loses_nothing() -> None:
    args = argparse.Namespace(connections=500, rooms=50, seconds=20.0, interval=1.0)
    with (
        tempfile.TemporaryDirectory() as data,
        server("examples.echo.app:app", REPO, Path(data)) as (proc, port),
    ):
        wait_for_port_sync(port, proc)
        assert trio.run(soak, port, proc.pid, args)
