"""rooms.yjs.DocRoom with the standard y-websocket client (Node, npm, pinned in
tests/system/yjs/package.json), over real sockets, across a ``kill -9``.

``make test`` installs the clients into tests/system/yjs/node_modules; without npm this is
skipped with the reason, except under ``ROOMS_REQUIRE_YJS=1`` (set by ``.ci/run``)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio

from tests.support import REPO, cluster_of, server, wait_for_port

CLIENTS = REPO / "tests" / "system" / "yjs"
APP = "tests.system.yjs_app:app"


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    if found and (CLIENTS / "node_modules" / "y-websocket").exists():
        return found
    reason = f"the y-websocket clients are not installed: cd {CLIENTS} && npm ci"
    if os.environ.get("ROOMS_REQUIRE_YJS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


async def editor(node: str, port: int, *args: str) -> str:
    """Run one y-websocket client on the room "notes": the document's text it ended with."""
    command = [node, str(CLIENTS / "editor.mjs"), f"ws://127.0.0.1:{port}/yjs", "notes", *args]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    content: str = json.loads(done.stdout)["content"]
    return content


async def test_two_clients_converge_and_their_edits_survive_kill_9(
    node: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with server(APP, REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        found: list[str] = []
        async with trio.open_nursery() as nursery:
            for me, other in (("from ada; ", "from bob; "), ("from bob; ", "from ada; ")):

                async def write(me: str = me, other: str = other) -> None:
                    found.append(await editor(node, port, "--insert", me, "--expect", other))

                nursery.start_soon(write)
        assert found[0] == found[1] and "from ada; " in found[0] and "from bob; " in found[0]
        proc.send_signal(9)  # kill -9: each saw the other's edit, so both were stored
        proc.wait()
    with server(APP, REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        content = await editor(node, port, "--expect", "from ada; ", "--expect", "from bob; ")
        assert content == found[0]


async def test_a_long_edit_session_keeps_the_stored_document_bounded(
    node: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with server(APP, REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        await editor(node, port, "--edits", "600", "--insert", "end")
        proc.terminate()
        proc.wait()
    with sqlite3.connect(data / "rooms.sqlite3") as db:
        rows = db.execute("SELECT key, length(value) FROM kv").fetchall()
    logs = [size for key, size in rows if key.startswith("yjs:u:")]
    assert len(logs) < 50 and any(key == "yjs:snapshot" for key, _ in rows)  # compacted
    assert sum(size for _, size in rows) < 600 * 20  # not the 600 updates' full history
    with server(APP, REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        content = await editor(node, port, "--expect", "end")
        assert content == "end" + "0123456789" * 60  # every edit, in order


async def test_a_document_on_a_cluster_serves_every_node_and_outlives_its_node(
    node: str, pg_dsn: str, tmp_path: Path
) -> None:
    """Cluster mode: two y-websocket clients through different nodes edit one document (one
    of them forwarded over the node link, binary frames and all); its node is killed with
    ``kill -9``; a client through the other node gets every edit, from PostgreSQL."""
    async with cluster_of(pg_dsn, 2, tmp_path, app=APP) as (home, far):
        found: list[str] = []
        async with trio.open_nursery() as nursery:
            for port, me, other in (
                (home.port, "at home; ", "far away; "),
                (far.port, "far away; ", "at home; "),
            ):

                async def write(port: int = port, me: str = me, other: str = other) -> None:
                    found.append(await editor(node, port, "--insert", me, "--expect", other))

                nursery.start_soon(write)
                await trio.sleep(0.5)  # (home's client first: the document lives there)
        assert found[0] == found[1]
        home.kill_9()
        content = await editor(node, far.port, "--expect", "at home; ", "--expect", "far away; ")
        assert content == found[0]
