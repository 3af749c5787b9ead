"""Raw clients for the system tests: a ``rooms serve`` process as the tests see it (its
descriptors and memory), HTTP bytes and a WebSocket client that sends whatever it is given."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import attrs
import trio

from runtime.frames import Close, FrameParser, encode_frame
from tests.support import raw_request


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()


MASK = b"\x37\xfa\x21\x3d"


@attrs.frozen
class Server:
    pid: int
    port: int
    folder: Path

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


async def fds_back_to(srv: Server, baseline: int) -> None:
    for _ in range(200):  # up to 10 s
        if srv.fds() <= baseline:
            break
        await trio.sleep(0.05)
    assert srv.fds() <= baseline, f"{srv.fds()} descriptors open, {baseline} before the test"


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def upgrade(path: str, key: bytes | None = None, extra: bytes = b"") -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16))
    return (
        f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n".encode()
        + b"sec-websocket-key: "
        + key
        + b"\r\n"
        + (extra or b"sec-websocket-version: 13\r\n")
        + b"\r\n"
    )


class RawWebSocket:
    """A client that sends whatever bytes it is given and parses what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = FrameParser(client=True, max_message_size=1 << 30)
        self.events: list[Any] = []

    @classmethod
    async def connect(
        cls, port: int, path: str = "/echo/hostile", headers: bytes = b""
    ) -> RawWebSocket:
        """A WebSocket to ``path``, with ``headers`` (lines ending in CRLF) in its upgrade."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(upgrade(path, extra=b"sec-websocket-version: 13\r\n" + headers))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head
        ws = cls(stream)
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            ws.events += ws.parser.feed(rest)
        return ws

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self, timeout: float = 5) -> Any:
        """The next message, Ping, Pong or Close; None if TCP closed first."""
        with trio.fail_after(timeout):
            while not self.events:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not chunk:
                    return None
                self.events += self.parser.feed(chunk)
            return self.events.pop(0)

    async def close_received(self, timeout: float = 5) -> tuple[int | None, str]:
        """Skip messages until the server's Close; its code and reason."""
        while True:
            event = await self.next_event(timeout)
            assert event is not None, "TCP closed without a Close frame"
            if isinstance(event, Close):
                return event.code, event.reason

    async def aclose(self) -> None:
        await self.stream.aclose()


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


async def open_websockets(port: int) -> int:
    response = await raw_request(port, get("/_rooms/metrics"))
    for line in response.decode().splitlines():
        if line.startswith("rooms_websockets_open "):
            return int(float(line.split()[1]))
    raise AssertionError(response)
