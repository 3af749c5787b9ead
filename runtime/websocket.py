"""One WebSocket's data path: the transport a room writes to, and the loop that reads it.

Writes are synchronous: a frame goes straight into the kernel with one ``send()``; only what
the kernel does not take is queued, and a writer task is started just for that connection
until its queue drains. A broadcast therefore encodes its frame once and never awaits per
recipient. Reads: ``Sessions.run`` reads the socket inline (one coroutine per connection, no
helper frames: each is memory per idle connection), parses frames and hands each message to
the connection's ``Target``: its room (``activation.Peer``) or, on a proxied route, its
upstream (``proxy.Upstream``). The closing handshake follows ``handshake.CloseState``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Protocol

import trio

from .admission import TokenBucket
from .config import Settings
from .frames import (
    OP_PING,
    OP_PONG,
    Close,
    FrameParser,
    Ping,
    ProtocolError,
    Received,
    encode_close,
    encode_frame,
    encode_message,
)
from .handshake import CloseState, receive_close, start_close
from .metrics import Histogram, Metrics
from .stream import RECV_SIZE, ConnectionBroken, ReadPoller, Stream, recv_socket

log = logging.getLogger("rooms.edge")

_OPEN, _CLOSING, _BROKEN = CloseState.OPEN, CloseState.CLOSING, CloseState.BROKEN
_WRITE_CHUNK = 256 * 1024
_KEEPALIVE_PING = encode_frame(OP_PING, b"keepalive")
_RATE_ERROR = encode_message('{"error": "too many messages: this one was dropped"}')


class Target(Protocol):
    """Where one WebSocket's messages go: a room (``Peer``) or an upstream (``Upstream``)."""

    @property
    def label(self) -> str:
        """The connection as logs name it, e.g. "connection 1a2b in room Chat:..."."""
        ...

    async def deliver(self, message: str | bytes) -> None:
        """One message from the client (waits while the target cannot take more)."""
        ...

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        """The client's side ended with ``code`` (only the first call counts). With
        ``send_close``, the Close frame to the client goes out in the target's order: a
        room's, after its answers to what the client sent before."""
        ...

    @property
    def route(self) -> str:
        """The pattern of the route the connection came by."""
        ...

    @property
    def room(self) -> str | None:
        """The label of the room it is in (None: a proxied route, a node link, the admin
        page)."""
        ...

    def usage(self) -> dict[str, Any]:
        """This connection's fields of a usage record (route, room or upstream, ids)."""
        ...


class WebSocket:
    """A server-side WebSocket over a socket: the ``Transport`` a room writes to."""

    __slots__ = (
        "_close_sent",
        "_drained",
        "_nursery",
        "bytes_in",
        "bytes_out",
        "close_code",
        "close_reason",
        "closed_by",
        "first_message_timeout",
        "heard",
        "idle_mark",
        "idle_since",
        "message_sizes",
        "messages_in",
        "messages_out",
        "metrics",
        "pending",
        "pending_bytes",
        "pinged_at",
        "rate_limited",
        "read_scope",
        "settings",
        "silent_since",
        "sock",
        "started",
        "state",
        "stream",
        "target",
        "tokens",
        "tokens_at",
        "writing",
    )

    def __init__(
        self, stream: Stream, settings: Settings, metrics: Metrics, nursery: trio.Nursery
    ) -> None:
        self.stream = stream
        self.sock = stream.sock
        self.settings = settings
        self.metrics = metrics
        self._nursery = nursery
        self.target: Target | None = None  # set once the connection joined its room
        self.state = _OPEN
        self.pending: deque[bytes] = deque()  # what the kernel has not taken yet
        self.pending_bytes = 0
        self.writing = False  # a writer task is draining `pending`
        self.read_scope = trio.CancelScope()
        # Keepalive: `heard` is set by every read and cleared by the pinger, which pings a
        # connection silent since `silent_since` and closes it if `pinged_at` goes unanswered.
        self.heard = True
        self.silent_since = 0.0
        self.pinged_at: float | None = None
        now = trio.current_time()
        self.idle_mark, self.idle_since = 0, now  # messages_in when it last changed
        # Seconds after idle_since (its start, until a message comes) by which it must have
        # sent one; 0: no bound.
        self.first_message_timeout = 0.0
        self.message_sizes: Histogram | None = None  # of its route (a node link: none)
        # The message rate bucket, if its settings limit the rate (a node link's do not).
        self.rate_limited = settings.messages_per_second_per_connection > 0
        self.tokens, self.tokens_at = float(settings.message_burst_per_connection), now
        # Accounting (runtime/usage.py): wall-clock start, counts both ways, how it ended.
        self.started = time.time()
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0
        self.closed_by = "network"  # or "client" / "server": who sent the first Close
        self.close_code, self.close_reason = 1006, ""
        self._drained: trio.Event | None = None
        self._close_sent: trio.Event | None = None

    @property
    def label(self) -> str:
        return "connection" if self.target is None else self.target.label

    # -- writing -------------------------------------------------------------------------

    def write(self, frame: bytes, messages: int = 1) -> None:
        if self.state is not _OPEN:
            return
        self.messages_out += messages
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        self.bytes_out += len(frame)
        if self.stream.tls is not None:
            frame = self.stream.encrypt(frame)
        if self.pending:
            self.pending.append(frame)
            self.pending_bytes += len(frame)
            if self.pending_bytes > self.settings.max_outbox_bytes and self.state is _OPEN:
                self._overflow()
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken()
            return
        if sent < len(frame):
            rest = frame[sent:]
            self.pending.append(rest)
            self.pending_bytes += len(rest)
            if not self.writing:
                self.writing = True
                self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        pending = self.pending
        try:
            while pending and self.state is not _BROKEN:
                await trio.lowlevel.wait_writable(self.sock)
                if len(pending) == 1:
                    data = pending[0]
                else:
                    chunk, size = [], 0
                    for frame in pending:
                        chunk.append(frame)
                        size += len(frame)
                        if size >= _WRITE_CHUNK:
                            break
                    data = b"".join(chunk)
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    continue
                except OSError:
                    self._broken()
                    return
                self.pending_bytes -= sent
                while sent:
                    head = pending[0]
                    if len(head) <= sent:
                        sent -= len(head)
                        pending.popleft()
                    else:
                        pending[0] = head[sent:]
                        sent = 0
        finally:
            self.writing = False
            if self._drained is not None:
                self._drained.set()

    def _overflow(self) -> None:
        """The client stopped reading: drop its backlog and close it (1008)."""
        self.metrics.limit_outbox_overflow_total += 1
        log.warning(
            "%s: closed with 1008, over %d bytes queued because the client is not reading",
            self.label,
            self.settings.max_outbox_bytes,
        )
        # Keep the head: it may be a frame already half sent. Under TLS keep everything: a
        # record dropped from the middle would break the stream, and the Close after it.
        while len(self.pending) > 1 and self.stream.tls is None:
            self.pending_bytes -= len(self.pending.pop())
        self.close(1008, "outbox overflow: the client is not reading fast enough")

    async def wait_drained(self, timeout: float) -> None:
        """Wait (bounded) until everything queued reached the kernel."""
        if self.pending and self.state is not _BROKEN:
            self._drained = trio.Event()
            with trio.move_on_after(timeout):
                await self._drained.wait()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int | None, reason: str) -> None:
        """Send a Close frame first (an empty one for ``code`` None) and stop reading soon:
        the client's answer is awaited for ``close_timeout``."""
        if not start_close(self.state):
            return
        self.state = _CLOSING
        self._write(encode_close(code, reason))
        self.closed_by, self.close_code, self.close_reason = "server", code or 1005, reason
        self.read_scope.deadline = min(
            self.read_scope.deadline, trio.current_time() + self.settings.close_timeout
        )
        if self._close_sent is not None:
            self._close_sent.set()

    def received_close(self, close: Close) -> tuple[int, str]:
        """The client's Close arrived: answer it unless ours went first; its code (1005
        for none) and reason."""
        if self.state is _OPEN:
            self.closed_by = "client"
            self.close_code, self.close_reason = close.code or 1005, close.reason
        self.state, answer = receive_close(self.state, close)
        if answer:
            self._write(answer)
        if close.code is None:
            return 1005, ""
        return close.code, close.reason

    def _broken(self) -> None:
        self.state = _BROKEN
        self.pending.clear()
        self.pending_bytes = 0
        self.read_scope.cancel()
        if self._close_sent is not None:
            self._close_sent.set()

    async def wait_close_sent(self, timeout: float) -> bool:
        """Wait (bounded) until a Close frame was queued or the socket failed; whether it was."""
        if self.state is _OPEN:
            self._close_sent = trio.Event()
            with trio.move_on_after(timeout):
                await self._close_sent.wait()
        return self.state is not _OPEN


class _RateLimited(ProtocolError):
    """The client sent past messages_per_second_per_connection (message_rate_action close)."""


class Sessions:
    """Every WebSocket's read loop and timers, for one server. ``first_message_timeouts``:
    the ones in use (the setting's and the room classes' own), so the timers tick often
    enough for the shortest."""

    def __init__(
        self, settings: Settings, metrics: Metrics, first_message_timeouts: list[float]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        periods = [settings.ping_interval, settings.ping_timeout, settings.idle_timeout]
        self.timer_periods = [p for p in periods + first_message_timeouts if p > 0]
        self.reads = ReadPoller()
        self._rate = TokenBucket(
            settings.messages_per_second_per_connection,
            float(settings.message_burst_per_connection),
        )

    async def run(self, ws: WebSocket, data: bytes) -> tuple[int, str]:
        """Read the client's frames (``data``: what came with the upgrade) until it closes,
        handing its messages to ``ws.target``; the code and reason of the client's Close, or
        1006. A protocol violation closes the client in the target's order."""
        target = ws.target
        assert target is not None
        stream, sock = ws.stream, ws.sock
        tls, wait_readable = stream.tls, self.reads.wait_readable
        parser = FrameParser(max_message_size=ws.settings.max_message_bytes)  # (links' own)
        code, reason = 1006, ""
        self.reads.register(sock)
        try:
            with ws.read_scope:
                while True:
                    if data:
                        closed = await self._deliver(ws, parser.feed(data), target)
                        if closed is not None:
                            code, reason = closed
                            break
                        if parser.error is not None:  # after the valid messages before it
                            raise parser.error
                    # Plain sockets are read here directly: no extra coroutine frame, no
                    # per-connection object (both are memory per idle connection).
                    if tls is None:
                        data = await recv_socket(sock, len(data) < RECV_SIZE, wait_readable)
                    else:
                        data = await stream.recv(len(data) < RECV_SIZE, wait_readable)
                    ws.heard = True
                    ws.bytes_in += len(data)
                    if not data:
                        break  # TCP closed without a Close frame
        except ProtocolError as exc:
            self._protocol_error(ws, exc)
            # The target answers what the client sent before the violation, then the
            # Close goes out; a target too busy to get there in time does not keep the
            # socket open.
            target.end(exc.code, exc.reason, send_close=True)
            if not await ws.wait_close_sent(self.settings.close_timeout):
                ws.close(exc.code, exc.reason)
        except ConnectionBroken:
            pass
        finally:
            self.reads.unregister(sock)
            target.end(code, reason)
        return code, reason

    async def _deliver(
        self, ws: WebSocket, received: list[Received], target: Target
    ) -> tuple[int, str] | None:
        """Hand messages to the target and answer pings; the code and reason of a Close."""
        sizes = ws.message_sizes
        for item in received:
            if isinstance(item, (str, bytes)):
                if ws.state is not _OPEN:
                    continue
                ws.messages_in += 1
                if sizes is not None:
                    sizes.observe(len(item))
                if ws.rate_limited and not self._within_rate(ws):
                    continue
                await target.deliver(item)
            elif isinstance(item, Ping):
                ws.write(encode_frame(OP_PONG, item.payload), 0)
            elif isinstance(item, Close):
                return ws.received_close(item)
        return None

    def _within_rate(self, ws: WebSocket) -> bool:
        """Spend one of ``ws``'s message tokens; past the rate, apply the action."""
        now = trio.current_time()
        ws.tokens, wait = self._rate.take(ws.tokens, ws.tokens_at, now)
        ws.tokens_at = now
        if not wait:
            return True
        self.metrics.limit_message_rate_total += 1
        if self.settings.message_rate_action.lower() == "drop":
            ws.write(_RATE_ERROR)  # at once, not in the room's output order
            return False
        # Closed like a protocol error: after the room's answers to the earlier messages.
        raise _RateLimited(1008, "message rate limit exceeded")

    def _protocol_error(self, ws: WebSocket, exc: ProtocolError) -> None:
        if not isinstance(exc, _RateLimited):
            self.metrics.protocol_errors_total += 1
        if exc.code == 1009:
            self.metrics.limit_message_too_big_total += 1
        log.info("%s: closed with %d: %s", ws.label, exc.code, exc.reason)

    async def linger(self, ws: WebSocket, answered: bool) -> None:
        """Let what is queued reach the client before the socket closes. Unless the client
        ``answered`` with its Close (the handshake is complete), also wait (bounded) for it
        to close first, so that a TCP reset does not destroy what was sent last. Not
        shielded: a server being stopped does not wait on its clients."""
        if ws.state is not _BROKEN:
            await ws.wait_drained(self.settings.close_timeout)
            if not answered:
                await ws.stream.lingering_close(self.settings.close_timeout)

    # -- timers --------------------------------------------------------------------------

    async def watch(self, websockets: set[WebSocket]) -> None:
        """One task for every WebSocket's timers (keepalive pings, idle and first-message
        timeouts): a pass over all connections a few times per period costs far less than a
        timer each. Only when ``timer_periods`` has one."""
        settings = self.settings
        tick = max(0.05, min(self.timer_periods) / 4)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for ws in websockets:
                if ws.state is not _OPEN:
                    continue
                if settings.ping_interval:
                    self._keepalive(ws, now)
                if ws.settings.idle_timeout:  # (a node link's is 0)
                    self._idle(ws, now)
                if ws.first_message_timeout:
                    self._first_message(ws, now)

    def _keepalive(self, ws: WebSocket, now: float) -> None:
        """Ping a connection silent for ping_interval; close it if the ping goes unanswered."""
        if ws.heard:
            ws.heard, ws.silent_since, ws.pinged_at = False, now, None
        elif ws.pinged_at is None:
            if now - ws.silent_since >= self.settings.ping_interval:
                ws.write(_KEEPALIVE_PING, 0)
                ws.pinged_at = now
        elif self.settings.ping_timeout and now - ws.pinged_at >= self.settings.ping_timeout:
            self.metrics.keepalive_timeouts_total += 1
            log.info("%s: no answer to a ping; closing (1011)", ws.label)
            ws.close(1011, "keepalive timeout")

    def _idle(self, ws: WebSocket, now: float) -> None:
        """Close a connection whose client sent no message for idle_timeout (1001)."""
        if ws.messages_in != ws.idle_mark:
            ws.idle_mark, ws.idle_since = ws.messages_in, now
        elif now - ws.idle_since >= ws.settings.idle_timeout:
            self.metrics.idle_timeouts_total += 1
            ws.close(1001, "idle timeout")

    def _first_message(self, ws: WebSocket, now: float) -> None:
        """Close a connection that sent nothing within its first_message_timeout (1008)."""
        limit = ws.first_message_timeout
        if ws.messages_in:
            ws.first_message_timeout = 0.0
        elif now - ws.idle_since >= limit:  # (idle_since is its start until a message)
            self.metrics.limit_first_message_total += 1
            ws.close(1008, f"no message within {limit:g} s of connecting")
