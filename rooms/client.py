"""A Python client for a Rooms server that stays connected, for bots, services and tests.

    import rooms.client

    async with rooms.client.connect(
        "ws://127.0.0.1:8000/api/room/lobby/websocket",
        hello=lambda: json.dumps({"name": "bot", "after": last_seq}),
    ) as room:
        await room.send(json.dumps({"message": "hello"}))
        async for message in room:
            ...

It keeps the rules of the browser client (``/_rooms/client.js``):

- After any close or network failure it connects again after a delay drawn uniformly from
  ``[0, min(max_delay, min_delay * 2**attempt))`` ("full jitter"), so that thousands of clients
  dropped at once (a server restart closes them with 1012) do not come back at once. The
  attempt count resets when a connection receives its first message (the room accepted it).
- An upgrade refused with 429 or 503 waits at least the ``Retry-After`` the server gave.
- It gives up on the close codes that say retrying is pointless (1002, 1003, 1007 to 1010,
  and 4400 to 4499: a room's way to turn a client away) and on an upgrade refused with another
  4xx status (401, 403, 404...): ``receive``, ``send`` and iteration then raise
  ``ConnectionClosed`` with the code (or status) and reason.
- ``hello()`` is called on every connection and what it returns (a message, a list of them,
  or None) is sent first: the place to resume, e.g. "everything after the last seq I saw".
  Then what was sent while disconnected goes out, in order. That queue is bounded
  (``max_queued``): past it ``send`` waits until a connection takes the queue.
- Heartbeat: after ``heartbeat_interval`` seconds without a message it pings; no pong within
  ``heartbeat_timeout`` means the connection is dead (a vanished network does not say so),
  and it is replaced.

``state`` is "connecting", "open", "waiting" (for the next attempt) or "closed" (for good).
"""

from __future__ import annotations

import inspect
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

__all__ = ["ConnectionClosed", "RoomClient", "connect"]

log = logging.getLogger("rooms.client")

FINAL_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
"""Close codes after which reconnecting would not help (plus 4400 to 4499)."""

Message = str | bytes
Hello = Callable[[], Message | Iterable[Message] | Awaitable[Any] | None]


class ConnectionClosed(Exception):
    """The client gave up: the server closed with ``code`` and ``reason`` in a way that says
    retrying is pointless, or refused the upgrade (``status``, the HTTP status; ``code`` is
    then that status too), or the client was closed (1000)."""

    def __init__(self, code: int, reason: str, status: int | None = None) -> None:
        if status is not None:
            text = f"the server refused the WebSocket upgrade with HTTP {status}: {reason}"
        else:
            text = f"the connection was closed with {code}" + (f" ({reason})" if reason else "")
        super().__init__(text)
        self.code = code
        self.reason = reason
        self.status = status


class RoomClient:
    """A connection to one room URL that reconnects by itself; made by ``connect``."""

    def __init__(
        self,
        url: str,
        hello: Hello | None = None,
        headers: Iterable[tuple[str, str]] | None = None,
        *,
        min_delay: float = 0.5,
        max_delay: float = 15.0,
        connect_timeout: float = 10.0,
        max_queued: int = 100,
        heartbeat_interval: float = 25.0,
        heartbeat_timeout: float = 10.0,
        subprotocols: Iterable[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = 1 << 20,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"rooms.client.connect needs a ws:// or wss:// URL, not {url!r}")
        self.url = url
        self._hello = hello
        self._headers = [(k.encode(), v.encode()) for k, v in headers or ()]
        self._min_delay, self._max_delay = min_delay, max_delay
        self._connect_timeout = connect_timeout
        self._max_queued = max_queued
        self._heartbeat = (heartbeat_interval, heartbeat_timeout)
        self._subprotocols = list(subprotocols)
        self._ssl_context = ssl_context
        self._max_message_size = max_message_size
        self.state = "connecting"
        self.attempt = 0
        """Connection attempts since one last received a message."""
        self.last_close: tuple[int, str] | None = None
        """The code and reason of the last connection's end (1006: it was lost)."""
        self._queue: deque[Message] = deque()
        self._ws: trio_websocket.WebSocketConnection | None = None  # open, hello sent
        self._inbox_in, self._inbox = trio.open_memory_channel[Message](64)
        self._ended: ConnectionClosed | None = None
        self._closed_by_us = False
        self._changed = trio.Event()
        self._heard_at = 0.0
        self._dead = False  # the heartbeat found the connection dead
        self._stop = trio.CancelScope()

    # -- what the caller uses ------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send now if connected; else queue it for the next connection (waiting while the
        queue holds ``max_queued`` messages). ConnectionClosed once the client gave up."""
        while True:
            if self._ended is not None:
                raise self._ended
            ws = self._ws
            if ws is not None:
                try:
                    await ws.send_message(message)
                    return
                except trio_websocket.ConnectionClosed:
                    pass  # lost meanwhile: queued for the next connection below
            if len(self._queue) < self._max_queued:
                self._queue.append(message)
                return
            await self._wait_for_change()

    async def receive(self) -> Message:
        """The next message from the room (across reconnections); ConnectionClosed once the
        client gave up or was closed."""
        try:
            return await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._ended or ConnectionClosed(1000, "closed") from None

    def __aiter__(self) -> RoomClient:
        return self

    async def __anext__(self) -> Message:
        """The next message; iteration ends when the client is closed, raises if it gave up."""
        try:
            return await self.receive()
        except ConnectionClosed:
            if self._closed_by_us:
                raise StopAsyncIteration from None
            raise

    async def wait_open(self) -> None:
        """Until a connection is open (hello sent); ConnectionClosed if the client gave up."""
        while self.state != "open":
            if self._ended is not None:
                raise self._ended
            await self._wait_for_change()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good: no more reconnects; queued messages are dropped."""
        if self._ended is None:
            self._closed_by_us = True
            self._end(ConnectionClosed(1000, reason))
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(2):
                await ws.aclose(code, reason)
        self._stop.cancel()

    # -- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, until closed or given up (``connect`` runs it)."""
        with self._stop:
            while self._ended is None:
                delay = await self._attempt()
                if self._ended is not None:
                    break
                self._set_state("waiting")
                await trio.sleep(delay)
        self._set_state("closed")

    async def _attempt(self) -> float:
        """One connection, from its upgrade to its end; the delay before the next one."""
        self._set_state("connecting")
        self._dead = False
        retry_after = 0.0
        try:
            async with trio_websocket.open_websocket_url(
                self.url,
                self._ssl_context,
                subprotocols=self._subprotocols or None,
                extra_headers=self._headers,
                max_message_size=self._max_message_size,
                connect_timeout=self._connect_timeout,
                disconnect_timeout=1,
            ) as ws:
                await self._serve(ws)
            closed = ws.closed
            self.last_close = (closed.code, closed.reason or "") if closed else (1006, "")
        except trio_websocket.ConnectionRejected as refused:
            status, body = refused.status_code, (refused.body or b"").decode("utf-8", "replace")
            self.last_close = (status, body.strip())
            if status in (429, 503):
                retry_after = _retry_after(refused.headers)
            elif 400 <= status < 500:
                self._end(ConnectionClosed(status, body.strip(), status))
                return 0.0
        except (trio_websocket.HandshakeError, OSError, trio_websocket.ConnectionClosed) as exc:
            self.last_close = (1006, str(exc.__cause__ or exc))
        finally:
            self._ws = None
        if self._dead:
            self.last_close = (1006, "no answer to a heartbeat ping")
        code, reason = self.last_close
        if code in FINAL_CODES or 4400 <= code <= 4499:
            self._end(ConnectionClosed(code, reason))
            return 0.0
        ceiling = min(self._max_delay, self._min_delay * 2**self.attempt)
        self.attempt += 1
        delay = max(retry_after, random.uniform(0, ceiling))
        log.info("%s: ended with %d %s; connecting again in %.2f s", self.url, code, reason, delay)
        return delay

    async def _serve(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Hello first, then the queue, then messages both ways until the connection ends."""
        for message in await self._hello_messages():
            await ws.send_message(message)
        while self._queue:  # what the caller sent meanwhile joins the end of it
            await ws.send_message(self._queue[0])
            self._queue.popleft()
            self._notify()
        self._ws = ws
        self._set_state("open")
        self._heard_at = trio.current_time()
        self._dead = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_alive, ws, nursery.cancel_scope)
            first = True
            try:
                while True:
                    message = await ws.get_message()
                    self._heard_at = trio.current_time()
                    if first:
                        self.attempt, first = 0, False  # the room accepted this connection
                    await self._inbox_in.send(message)
            except (trio_websocket.ConnectionClosed, trio.ClosedResourceError):
                pass  # the connection ended, or the client was closed
            nursery.cancel_scope.cancel()

    async def _keep_alive(
        self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        interval, timeout = self._heartbeat
        while True:
            await trio.sleep_until(self._heard_at + interval)
            if trio.current_time() < self._heard_at + interval:
                continue  # heard from meanwhile
            try:
                with trio.move_on_after(timeout) as waited:
                    await ws.ping()
            except trio_websocket.ConnectionClosed:
                return
            if waited.cancelled_caught:
                log.info("%s: no answer to a ping in %g s; replacing it", self.url, timeout)
                self._dead = True
                scope.cancel()
                return
            self._heard_at = trio.current_time()

    async def _hello_messages(self) -> list[Message]:
        if self._hello is None:
            return []
        first = self._hello()
        if inspect.isawaitable(first):
            first = await first
        if first is None:
            return []
        if isinstance(first, (str, bytes)):
            return [first]
        return list(first)

    # -- state -----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()

    def _end(self, closed: ConnectionClosed) -> None:
        self._ended = closed
        self._queue.clear()
        self._inbox_in.close()
        self._notify()


def _retry_after(headers: Iterable[tuple[bytes, bytes]]) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


@asynccontextmanager
async def connect(
    url: str,
    hello: Hello | None = None,
    headers: Iterable[tuple[str, str]] | None = None,
    **options: Any,
) -> AsyncIterator[RoomClient]:
    """A ``RoomClient`` for ``url`` (``ws://`` or ``wss://``), connecting in the background
    for as long as the ``async with`` lasts; ``options`` are ``RoomClient``'s (delays,
    timeouts, ``max_queued``, heartbeat, ``subprotocols``, ``ssl_context``). Leaving the
    block closes it with 1000."""
    client = RoomClient(url, hello, headers, **options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, name=f"rooms.client {url}")
        try:
            yield client
        finally:
            await client.close()
