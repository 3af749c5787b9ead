"""The ``rooms`` command: ``rooms serve MODULE:APP``, ``rooms dev MODULE:APP`` (restart on
change), ``rooms connect URL`` and ``rooms cluster status``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import attrs
import trio

from rooms import App

from . import connect, dev
from .config import ConfigError, Settings, load_settings
from .server import listen, prepare_data_dir, serve, tune_process
from .storage import StorageError
from .usage import iso_utc


def load_app(target: str) -> App:
    """Import ``MODULE:ATTRIBUTE`` (the current directory is on the path, as with uvicorn)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(
            f"rooms serve: expected MODULE:APP (like examples.chat.app:app), got {target!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if module_name.partition(".")[0] in ("rooms", "runtime"):
            hint = (
                f"; {module_name.partition('.')[0]!r} is the name of a package of Rooms itself, "
                "so your app cannot live in a folder of that name: rename the folder"
            )
        raise SystemExit(
            f"rooms serve: cannot import module {module_name!r}: {exc}{hint}"
        ) from None
    if not hasattr(module, attribute):
        apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
        found = f"its rooms.App objects: {', '.join(apps)}" if apps else "it has no rooms.App"
        raise SystemExit(
            f"rooms serve: module {module_name} has no attribute {attribute!r}; {found}"
        )
    app = getattr(module, attribute)
    if not isinstance(app, App):
        raise SystemExit(
            f"rooms serve: {module_name}.{attribute} is {type(app).__name__}, not a rooms.App"
        )
    return app


async def _serve_until_signal(app: App, settings: Settings, listener: socket.socket) -> None:
    """Serve; the first SIGINT/SIGTERM drains (1012 to every WebSocket, running events and
    commits finish), a second one stops at once (queued commits still finish)."""
    log = logging.getLogger("rooms.server")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def run() -> None:
                await serve(app, settings, listener, shutdown=shutdown)
                nursery.cancel_scope.cancel()  # drained: stop listening for signals

            nursery.start_soon(run)
            async for signum in signals:
                name = signal.Signals(signum).name
                if shutdown.is_set():
                    log.info("%s again: stopping now", name)
                    nursery.cancel_scope.cancel()
                    break
                log.info(
                    "%s: draining for up to %g s (WebSockets closed with 1012); "
                    "send it again to stop at once",
                    name,
                    settings.drain_timeout,
                )
                shutdown.set()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(settings: Settings) -> None:
    """The server's log: to ``log_file`` (appended) or standard error, as text or JSON."""
    handler: logging.Handler
    if settings.log_file:
        handler = logging.FileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler()
    if settings.log_format.lower() == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of ``serve`` or ``dev``: defaults, --config, then the options given."""
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "synchronous": args.synchronous,
        "log_level": args.log_level,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        "cluster": args.cluster,
        "node_address": args.node_address,
        # A secret: from the environment rather than the command line, which ps shows.
        "cluster_token": args.cluster_token or os.environ.get("ROOMS_CLUSTER_TOKEN"),
    }
    return load_settings(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"rooms serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        for key, value in attrs.asdict(settings).items():
            print(f"{key} = {json.dumps(value)}")  # JSON scalars and arrays are valid TOML
        return 0
    try:
        configure_logging(settings)
    except OSError as exc:
        print(
            f"rooms serve: setting 'log_file': cannot open {exc.filename!r}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    app = load_app(args.app)
    try:
        prepare_data_dir(settings)
    except ConfigError as exc:
        print(f"rooms serve: {exc}", file=sys.stderr)
        return 2
    tune_process()
    if args.fd is not None:  # a listening socket handed down by rooms dev
        listener = socket.socket(fileno=args.fd)
        listener.setblocking(False)
    else:
        try:
            listener = listen(settings.host, settings.port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            print(f"rooms serve: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
            return 1
    code = 0
    try:
        trio.run(_serve_until_signal, app, settings, listener)
    except* (StorageError, ConfigError) as failed:  # e.g. a database that cannot be used
        print(f"rooms serve: {_sole(failed)}", file=sys.stderr)
        code = 2
    return code


def _sole(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The one exception of a group (trio's nurseries wrap what their tasks raised)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _dev(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        prepare_data_dir(settings)
    except ConfigError as exc:
        print(f"rooms dev: {exc}", file=sys.stderr)
        return 2
    load_app(args.app)  # a wrong target is said now, once, not by every restart
    try:
        listener = listen(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"rooms dev: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        return 1
    serve_argv = [args.app, *_options(args)]
    return dev.run(serve_argv, listener, settings)


_OPTIONS = (
    "host",
    "port",
    "data_dir",
    "config",
    "synchronous",
    "log_level",
    "certfile",
    "keyfile",
    "cluster",
    "node_address",
    "cluster_token",
)


def _options(args: argparse.Namespace) -> list[str]:
    """The serve options that were given, as arguments again (for rooms dev's child)."""
    argv = []
    for name in _OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", help="MODULE:APP, e.g. examples.chat.app:app")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir", help="folder of the SQLite database (default ./data)")
    parser.add_argument("--config", help="a TOML file of settings (docs/deployment.md)")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], help="SQLite durability")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--certfile", help="PEM certificate chain: serve https and wss")
    parser.add_argument("--keyfile", help="PEM private key of --certfile")
    parser.add_argument(
        "--cluster", help="serve as a node of a cluster on this PostgreSQL (postgresql://...)"
    )
    parser.add_argument(
        "--node-address", help="host:port the other nodes reach this one at (default: its own)"
    )
    parser.add_argument(
        "--cluster-token",
        help="the shared secret of the links between nodes (better: ROOMS_CLUSTER_TOKEN)",
    )


def _cluster_status(args: argparse.Namespace) -> int:
    try:
        from .cluster import status  # (psycopg: the optional extra)
    except ImportError:
        print("rooms cluster: needs psycopg (pip install 'trio-rooms[postgres]')", file=sys.stderr)
        return 2
    import psycopg

    try:
        report = status(args.cluster)
    except psycopg.Error as exc:
        print(f"rooms cluster: cannot read the cluster database: {exc}".strip(), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'NODE':<18} {'ADDRESS':<22} {'STATUS':<8} {'LEASE LEFT':>10} {'ROOMS':>7}")
    for node in report["nodes"]:
        left = f"{node['lease_left_s']:.1f} s" if node["status"] == "alive" else "-"
        print(
            f"{node['node']:<18} {node['address']:<22} {node['status']:<8} {left:>10} "
            f"{node['rooms']:>7}"
        )
    print(f"rooms without a live node: {report['rooms_without_live_owner']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rooms", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="serve an app: rooms serve MODULE:APP")
    _add_server_options(serve_parser)
    serve_parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings and exit"
    )
    serve_parser.add_argument(
        "--fd", type=int, help="serve on this inherited listening socket (rooms dev uses it)"
    )
    serve_parser.set_defaults(run=_serve)

    dev_parser = commands.add_parser(
        "dev", help="serve an app and restart it when a source file changes"
    )
    _add_server_options(dev_parser)
    dev_parser.set_defaults(run=_dev)

    connect_parser = commands.add_parser("connect", help="a wscat-like WebSocket client")
    connect.add_arguments(connect_parser)
    connect_parser.set_defaults(run=lambda args: trio.run(connect.run, args))

    cluster_parser = commands.add_parser("cluster", help="look at a cluster: rooms cluster status")
    cluster_commands = cluster_parser.add_subparsers(dest="cluster_command", required=True)
    status_parser = cluster_commands.add_parser(
        "status", help="the nodes, their state and lease, and the rooms each holds"
    )
    status_parser.add_argument("--cluster", required=True, help="the cluster's postgresql:// DSN")
    status_parser.add_argument("--json", action="store_true", help="print it as JSON")
    status_parser.set_defaults(run=_cluster_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
