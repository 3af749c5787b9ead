"""Rooms against the reference servers, side by side in one run (``make bench``).

    make bench          # full: about 15 minutes
    make bench-quick    # about 4 minutes

Servers: ``rooms`` (``examples.echo``: broadcast and echo rooms, no storage), ``rooms-stored``
(``bench/apps.py``: the chat's data path, every message stored before it is broadcast),
``websockets`` (Python websockets 17, asyncio) and ``node-ws`` (Node + ws 8); and in cluster mode,
on a fresh PostgreSQL database each run (``--postgres``, default the local server):
``rooms-cluster`` (``bench/apps.py`` on a one-node cluster, against ``rooms-stored``),
``cluster-3-spread`` and ``cluster-3-owner`` (``examples.echo`` on three nodes, with each room's
clients spread over the nodes or all on the node that owns it). They speak one
protocol: ``/room/<name>`` broadcasts each message to everyone in the room, sender included;
``/echo/<x>`` echoes to the sender.

Workloads, driven by ``wsload`` (bench/wsload.c, a single-threaded C epoll client, so that
the generator is not the bottleneck; its CPU is reported):

    sat:RxC   R rooms x C clients, each keeping one message in flight: delivered messages/s
              and server CPU per delivery (from /proc, the least noisy figure).
    lat:RxC   the same topology at a fixed load, half the weakest reference's saturation:
              p50 / p99 latency of every delivery.
    echo      100 connections ping-pong: messages/s.
    conns:N   N idle connections: upgrades/s while opening them, server RSS per connection.
    idle      a three-node cluster serving nothing: the transactions/s it puts on PostgreSQL
              (pg_stat_database; every statement of a node is its own transaction).

Every measurement starts a fresh server process; servers are interleaved and their order
rotated each repetition, because the machine is shared and noisy: only figures from the same
run are compared. The table gives medians and, for Rooms, the ratio to each reference (the
median of the per-repetition ratios). Results go to bench/results/ (JSON, markdown, a PNG
chart when matplotlib is available).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_PY = HERE / ".venv" / "bin" / "python"
ROOMS_PY = REPO / ".venv" / "bin" / "python"
WSLOAD = HERE / "wsload"


def rooms_server(app: str) -> list[str]:
    return [str(ROOMS_PY), "-m", "runtime.cli", "serve", app, "--log-level", "WARNING"]


SERVERS: dict[str, tuple[str, list[str]]] = {
    # name: (label, command; --port and, for Rooms, --data-dir are added)
    "rooms": ("Rooms (examples.echo)", rooms_server("examples.echo.app:app")),
    "rooms-stored": ("Rooms, stored before broadcast", rooms_server("bench.apps:app")),
    "websockets": ("websockets 17", [str(BENCH_PY), str(HERE / "servers/websockets_server.py")]),
    "node-ws": ("Node + ws 8", [shutil.which("node") or "node", "servers/node_ws_server.js"]),
}
REFERENCES = ("websockets", "node-ws")
# cluster servers: (nodes, whether each room's clients are spread over the nodes)
CLUSTERS = {
    "rooms-cluster": (1, False),
    "cluster-3-spread": (3, True),
    "cluster-3-owner": (3, False),
}
SERVERS["rooms-cluster"] = ("Rooms, stored, one-node cluster", rooms_server("bench.apps:app"))
SERVERS["cluster-3-spread"] = ("Rooms, 3 nodes, clients spread", SERVERS["rooms"][1])
SERVERS["cluster-3-owner"] = ("Rooms, 3 nodes, clients on the owner", SERVERS["rooms"][1])
# a cluster figure next to the figure it is judged against
COMPARED = (("rooms-cluster", "rooms-stored"), ("cluster-3-spread", "cluster-3-owner"))
CHECKOUTS: dict[str, Path] = {}  # server name -> the checkout it runs from
FULL = [
    "sat:1x200",
    "sat:10x50",
    "sat:100x10",
    "lat:10x50",
    "lat:100x10",
    "echo",
    "conns:10000",
    "idle",
]
QUICK = ["sat:10x50", "lat:10x50", "echo", "conns:2000", "idle"]
DEFAULT_SERVERS = (
    "rooms,rooms-stored,websockets,node-ws,rooms-cluster,cluster-3-spread,cluster-3-owner"
)


def runs_case(server: str, case: str) -> bool:
    """Which server runs which workload: the stored variants where storage is on the path
    (broadcasts), the three-node clusters on saturated fan-out (and idle), idle only there."""
    if case == "idle":
        return server == "cluster-3-spread"
    if server in ("rooms-stored", "rooms-cluster") or server.endswith("-stored"):
        return case.startswith(("sat:", "lat:"))
    if server in ("cluster-3-spread", "cluster-3-owner"):
        return case in ("sat:10x50", "sat:100x10")
    return True


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def wsload_args(case: str, cfg: argparse.Namespace, lat_rates: dict[str, float]) -> list[str]:
    kind, _, arg = case.partition(":")
    timing = ["--duration", str(cfg.duration), "--warmup", str(cfg.warmup), "--size", "100"]
    if kind in ("sat", "lat"):
        rooms, clients = arg.split("x")
        topology = ["fanout", "--rooms", rooms, "--clients", clients]
        if kind == "sat":
            return [*topology, "--window", "1", "--poll-us", "1000", *timing]
        return [*topology, "--rate", f"{lat_rates[arg]:.6f}", *timing]
    if kind == "echo":
        return ["echo", "--conns", "100", "--window", "1", *timing]
    if kind == "conns":
        return ["conns", "--conns", arg, "--concurrency", "100", "--hold", "0"]
    raise SystemExit(f"unknown case {case!r}")


@contextmanager
def cluster_database(admin_dsn: str) -> Iterator[str]:
    """A fresh database beside ``admin_dsn``'s, dropped afterwards: its DSN."""
    import psycopg  # (bench/requirements.txt; only the cluster servers need it)

    name = f"rooms_bench_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def transactions(dsn: str) -> int:
    """Transactions PostgreSQL counted in ``dsn``'s database so far."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def measure(
    server: str, case: str, cfg: argparse.Namespace, lat: dict[str, float]
) -> dict[str, Any]:
    """Fresh server processes (one, or a cluster's nodes on a fresh database), one wsload
    run against them: wsload's JSON record."""
    record: dict[str, Any] = {"server": server, "case": case}
    if server not in CLUSTERS:
        return start_and_load(server, case, cfg, lat, record, [])
    nodes, _ = CLUSTERS[server]
    try:
        import psycopg
    except ImportError:
        return {**record, "error": "no psycopg in bench/.venv (make bench installs it)"}
    try:
        with cluster_database(cfg.postgres) as dsn:
            flags = ["--cluster", dsn]
            if case == "idle":
                return idle_cluster(server, dsn, nodes, flags, cfg, record)
            return start_and_load(server, case, cfg, lat, record, flags, nodes)
    except psycopg.OperationalError as exc:
        return {**record, "error": f"no PostgreSQL at {cfg.postgres}: {exc}"[:300]}


def start_and_load(
    server: str,
    case: str,
    cfg: argparse.Namespace,
    lat: dict[str, float],
    record: dict[str, Any],
    flags: list[str],
    nodes: int = 1,
) -> dict[str, Any]:
    with servers(server, cfg, flags, nodes) as started:
        if started is None:
            return {**record, "error": "the server did not start (see servers.log)"}
        ports, pids = started
        if server in CLUSTERS and not CLUSTERS[server][1]:
            ports = ports[:1]  # every client on one node: it owns every room
        args = [str(WSLOAD), *wsload_args(case, cfg, lat), "--port", ",".join(ports)]
        done = subprocess.run(
            [*args, "--server-pid", ",".join(pids)],
            capture_output=True,
            text=True,
            timeout=cfg.duration + cfg.warmup + 180,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {**record, "error": f"wsload: {done.stderr.strip()[-300:]}"}
    return {**record, **json.loads(lines[-1])}


def idle_cluster(
    server: str,
    dsn: str,
    nodes: int,
    flags: list[str],
    cfg: argparse.Namespace,
    record: dict[str, Any],
) -> dict[str, Any]:
    seconds = 10.0 if cfg.quick else 30.0
    with servers(server, cfg, flags, nodes) as started:
        if started is None:
            return {**record, "error": "the cluster did not start (see servers.log)"}
        time.sleep(3)  # joined, first renewals done
        before = transactions(dsn)
        time.sleep(seconds)
        after = transactions(dsn)
    return {**record, "nodes": nodes, "db_tx_per_s": (after - before) / seconds}


@contextmanager
def servers(
    server: str, cfg: argparse.Namespace, flags: list[str], count: int
) -> Iterator[tuple[list[str], list[str]] | None]:
    """``count`` processes of ``server``, each on its own port, ready: their ports and PIDs
    (None if one did not start); all stopped afterwards."""
    rooms = server.startswith("rooms") or server in CHECKOUTS or server in CLUSTERS
    cwd = HERE if server == "node-ws" else CHECKOUTS.get(server, REPO)
    env = {**os.environ, "ROOMS_CLUSTER_TOKEN": "bench"}
    procs: list[tuple[int, subprocess.Popen[bytes], Path]] = []
    try:
        for _ in range(count):
            port = free_port()
            data = Path(cfg.out) / "data" / f"{server}-{port}"
            command = [*SERVERS[server][1], "--port", str(port), *flags]
            if rooms:
                command += ["--data-dir", str(data)]
            with open(Path(cfg.out) / "servers.log", "a") as errors:
                proc = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                )
            procs.append((port, proc, data))
        if not all(wait_port(port, proc) for port, proc, _ in procs):
            yield None
            return
        time.sleep(0.15)
        pids = [pid for _, proc, _ in procs for pid in (proc.pid, *children(proc.pid))]
        yield [str(port) for port, _, _ in procs], [str(pid) for pid in pids]
    finally:
        for _, proc, _ in procs:
            proc.terminate()
        for _, proc, data in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(data, ignore_errors=True)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Rooms' storage writer): their CPU and memory count as
    the server's."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


# what each workload reports: (label, extractor, higher is better)
METRICS: dict[str, list[tuple[str, Any, bool]]] = {
    "sat": [
        ("delivered msg/s", lambda r: r["recv_per_s"], True),
        ("server CPU us / delivery", lambda r: r["server_cpu_s_per_1m"], False),
    ],
    "lat": [
        ("p50 latency ms", lambda r: r["lat_us"]["p50"] / 1000, False),
        ("p99 latency ms", lambda r: r["lat_us"]["p99"] / 1000, False),
    ],
    "echo": [
        ("msg/s", lambda r: r["recv_per_s"], True),
        ("p99 RTT ms", lambda r: r["lat_us"]["p99"] / 1000, False),
    ],
    "conns": [
        ("server RSS KiB / connection", lambda r: r["rss_per_conn_kib"], False),
        ("upgrades/s", lambda r: r["upgrades_per_s"], True),
    ],
    "idle": [("PostgreSQL transactions/s", lambda r: r["db_tx_per_s"], False)],
}


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def summarize(
    runs: list[dict[str, Any]], cases: list[str], servers: list[str]
) -> list[dict[str, Any]]:
    """One row per (workload, metric): each server's median, Rooms' ratio to each reference."""
    rows = []
    for case in cases:
        for label, extract, higher in METRICS[case.partition(":")[0]]:
            per_rep: dict[int, dict[str, float]] = {}
            for run in runs:
                if run["case"] == case and "error" not in run:
                    per_rep.setdefault(run["rep"], {})[run["server"]] = extract(run)
            medians = {
                s: statistics.median(v)
                if (v := [r[s] for r in per_rep.values() if s in r])
                else None
                for s in servers
            }
            ratios = {}
            for server, ref in [*(("rooms", ref) for ref in REFERENCES), *COMPARED]:
                pairs = [r[server] / r[ref] for r in per_rep.values() if r.get(ref) and server in r]
                if pairs:
                    ratios[ref if server == "rooms" else f"{server}/{ref}"] = statistics.median(
                        pairs
                    )
            rows.append(
                {
                    "case": case,
                    "metric": label,
                    "higher_is_better": higher,
                    "median": medians,
                    "rooms_ratio": ratios,
                }
            )
    return rows


def table(rows: list[dict[str, Any]], servers: list[str], lat_loads: dict[str, float]) -> str:
    refs = [r for r in REFERENCES if r in servers]
    refs += [f"{a}/{b}" for a, b in COMPARED if a in servers and b in servers]
    head = ["workload", "metric", *servers, *(f"Rooms / {r}" if "/" not in r else r for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        case = row["case"]
        kind, _, arg = case.partition(":")
        title = {
            "sat": f"fan-out {arg}, saturation",
            "lat": f"fan-out {arg} at {fmt(lat_loads.get(arg))} deliveries/s",
            "echo": "echo, 100 connections",
            "conns": f"{arg} idle connections",
            "idle": "idle three-node cluster",
        }[kind]
        cells = [fmt(row["median"][s]) for s in servers]
        better = "higher" if row["higher_is_better"] else "lower"
        ratios = [
            f"{row['rooms_ratio'][r]:.2f}x" if r in row["rooms_ratio"] else "n/a" for r in refs
        ]
        lines.append(
            f"| {title} | {row['metric']} ({better} is better) | "
            + " | ".join(cells + ratios)
            + " |"
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], servers: list[str], path: Path) -> bool:
    """Bars of every metric, each scaled to Node ws = 1 (so 'better' reads the same way)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows if r["median"].get("node-ws")]
    labels: list[str] = []
    series: dict[str, list[float]] = {s: [] for s in servers}
    for row in shown:
        labels.append(f"{row['case']}\n{row['metric'].split(' (')[0]}")
        base = row["median"]["node-ws"]
        for s in servers:
            value = row["median"].get(s)
            score = (
                None
                if value is None
                else (value / base if row["higher_is_better"] else base / value)
            )
            series[s].append(score or 0)
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.2), 4.5))
    width = 0.8 / len(servers)
    for i, s in enumerate(servers):
        xs = [x + i * width for x in range(len(labels))]
        ax.bar(xs, series[s], width, label=SERVERS[s][0])
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_yscale("log", base=2)  # 2x better and 2x worse look the same size
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.set_xticks(
        [x + width * (len(servers) - 1) / 2 for x in range(len(labels))], labels, fontsize=7
    )
    ax.set_ylabel("relative to Node ws, log scale (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter workloads (< 3 min)")
    parser.add_argument("--servers", default=DEFAULT_SERVERS)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "ROOMS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL to create the cluster servers' databases on (ROOMS_BENCH_POSTGRES)",
    )
    parser.add_argument("--cases", help="comma list, e.g. sat:10x50,lat:10x50,echo,conns:1000")
    parser.add_argument(
        "--lat-load",
        type=float,
        metavar="DELIVERIES",
        help="the lat: cases' load in deliveries/s (default: half the weakest reference's "
        "saturation, measured in the same run)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, help="measured seconds per run (4; quick 1)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (1; quick 0.3)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run examples.echo from another checkout (before/after comparisons); "
        "bench.apps, the stored path, if NAME ends in -stored",
    )
    parser.add_argument("--chart", metavar="RUN_JSON", help="only redraw the chart of a saved run")
    cfg = parser.parse_args()
    if cfg.chart:
        saved = json.loads(Path(cfg.chart).read_text())
        png = Path(cfg.chart).with_suffix(".png")
        chart(saved["rows"], saved["servers"], png)
        print(png)
        return
    for spec in cfg.checkout:
        name, _, path = spec.partition("=")
        app = "bench.apps:app" if name.endswith("-stored") else "examples.echo.app:app"
        SERVERS[name] = (f"Rooms at {path} ({app})", rooms_server(app))
        CHECKOUTS[name] = Path(path).resolve()
    cfg.servers += "".join("," + spec.partition("=")[0] for spec in cfg.checkout)
    cfg.duration = cfg.duration or (1.0 if cfg.quick else 4.0)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (0.3 if cfg.quick else 1.0)
    cases = cfg.cases.split(",") if cfg.cases else (QUICK if cfg.quick else FULL)
    servers = cfg.servers.split(",")
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}; known: {', '.join(SERVERS)}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    lat_loads: dict[str, float] = {}
    lat_rates: dict[str, float] = {}
    ordered = [c for c in cases if not c.startswith("lat:")] + [
        c for c in cases if c.startswith("lat:")
    ]
    for case in ordered:
        if case.startswith("lat:"):
            topology = case[4:]
            rooms, clients = map(int, topology.split("x"))
            saturations = [
                statistics.median(
                    x["recv_per_s"]
                    for x in runs
                    if x["case"] == f"sat:{topology}" and x["server"] == s and "error" not in x
                )
                for s in REFERENCES
                if any(x["case"] == f"sat:{topology}" and x["server"] == s for x in runs)
            ]
            if cfg.lat_load:
                saturations = [2 * cfg.lat_load]
            if not saturations:
                raise SystemExit(f"{case} needs sat:{topology} in the same run")
            lat_loads[topology] = 0.5 * min(saturations)
            lat_rates[topology] = lat_loads[topology] / (rooms * clients * clients)
        here = [s for s in servers if runs_case(s, case)]
        if not here:
            continue  # (a case only the servers left out of --servers run)
        for rep in range(cfg.reps):
            for server in here[rep % len(here) :] + here[: rep % len(here)]:
                run = {**measure(server, case, cfg, lat_rates), "rep": rep}
                runs.append(run)
                summary = run.get("error") or ", ".join(
                    f"{label} {fmt(extract(run))}"
                    for label, extract, _ in METRICS[case.partition(":")[0]]
                )
                log(f"[{rep + 1}/{cfg.reps}] {case:<11} {server:<13} {summary}")

    rows = summarize(runs, cases, servers)
    text = table(rows, servers, lat_loads)
    generators = [r["gen_cpu_pct"] for r in runs if "gen_cpu_pct" in r and r.get("mode") != "conns"]
    note = (
        f"{len(runs)} runs, {cfg.reps} repetitions interleaved, "
        f"{time.monotonic() - started:.0f} s; "
        f"load generator CPU: median {statistics.median(generators or [0]):.0f}% of one core "
        f"(max {max(generators or [0]):.0f}%); {os.cpu_count()} CPUs; command: "
        f"python bench/run.py {' '.join(sys.argv[1:])}"
    )
    print(text + "\n\n" + note)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out)
    (out / f"run-{stamp}.md").write_text(text + "\n\n" + note + "\n")
    (out / f"run-{stamp}.json").write_text(
        json.dumps(
            {
                "cases": cases,
                "servers": servers,
                "lat_loads": lat_loads,
                "runs": runs,
                "rows": rows,
                "note": note,
            },
            indent=1,
        )
    )
    if chart(rows, servers, out / f"chart-{stamp}.png"):
        log(f"chart: {out / f'chart-{stamp}.png'}")
    log(f"results: {out / f'run-{stamp}.md'}")


if __name__ == "__main__":
    main()
