"""The architecture, pinned: the layers of ``runtime`` (see its ``__init__``), no import cycle,
and the one contract between the SDK and the engine.

Read from the source (the AST), so a forbidden import fails here even if nothing runs it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

LAYERS: dict[str, int] = {
    **dict.fromkeys(
        ("frames", "handshake", "config", "metrics", "placement", "seats"), 1
    ),  # sans-I/O
    **dict.fromkeys(
        (
            "gate",
            "events",
            "activation",
            "host",
            "storage",
            "writer",
            "sqlite",
            "postgres",
            "cluster",
        ),
        2,
    ),  # core
    **dict.fromkeys(
        (
            "stream",
            "websocket",
            "http",
            "router",
            "admission",
            "admin",
            "dial",
            "proxy",
            "usage",
            "link",
            "inlink",
            "outlink",
            "edge",
        ),
        3,
    ),  # I/O
    **dict.fromkeys(("server", "local", "cli", "connect", "console", "dev"), 4),  # assembly
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """The modules ``path`` imports (relative ones made absolute), each with whether the
    import runs (False: only under ``if TYPE_CHECKING``)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typing_only |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) not in typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((base, id(node) not in typing_only))
    return found


def modules(package: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((REPO / package).glob("*.py")) if p.stem != "__init__"}


def test_every_runtime_module_has_a_layer() -> None:
    assert set(modules("runtime")) == set(LAYERS)


def test_runtime_imports_point_down_the_layers_only() -> None:
    wrong = []
    for name, path in modules("runtime").items():
        for imported, _ in imports(path):
            if imported.startswith("runtime."):
                other = imported.split(".")[1]
                if LAYERS[other] > LAYERS[name]:
                    wrong.append(f"runtime.{name} (layer {LAYERS[name]}) imports {imported}")
    assert wrong == []


def test_runtime_has_no_import_cycle() -> None:
    graph = {
        name: {m.split(".")[1] for m, runs in imports(path) if runs and m.startswith("runtime.")}
        for name, path in modules("runtime").items()
    }
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail, name]))
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, [*trail, name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_the_engine_uses_only_the_sdks_public_names_and_its_contract() -> None:
    wrong = [
        f"runtime.{name} imports {imported}"
        for name, path in modules("runtime").items()
        for imported, _ in imports(path)
        if imported.startswith("rooms") and imported not in ("rooms", "rooms._engine")
    ]
    assert wrong == []


def test_the_sdk_reaches_the_engine_only_from_rooms_testing_through_runtime_local() -> None:
    reached = {
        (name, imported)
        for name, path in modules("rooms").items()
        for imported, _ in imports(path)
        if imported.split(".")[0] == "runtime"
    }
    assert reached == {("testing", "runtime.local")}


def test_the_checks_see_imports() -> None:
    # The reader itself: relative imports resolved, TYPE_CHECKING ones marked.
    found = dict(imports(REPO / "runtime" / "events.py"))
    assert found["runtime.gate"] is True
    assert found["runtime.activation"] is False
    assert found["rooms._engine"] is True


def test_embedded_mode_runs_without_psycopg() -> None:
    # psycopg is the optional extra of cluster mode: serving, the CLI and the test harness
    # load without it (cluster mode imports it when it starts).
    code = (
        "import sys, runtime.server, runtime.cli, rooms.testing; "
        "assert 'psycopg' not in sys.modules, 'psycopg was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
