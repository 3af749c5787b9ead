"""The example chat as a cluster of three nodes on one PostgreSQL (``make cluster``).

Creates the database if it is missing, starts ``rooms serve examples.chat.app:app --cluster``
three times (ports 8000, 8001 and 8002), and stops them all on Ctrl-C (a SIGTERM each: they
drain). Open the chat on two of the ports and the messages cross between the nodes.

    python -m examples.chat.cluster [--dsn postgresql://postgres@127.0.0.1:5432/rooms_chat]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time

import psycopg
from psycopg import sql

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/rooms_chat"
PORTS = (8000, 8001, 8002)


def create_database(dsn: str) -> None:
    """Create the DSN's database unless it exists (connecting to ``postgres`` beside it)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    name = str(info.get("dbname") or "rooms_chat")
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("ROOMS_CLUSTER", DEFAULT_DSN))
    dsn = parser.parse_args().dsn
    try:
        create_database(dsn)
    except psycopg.Error as exc:
        print(f"cannot reach PostgreSQL at {dsn}: {exc}".strip(), file=sys.stderr)
        print("start it, or pass --dsn (ROOMS_CLUSTER) for another server", file=sys.stderr)
        return 1
    # One secret for this run's links (a deployment sets its own ROOMS_CLUSTER_TOKEN).
    env = {**os.environ, "ROOMS_CLUSTER_TOKEN": secrets.token_hex(16)}
    command = [sys.executable, "-m", "runtime.cli", "serve", "examples.chat.app:app"]
    # Their own sessions: Ctrl-C reaches this process only, which then drains each node once
    # (a second signal would stop a node at once).
    nodes = [
        subprocess.Popen(
            [*command, "--port", str(port), "--cluster", dsn], env=env, start_new_session=True
        )
        for port in PORTS
    ]
    print("chat nodes on " + ", ".join(f"http://127.0.0.1:{port}" for port in PORTS))
    print(f"rooms cluster status --cluster {dsn}   (Ctrl-C stops the nodes)")
    try:
        while all(node.poll() is None for node in nodes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for node in nodes:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
    return max(node.wait() for node in nodes)


if __name__ == "__main__":
    sys.exit(main())
