"""``rooms dev MODULE:APP``: serve, and start again whenever a source file changes.

A supervisor (this process) listens on the port itself and runs ``rooms serve`` as a child on
that socket (``--fd``), so the port stays bound across restarts: connections that arrive
while the new code starts wait in the backlog instead of being refused. It watches the
current folder (``watchfiles``) for changed sources (Python, HTML, JavaScript, CSS, JSON,
TOML), never the data folder; on a change it logs one line, stops the child as a deploy does
(SIGTERM: WebSockets closed with 1012, so ``/_rooms/client.js`` and ``rooms.client``
reconnect by themselves) and starts a new one. A child that fails to start (a syntax error)
is reported and the supervisor waits for the next change.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import trio
import watchfiles

from .config import Settings

Changes = AsyncGenerator[set[tuple[watchfiles.Change, str]], None]
SOURCES = (".py", ".pyi", ".html", ".htm", ".js", ".mjs", ".css", ".svg", ".json", ".toml")


class SourceFilter(watchfiles.DefaultFilter):
    """Source files below the watched folder, outside ``data_dir`` (whose database changes
    with every commit) and the folders watchfiles already ignores (.git, .venv, caches)."""

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self._data = str(Path(data_dir).resolve()) if data_dir != ":memory:" else None

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if not path.endswith(SOURCES) or not super().__call__(change, path):
            return False
        return self._data is None or not (path + os.sep).startswith(self._data + os.sep)


async def supervise(
    serve_argv: Sequence[str], listener: socket.socket, settings: Settings, root: Path
) -> None:
    """Run ``rooms serve *serve_argv`` on ``listener`` again after every change below
    ``root``, until SIGINT or SIGTERM (then the server drains first)."""
    command = [sys.executable, "-m", "runtime.cli", "serve", *serve_argv]
    command += ["--fd", str(listener.fileno())]
    changes = watchfiles.awatch(root, watch_filter=SourceFilter(settings.data_dir), debounce=300)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_restarts, command, listener.fileno(), changes, settings)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _restarts(command: list[str], fd: int, changes: Changes, settings: Settings) -> None:
    while True:
        child = await trio.lowlevel.open_process(command, pass_fds=(fd,))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_report_exit, child)
                changed = await _next_change(changes)
                print(f"rooms dev: {changed}; restarting", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(child, settings.drain_timeout + 2)


async def _report_exit(child: trio.Process) -> None:
    code = await child.wait()
    if code not in (0, -signal.SIGTERM):
        print(
            f"rooms dev: the server exited with {code}; fix the error and save to start it again",
            file=sys.stderr,
            flush=True,
        )


async def _next_change(changes: Changes) -> str:
    """A line naming what changed (the first few files)."""
    batch = await changes.__anext__()
    names = sorted({Path(path).name for _, path in batch})
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more} changed"


async def _stop(child: trio.Process, timeout: float) -> None:
    """Stop ``child`` as a deploy would (SIGTERM, a drain), killing it if it lingers."""
    if child.returncode is not None:
        return
    child.send_signal(signal.SIGTERM)
    with trio.move_on_after(timeout):
        await child.wait()
        return
    child.kill()
    await child.wait()


def run(serve_argv: Sequence[str], listener: socket.socket, settings: Settings) -> int:
    """``rooms dev``: supervise until Ctrl+C or SIGTERM; the exit code."""
    print(
        f"rooms dev: serving on http://{settings.host}:{listener.getsockname()[1]}, "
        f"watching {Path.cwd()} (Ctrl+C to stop)",
        file=sys.stderr,
        flush=True,
    )
    trio.run(supervise, serve_argv, listener, settings, Path.cwd())
    return 0
