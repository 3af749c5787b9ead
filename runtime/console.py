"""The terminal side of ``rooms connect``: lines read from stdin, messages written to stdout.

Text messages are written as they are, binary ones as ``<binary N bytes: HEX>`` (the first 32
bytes); with a terminal on both sides, in the wscat look (a ``> `` prompt, ``< `` before each
message). A reader that closes stdout (``| head``) ends the session quietly.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import BinaryIO, TextIO

import trio

BINARY_PREVIEW = 32
"""Bytes of a binary message shown, in hex."""


def describe_binary(data: bytes) -> str:
    """How a binary message is shown: ``<binary N bytes: HEX>`` (``...`` when cut)."""
    preview = data[:BINARY_PREVIEW].hex()
    more = "..." if len(data) > BINARY_PREVIEW else ""
    return f"<binary {len(data)} bytes: {preview}{more}>"


class OutputClosed(Exception):
    """stdout was closed by its reader (``rooms connect ... | head``)."""


class Output:
    """Writes incoming messages on stdout, one per line, flushed at once."""

    def __init__(self, stream: TextIO, *, decorated: bool) -> None:
        self.stream = stream
        self.decorated = decorated
        self.prompting = False

    def _write(self, text: str) -> None:
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self.stream, "encoding", None) or "ascii"
                self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            self.stream.flush()
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def message(self, message: str | bytes) -> None:
        text = message if isinstance(message, str) else describe_binary(message)
        if self.decorated:
            # Like wscat: clear the prompt line, show the message, show the prompt again.
            self._write(f"\r\x1b[K< {text}\n" + ("> " if self.prompting else ""))
        else:
            self._write(text + "\n")

    def prompt(self) -> None:
        if self.decorated:
            self.prompting = True
            self._write("> ")

    def end_prompt(self) -> None:
        if self.decorated and self.prompting:
            self.prompting = False
            self._write("\n")


def silence_stdout() -> None:
    """After a broken pipe, point fd 1 at /dev/null so the final flush at exit does not fail."""
    stdout = sys.__stdout__
    if stdout is None or sys.stdout is not stdout:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


class StdinLines:
    """Lines of stdin (without their line ending), read in a worker thread.

    Not ``trio.wrap_file(sys.stdin)``: its reads cannot be cancelled while blocked, and the server
    closing must end the session at once, so the read is abandoned instead
    (``abandon_on_cancel``). The thread reads the file descriptor with ``os.read`` rather than
    through ``sys.stdin``: an abandoned thread blocked inside ``sys.stdin.buffer`` holds its lock,
    and the interpreter then aborts at exit ("could not acquire lock for <stdin>").
    """

    CHUNK = 65536

    def __init__(self, stdin: TextIO) -> None:
        self._read = self._reader(stdin)
        self._pending = b""
        self._eof = False

    @classmethod
    def _reader(cls, stdin: TextIO) -> Callable[[], bytes]:
        try:
            fd = stdin.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd >= 0:
            return lambda: os.read(fd, cls.CHUNK)
        buffer: BinaryIO | None = getattr(stdin, "buffer", None)  # e.g. an in-memory stdin
        if buffer is None:
            raise ValueError("stdin can be read neither as a file descriptor nor as bytes")
        return buffer.readline

    async def readline(self) -> bytes | None:
        """The next line, or ``None`` at end of input (a last unterminated line is a line)."""
        while b"\n" not in self._pending and not self._eof:
            chunk = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
            if chunk:
                self._pending += chunk
            else:
                self._eof = True
        line, newline, rest = self._pending.partition(b"\n")
        if not newline and not line:
            return None
        self._pending = rest
        return line.removesuffix(b"\r")
