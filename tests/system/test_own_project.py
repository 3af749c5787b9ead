"""A user's own project, outside the checkout, as the quick start describes it: a wheel built
from this repository installed into a new virtualenv, a one-file app, a test of it with
``RoomsHarness`` run by pytest, and ``rooms dev`` serving it and restarting on a change."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import rooms.client
from tests.support import REPO, free_port, wait_for_port_sync

APP = """\
from rooms import App, Connection, Request, Room


class Poll(Room):
    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(f"GREETING {await self.storage.get('votes', 0)}")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        votes = await self.storage.get("votes", 0) + 1
        self.storage.put("votes", votes)
        self.broadcast(str(votes))


app = App()
app.room("/poll/{name}", Poll)
"""

TEST = """\
from rooms.testing import RoomsHarness

from app import app


async def test_a_vote_is_counted_and_kept(tmp_path) -> None:
    async with RoomsHarness(app, data_dir=tmp_path) as rooms:
        ada = await rooms.connect("/poll/lunch")
        assert await ada.receive() == "votes 0"
        await ada.send("pizza")
        assert await ada.receive() == "1"
    async with RoomsHarness(app, data_dir=tmp_path) as rooms:  # a restart keeps it
        grace = await rooms.connect("/poll/lunch")
        assert await grace.receive() == "votes 1"
"""

PYPROJECT = """\
[tool.pytest.ini_options]
trio_mode = true
"""


def run(*command: str | Path, cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv outside the checkout with Rooms installed from a wheel of it."""
    root = tmp_path_factory.mktemp("own")
    source = root / "source"  # the package's files only: the build writes next to them
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("rooms", "runtime"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "-w",
        root / "dist",
        source,
        cwd=root,
    )
    wheels = list((root / "dist").glob("trio_rooms-*.whl"))
    assert len(wheels) == 1
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=root)
    run(venv / "bin" / "pip", "install", "-q", wheels[0], "pytest", "pytest-trio", cwd=root)
    return venv


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "poll"
    folder.mkdir()
    (folder / "app.py").write_text(APP.replace("GREETING", "votes"))
    (folder / "test_app.py").write_text(TEST)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    return folder


def test_the_sdk_comes_from_the_virtualenv_not_the_checkout(installed: Path, project: Path) -> None:
    where = run(
        installed / "bin" / "python",
        "-c",
        "import rooms, runtime; print(rooms.__file__)",
        cwd=project,
    )
    assert str(installed) in where and str(REPO) not in where


def test_the_users_own_test_passes(installed: Path, project: Path) -> None:
    out = run(
        installed / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project
    )
    assert "1 passed" in out


def test_rooms_dev_serves_the_project_and_reloads_it(installed: Path, project: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    command = [str(installed / "bin" / "rooms"), "dev", "app:app", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=project, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_port_sync(port, proc)

        async def visit() -> None:
            url = f"ws://127.0.0.1:{port}/poll/dinner"
            async with rooms.client.connect(url, min_delay=0.05, max_delay=0.5) as poll:
                assert await poll.receive() == "votes 0"
                await poll.send("soup")
                assert await poll.receive() == "1"
                (project / "app.py").write_text(APP.replace("GREETING", "tally"))
                with trio.fail_after(20):
                    assert await poll.receive() == "tally 1"  # new code, same storage

        trio.run(visit)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert (project / "data" / "rooms.sqlite3").exists()  # its own data folder
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
