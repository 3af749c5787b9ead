"""Autobahn|Testsuite's fuzzingclient, every case, against ``examples.echo`` run by ``rooms serve``.

wstest needs Python 2.7; ``tests/system/autobahn/install.sh`` (run by ``make test``) installs
it into ``.autobahn/``. Where that is impossible the test is skipped with the reason, except under
``ROOMS_REQUIRE_AUTOBAHN=1`` (set by ``.ci/run``), where a missing wstest is a failure.

wstest exits 0 whatever happens, so the verdict comes from its ``index.json`` and per-case
reports: no case may fail or be merely NON-STRICT, and whenever the server is the one that must
fail the connection it sends a Close frame with the code the case expects (1002 protocol error,
1007 invalid UTF-8) instead of dropping TCP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support import REPO, server, wait_for_port

WSTEST = Path(os.environ.get("ROOMS_WSTEST", REPO / ".autobahn" / "py27" / "bin" / "wstest"))
# Outcomes that are not failures: OK; INFORMATIONAL (nothing to judge, e.g. the close reason
# echoed); UNIMPLEMENTED (sections 12 and 13, permessage-deflate, which is not offered).
ACCEPTED = {"OK", "INFORMATIONAL", "UNIMPLEMENTED"}


@pytest.fixture
def wstest() -> Path:
    if WSTEST.exists():
        return WSTEST
    reason = (
        f"Autobahn|Testsuite is not installed at {WSTEST}: run tests/system/autobahn/install.sh "
        "(needs Python 2.7; set PYTHON27 if it is not found)"
    )
    if os.environ.get("ROOMS_REQUIRE_AUTOBAHN") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


async def run_fuzzingclient(wstest: Path, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Every case against a fresh server; the report of each case by id."""
    config = tmp_path / "rooms.toml"
    config.write_text("max_message_bytes = 16777216\n")  # section 9 sends 16 MiB messages
    with server("examples.echo.app:app", REPO, tmp_path / "data", "--config", str(config)) as (
        proc,
        port,
    ):
        await wait_for_port(port, proc)
        spec = {
            "outdir": str(tmp_path / "reports"),
            "servers": [{"agent": "rooms", "url": f"ws://127.0.0.1:{port}/echo/autobahn"}],
            "cases": ["*"],
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        with trio.fail_after(600):
            done = await trio.run_process(
                [str(wstest), "-m", "fuzzingclient", "-s", "spec.json"],
                cwd=tmp_path,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert proc.poll() is None, "the server died during the suite"
    index_file = tmp_path / "reports" / "index.json"
    assert index_file.exists(), done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    results: dict[str, dict[str, Any]] = json.loads(index_file.read_text())["rooms"]
    return {
        case: json.loads((tmp_path / "reports" / entry["reportfile"]).read_text())
        for case, entry in results.items()
    }


async def test_autobahn_fuzzingclient_all_cases(wstest: Path, tmp_path: Path) -> None:
    reports = await run_fuzzingclient(wstest, tmp_path)
    assert len(reports) == 517  # every case of the pinned suite ran

    bad = {
        case: f"{r['behavior']}/{r['behaviorClose']}: {r['result']} {r['resultClose']}"
        for case, r in reports.items()
        if r["behavior"] not in ACCEPTED or r["behaviorClose"] not in ACCEPTED
    }
    assert not bad, bad
    unimplemented = {c for c, r in reports.items() if r["behavior"] == "UNIMPLEMENTED"}
    assert all(c.startswith(("12.", "13.")) for c in unimplemented), unimplemented

    # Where the server must fail the connection, it says why in a Close frame.
    failed_by_server = {c: r for c, r in reports.items() if not r["expectedClose"]["closedByMe"]}
    assert len(failed_by_server) > 100
    wrong_close = {
        case: (r["remoteCloseCode"], r["expectedClose"]["closeCode"])
        for case, r in failed_by_server.items()
        if r["remoteCloseCode"] not in r["expectedClose"]["closeCode"]
    }
    assert not wrong_close, wrong_close
    codes = {r["remoteCloseCode"] for r in failed_by_server.values()}
    assert {1002, 1007} <= codes  # (1009 is tested in test_hostile.py: section 9 fits the limit)
