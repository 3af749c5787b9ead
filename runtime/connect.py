"""``rooms connect URL``: a wscat-like WebSocket client for trying and troubleshooting rooms.

Interactive mode (no ``-x``): every line read on stdin is sent as one message (the line ending is
removed; empty lines are sent as empty messages). Every message that arrives is written on stdout,
one per line, flushed at once, in arrival order. Text messages are written as they are (a message
that itself contains newlines spans several lines). Binary messages are written as
``<binary N bytes: HEX>``, HEX being the first 32 bytes in hex followed by ``...`` when the
message is longer. When both stdin and stdout are terminals the wscat look is used: a ``> ``
prompt, incoming messages prefixed with ``< ``; otherwise the output is bare (script friendly).
End of stdin starts the close: wait ``--wait`` seconds so replies can still arrive, then close
with 1000.

``-x MSG`` (repeatable): send these messages after connecting, do not read stdin, wait
``--wait`` seconds (default 2; 0 closes right after sending; negative waits until the server
closes) printing what arrives, then close with 1000.

When the connection ends, ``closed: CODE REASON`` is written on stderr.

Exit codes: 0 connected and closed normally (by us, or by the server with 1000/1001); 1 could not
connect (refused, DNS, TLS, timeout, handshake rejected or broken); 2 usage error; 3 connected
but the server closed with another code, the connection dropped, or the close handshake timed
out; 130 interrupted (Ctrl+C).

Run it as ``rooms connect URL`` or ``python -m runtime.connect URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import trio
import trio_websocket

from .console import Output, OutputClosed, StdinLines, silence_stdout

__all__ = ["add_arguments", "main", "run"]

#: Seconds given to the closing handshake (our close frame and the server's answer).
CLOSE_TIMEOUT = 5.0
#: Text that stands for a 1006 close, which has no reason by definition.
DROPPED = "connection dropped (no close frame)"

NORMAL_CLOSE_CODES = frozenset({1000, 1001})
EXIT_OK = 0
EXIT_CONNECT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABNORMAL_CLOSE = 3
EXIT_INTERRUPTED = 130

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

EPILOG = """\
exit codes: 0 closed normally (by us, or by the server with 1000/1001); 1 could not connect
(refused, DNS, TLS, timeout, handshake rejected); 2 usage error; 3 the server closed with another
code or the connection dropped; 130 interrupted.  Binary messages are shown as
<binary N bytes: HEX> (first 32 bytes)."""


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Target:
    """A parsed ``ws://`` or ``wss://`` URL."""

    url: str
    tls: bool
    host: str
    port: int
    resource: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.tls else 80
        return host if self.port == default_port else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Parse a WebSocket URL; raise ``argparse.ArgumentTypeError`` when it is not one."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise argparse.ArgumentTypeError(f"{url!r}: the URL must start with ws:// or wss://")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{url!r}: the URL has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{url!r}: {exc}") from None
    tls = scheme == "wss"
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return Target(
        url=url,
        tls=tls,
        host=parts.hostname,
        port=port if port is not None else (443 if tls else 80),
        resource=resource,
    )


def parse_header(text: str) -> tuple[str, str]:
    """Parse ``"Name: value"``; raise ``argparse.ArgumentTypeError`` when it is not a header."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'Name: value'")
    if any(ch in value for ch in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"{text!r}: the value must not contain CR, LF or NUL")
    return name, value


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return seconds


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the URL and the options of ``rooms connect`` to ``parser``."""
    if parser.description is None:
        parser.description = "Connect to a WebSocket URL, send messages, print what arrives."
    if parser.epilog is None:
        parser.epilog = EPILOG
    parser.add_argument(
        "url", type=parse_url, metavar="URL", help="ws://HOST[:PORT]/PATH or wss://"
    )
    parser.add_argument(
        "-x",
        "--execute",
        action="append",
        default=[],
        metavar="MSG",
        help="send MSG after connecting (repeatable, in order); stdin is then not read",
    )
    parser.add_argument(
        "-w",
        "--wait",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="after the last message is sent (the -x messages, or end of stdin) print what "
        "arrives for SECONDS, then close; 0 closes at once, negative waits for the server "
        "to close (default 2)",
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        type=parse_header,
        metavar="'NAME: VALUE'",
        help="extra handshake header (repeatable); 'Host: ...' replaces the Host header",
    )
    parser.add_argument("-o", "--origin", help="send this Origin header")
    parser.add_argument(
        "-s",
        "--subprotocol",
        action="append",
        default=[],
        metavar="PROTOCOL",
        help="offer this subprotocol (repeatable)",
    )
    parser.add_argument(
        "--binary", action="store_true", help="send -x messages and stdin lines as binary frames"
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting (TCP, TLS and WebSocket handshake) after SECONDS (default 10)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="wss://: do not verify the server certificate"
    )


@dataclass(frozen=True)
class Options:
    """The typed form of the parsed command line."""

    target: Target
    execute: tuple[str, ...]
    wait: float
    headers: tuple[tuple[str, str], ...]
    origin: str | None
    subprotocols: tuple[str, ...]
    binary: bool
    connect_timeout: float
    insecure: bool

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Options:
        target = args.url if isinstance(args.url, Target) else parse_url(str(args.url))
        headers = [h if isinstance(h, tuple) else parse_header(str(h)) for h in args.header or ()]
        return cls(
            target=target,
            execute=tuple(args.execute or ()),
            wait=float(args.wait),
            headers=tuple(headers),
            origin=args.origin,
            subprotocols=tuple(args.subprotocol or ()),
            binary=bool(args.binary),
            connect_timeout=float(args.connect_timeout),
            insecure=bool(args.insecure),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.target.tls:
            return None
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def handshake_headers(self) -> tuple[str, list[tuple[bytes, bytes]]]:
        """Return the Host header value and the extra headers of the opening handshake."""
        host = self.target.host_header
        extra: list[tuple[bytes, bytes]] = []
        for name, value in self.headers:
            if name.lower() == "host":
                host = value
            else:
                extra.append((name.encode("ascii"), value.encode("utf-8")))
        if self.origin is not None:
            extra.append((b"Origin", self.origin.encode("utf-8")))
        return host, extra

    def encode(self, message: str) -> str | bytes:
        return message.encode("utf-8") if self.binary else message


# --------------------------------------------------------------------------- connecting


class ConnectFailed(Exception):
    """The connection could not be established; ``str()`` says why."""


class _HandshakeGuard(trio.abc.Stream):
    """A stream wrapper that notices a connection lost during the opening handshake.

    trio-websocket 0.12 keeps waiting for the handshake answer until the connect timeout when the
    connection ends before the answer arrives (a server that is not a WebSocket server, a TLS
    port spoken to in clear, a proxy dropping the upgrade...). While ``scope`` is set, such an
    end records ``failure`` and cancels ``scope`` so that the wait ends at once with a reason.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.scope: trio.CancelScope | None = None
        self.failure: str | None = None
        self._closed_here = False

    def _fail(self, failure: str) -> None:
        if self.scope is not None and self.failure is None:
            self.failure = failure
            self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except trio.BrokenResourceError as exc:
            self._fail(f"could not send the WebSocket handshake: {exc.__cause__ or exc}")
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._closed_here:
                # trio-websocket closes the stream when the answer is not valid HTTP.
                self._fail("the server's answer is not a valid WebSocket handshake response")
            else:
                self._fail(
                    f"connection lost during the WebSocket handshake: {exc.__cause__ or exc}"
                )
            raise
        if not data:
            self._fail("the server closed the connection during the WebSocket handshake")
        return data

    async def aclose(self) -> None:
        self._closed_here = True
        await self.inner.aclose()


async def open_connection(
    nursery: trio.Nursery, options: Options
) -> trio_websocket.WebSocketConnection:
    """Connect (TCP, TLS, opening handshake) within ``options.connect_timeout``.

    The connection's reader task runs in ``nursery``. Raises ``ConnectFailed`` or ``OSError``;
    a refused upgrade surfaces as ``trio_websocket.ConnectionRejected`` raised by the reader task
    (so it comes out of ``nursery``).
    """
    target = options.target
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(options.connect_timeout):
            tcp = await trio.open_tcp_stream(target.host, target.port)
            stream = tcp
            context = options.ssl_context()
            if context is not None:
                tls = trio.SSLStream(tcp, context, server_hostname=target.host)
                stream = tls
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    cause = exc.__cause__ or exc
                    hint = ""
                    if isinstance(cause, ssl.SSLCertVerificationError):
                        hint = " (--insecure skips the verification)"
                    raise ConnectFailed(f"TLS handshake failed: {cause}{hint}") from exc
            guard = _HandshakeGuard(stream)
            host, extra_headers = options.handshake_headers()
            ws: trio_websocket.WebSocketConnection | None = None
            with trio.CancelScope() as guard.scope:
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    guard,  # type: ignore[arg-type]  # any trio Stream works
                    host,
                    target.resource,
                    subprotocols=list(options.subprotocols) or None,
                    extra_headers=extra_headers,
                )
            guard.scope = None
            if ws is None:
                raise ConnectFailed(guard.failure or "the WebSocket handshake failed")
            return ws
    except trio.TooSlowError:
        raise ConnectFailed(f"timed out after {options.connect_timeout:g} s") from None
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise


# --------------------------------------------------------------------------- the session


class Session:
    """One connected client: a receiver task printing, a driver task sending then closing."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        options: Options,
        output: Output,
        stdin: StdinLines | None,
    ) -> None:
        self.ws = ws
        self.options = options
        self.output = output
        self.stdin = stdin
        self.closing = False  # we started the closing handshake
        self.close_timed_out = False
        self.output_closed = False

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, nursery.cancel_scope)
            nursery.start_soon(self._drive)
        return self._outcome()

    def _outcome(self) -> int:
        reason = self.ws.closed
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None and reason.reason else ""
        if code == 1006 and not text:
            text = DROPPED
        if self.closing and self.close_timed_out:
            late = f"the server did not answer the close frame within {CLOSE_TIMEOUT:g} s"
            print(f"closed: 1006 {late}", file=sys.stderr)
            return EXIT_ABNORMAL_CLOSE
        print(f"closed: {code} {text}".rstrip(), file=sys.stderr)
        if self.closing or code in NORMAL_CLOSE_CODES:
            return EXIT_OK
        return EXIT_ABNORMAL_CLOSE

    async def _receive(self, session_scope: trio.CancelScope) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                break
            try:
                self.output.message(message)
            except OutputClosed:
                self.output_closed = True
                silence_stdout()
                session_scope.cancel()
                await self._close()
                return
        if not self.closing:
            # The server closed (or the connection dropped): stop sending and waiting.
            session_scope.cancel()

    async def _drive(self) -> None:
        try:
            if self.stdin is None:
                for message in self.options.execute:
                    await self.ws.send_message(self.options.encode(message))
            else:
                await self._pump_stdin(self.stdin)
        except trio_websocket.ConnectionClosed:
            return  # closed by the server meanwhile; the receiver reports it
        if self.options.wait < 0:
            await trio.sleep_forever()  # until the receiver sees the server close
        else:
            await trio.sleep(self.options.wait)
            await self._close()

    async def _pump_stdin(self, stdin: StdinLines) -> None:
        encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        while True:
            self.output.prompt()
            line = await stdin.readline()
            if line is None:
                self.output.end_prompt()  # move off the "> " line after CTRL+D
                return
            self.output.prompting = False  # the Enter key already ended the line
            message: str | bytes = line if self.options.binary else line.decode(encoding, "replace")
            await self.ws.send_message(message)

    async def _close(self) -> None:
        """Close with 1000 unless the server already closed (then its messages are still read)."""
        if self.ws.closed is not None:
            return
        self.closing = True
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self.ws.aclose(1000)
        if scope.cancelled_caught:
            self.close_timed_out = True


# --------------------------------------------------------------------------- entry points


def _sole_exception(exc: BaseException) -> BaseException:
    """The one meaningful exception inside (nested) exception groups, else ``exc`` itself."""
    current = exc
    while isinstance(current, BaseExceptionGroup):
        inner = [e for e in current.exceptions if not isinstance(e, trio.Cancelled)]
        if len(inner) != 1:
            if any(isinstance(e, KeyboardInterrupt) for e in inner):
                return KeyboardInterrupt()
            return exc
        current = inner[0]
    return current


def _print_error(message: str) -> None:
    print(f"rooms connect: {message}", file=sys.stderr)


async def run(args: argparse.Namespace) -> int:
    """Run ``rooms connect`` with parsed ``args``; return the process exit code."""
    try:
        options = Options.from_namespace(args)
    except argparse.ArgumentTypeError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    interactive = not options.execute
    stdin: StdinLines | None = None
    if interactive:
        try:
            stdin = StdinLines(sys.stdin)
        except ValueError as exc:
            _print_error(f"{exc}; use -x MSG")
            return EXIT_USAGE
    decorated = interactive and sys.stdin.isatty() and sys.stdout.isatty()
    output = Output(sys.stdout, decorated=decorated)
    url = options.target.url
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            ws = await open_connection(nursery, options)
            connected = True
            try:
                if decorated:
                    chosen = f", subprotocol {ws.subprotocol}" if ws.subprotocol else ""
                    print(
                        f"Connected to {url}{chosen} (CTRL+D to close, CTRL+C to quit)",
                        file=sys.stderr,
                    )
                return await Session(ws, options, output, stdin).run()
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await ws.aclose(1000)  # returns at once when already closed
    except BaseException as exc:
        failure = _sole_exception(exc)
        if isinstance(failure, KeyboardInterrupt):
            with contextlib.suppress(OutputClosed):
                output.end_prompt()
            return EXIT_INTERRUPTED
        if not connected:
            if isinstance(failure, trio_websocket.ConnectionRejected):
                _print_error(f"{url}: the server refused the upgrade: HTTP {failure.status_code}")
                if failure.body:
                    print(failure.body.decode("utf-8", "replace").rstrip(), file=sys.stderr)
                return EXIT_CONNECT_FAILED
            if isinstance(failure, ConnectFailed | OSError):
                _print_error(f"could not connect to {url}: {failure}")
                return EXIT_CONNECT_FAILED
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rooms connect", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.connect URL [options]``."""
    args = build_parser().parse_args(argv)
    code: int = trio.run(run, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
