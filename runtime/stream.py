"""A client connection's bytes: a non-blocking socket, with TLS over it when the server has
a certificate, and the one epoll set that tells the WebSockets' readers when to read.

The edge reads and writes the socket itself (one ``recv``, one ``send``, no task per write).
TLS keeps that shape by going through ``ssl.MemoryBIO``: ``encrypt`` turns the bytes to send
into TLS records the caller writes as before, and ``recv`` decrypts what the socket gave.
Every complete record is decrypted at once, so nothing readable hides in an OpenSSL buffer
where an edge-triggered poller would never report it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

RECV_SIZE = 65536
_WaitReadable = Callable[[socket.socket], Awaitable[None]]


class ConnectionBroken(Exception):
    """The connection failed (reset, TLS error); there is nobody left to answer."""


async def recv_socket(
    sock: socket.socket,
    wait_first: bool,
    wait_readable: _WaitReadable = trio.lowlevel.wait_readable,
) -> bytes:
    """Bytes from a plain socket (b"" at its end), waiting until some arrive."""
    if wait_first:
        await wait_readable(sock)
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        except OSError as exc:
            raise ConnectionBroken(str(exc)) from None
        if not wait_first:
            await trio.lowlevel.checkpoint()
        return data


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise ConnectionBroken(str(exc)) from None


class Stream:
    """A connection to a client; ``tls`` is None for plain TCP."""

    __slots__ = ("_drained", "_eof", "_incoming", "_outgoing", "sock", "tls")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext | None = None) -> None:
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        if context is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._eof = False
        self._drained = False  # the last read from the socket was short: it is empty now

    async def handshake(self, timeout: float) -> None:
        """The TLS handshake, within ``timeout`` seconds (no-op for plain TCP)."""
        tls = self.tls
        if tls is None:
            return
        with trio.move_on_after(timeout):
            while True:
                try:
                    tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    with _quietly():
                        await _send_all(self.sock, self._outgoing.read())  # the alert
                    raise ConnectionBroken(f"TLS handshake failed: {exc.reason or exc}") from None
                await _send_all(self.sock, self._outgoing.read())
                if done:
                    return
                data = await recv_socket(self.sock, False, trio.lowlevel.wait_readable)
                if not data:
                    raise ConnectionBroken("the client closed during the TLS handshake")
                self._incoming.write(data)
        raise ConnectionBroken(f"TLS handshake not finished within {timeout:g} s")

    async def recv(
        self,
        wait_first: bool = False,
        wait_readable: _WaitReadable = trio.lowlevel.wait_readable,
    ) -> bytes:
        """Bytes from the client (b"" at the end), waiting until some arrive.

        ``wait_first`` skips the first attempt: after a short read the socket is most likely
        empty, and a recv() that fails costs a system call and an exception."""
        if self.tls is None:
            return await recv_socket(self.sock, wait_first, wait_readable)
        if self._incoming.pending and (data := self._decrypt()):
            return data  # records that came with the handshake's last flight
        while not self._eof:
            # The caller's wait_first judged the plaintext; what matters is the last read.
            raw = await recv_socket(self.sock, self._drained, wait_readable)
            self._drained = len(raw) < RECV_SIZE
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()
            if data := self._decrypt():
                return data
        return b""

    def _decrypt(self) -> bytes:
        assert self.tls is not None
        chunks = []
        while True:
            try:
                chunk = self.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break  # a partial record: the rest is still on its way
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                break
            except ssl.SSLError as exc:
                raise ConnectionBroken(f"TLS error: {exc.reason or exc}") from None
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """What to write to the socket to send ``data`` (``data`` itself without TLS)."""
        if self.tls is None:
            return data
        self.tls.write(data)
        return self._outgoing.read()

    async def send_all(self, data: bytes) -> None:
        await _send_all(self.sock, self.encrypt(data))

    async def lingering_close(self, timeout: float) -> None:
        """Half-close, then read until the client closes too (bounded), so that what we sent
        last (a Close frame, an error response) is not destroyed by a TCP reset."""
        if self.tls is not None:
            with _quietly():
                self.tls.unwrap()  # queues TLS close_notify
            with _quietly():
                await _send_all(self.sock, self._outgoing.read())
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with trio.move_on_after(timeout), _quietly():
            while await recv_socket(self.sock, False, trio.lowlevel.wait_readable):
                pass


class ReadPoller:
    """Readiness of the WebSockets' sockets from one edge-triggered epoll set, where each
    socket is registered once: trio's own wait_readable() re-registers the socket with its
    epoll on every wait, one extra system call per message received."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._ready: set[int] = set()  # readiness that arrived while nobody waited

    def register(self, sock: socket.socket) -> None:
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        self._ready.discard(fd)
        self._waiting.pop(fd, None)

    async def run(self) -> None:
        epoll, waiting, ready = self._epoll, self._waiting, self._ready
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0):
                    task = waiting.pop(fd, None)
                    if task is None:
                        ready.add(fd)
                    else:
                        reschedule(task)
        finally:
            epoll.close()

    async def wait_readable(self, sock: socket.socket) -> None:
        """Until ``sock`` (registered) has data, or an error or EOF to report."""
        fd = sock.fileno()
        if fd in self._ready:
            self._ready.discard(fd)
            await trio.lowlevel.checkpoint()
            return
        self._waiting[fd] = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiting.pop(fd, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _quietly() -> contextlib.suppress:
    """Ignore the errors of a connection that is going away anyway (ssl.SSLError is an
    OSError)."""
    return contextlib.suppress(OSError, ConnectionBroken)
