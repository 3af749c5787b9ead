"""MkDocs hooks (``hooks:`` in mkdocs.yml): checks that keep the site in step with the code.

Each problem is logged as a warning, so ``mkdocs build --strict`` (``make docs-build``, part of
``make test``) fails on it:

- every name in ``__all__`` of ``rooms``, ``rooms.testing`` and ``rooms.client`` has an entry
  on its reference page, and every field of ``runtime.config.Settings`` one on
  ``reference/settings.md`` (so a new export or setting cannot go undocumented);
- every setting is named in the settings table of ``deployment.md``, and a setting without an
  attribute docstring in ``runtime/config.py`` is described in ``reference/settings.md``'s own
  text; every metric of ``runtime.metrics.Metrics`` is in the metrics table there;
- the guarantees page names every mutant of ``tests/mutants.py``, and the mutants and tests
  it names exist;
- README.md's relative links point at files that exist, and README.md and
  ``quickstart.md`` show ``examples/counter/app.py`` exactly as the file is (the file is what
  ``tests/examples/test_examples.py`` runs).
"""

from __future__ import annotations

import ast
import importlib
import logging
import re
from pathlib import Path
from typing import Any

import attrs

from runtime.metrics import Metrics

log = logging.getLogger("mkdocs.hooks.rooms")

ROOT = Path(__file__).resolve().parent.parent
COUNTER = "examples/counter/app.py"
SHOWS_COUNTER = ("README.md", "docs/quickstart.md")

# Reference page (as in docs/) -> the modules whose __all__ it must cover.
EXPORTS = {
    "reference/rooms.md": ["rooms"],
    "reference/testing.md": ["rooms.testing"],
    "reference/client.md": ["rooms.client"],
}
SETTINGS_PAGE = "reference/settings.md"
GUARANTEES_PAGE = "guarantees.md"
SETTINGS_TABLE_PAGE = "deployment.md"
SETTINGS_ANCHOR = "runtime.config.Settings."


def settings_fields() -> dict[str, bool]:
    """Each field of ``Settings`` in source order, and whether it has an attribute docstring
    (read from the source, as mkdocstrings reads it)."""
    tree = ast.parse((ROOT / "runtime" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    fields: dict[str, bool] = {}
    for node, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            documented = (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
            fields[node.target.id] = documented
    return fields


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    path = page.file.src_uri
    if path == SETTINGS_TABLE_PAGE:
        rows = "\n".join(line for line in markdown.splitlines() if line.startswith("|"))
        named = set(re.findall(r"`([a-z_]+)`", rows))
        for name in settings_fields():
            if name not in named:
                log.warning("%s: the settings table does not name the setting %r", path, name)
        for metric in attrs.fields(Metrics):
            if f"| `{metric.name}` |" not in rows:
                log.warning("%s: the metrics table does not list %r", path, metric.name)
    if path == GUARANTEES_PAGE:
        check_guarantees(markdown)
    if path == SETTINGS_PAGE:
        text = markdown.split(":::", 1)[0]  # the page's own prose, before the generated part
        for name, documented in settings_fields().items():
            if not documented and f"`{name}`" not in text:
                log.warning(
                    "%s: %r has no docstring in runtime/config.py; describe it in the text above",
                    path,
                    name,
                )
    return markdown


def check_guarantees(markdown: str) -> None:
    """Every mutant of tests/mutants.py is named on the guarantees page, and every mutant and
    test the page names exists (so the page and the checks cannot drift apart)."""
    from tests.mutants import MUTANTS

    lists = re.findall(r"\*Mutants?:\*(.*?)\.(?:\s|$)", markdown, re.S)
    named = {name for text in lists for name in re.findall(r"`([a-z]+\.[a-z_]+)`", text)}
    known = {m.name for m in MUTANTS}
    for name in sorted(known - named):
        log.warning("%s: the mutant %r is not named with its guarantee", GUARANTEES_PAGE, name)
    for name in sorted(named - known):
        log.warning("%s: names the mutant %r, which tests/mutants.py lacks", GUARANTEES_PAGE, name)
    short = {
        "G": "runtime/test_guarantees.py",
        "H": "runtime/test_host.py",
        "PG": "runtime/test_postgres.py",
        "C": "runtime/test_cluster.py",
        "SC": "system/test_cluster.py",
    }
    for where, test in re.findall(r"`([\w/.]+)::(test_\w+)`", markdown):
        source = ROOT / "tests" / short.get(where, where)
        if not source.is_file() or f"def {test}(" not in source.read_text():
            log.warning("%s: names %s::%s, which does not exist", GUARANTEES_PAGE, where, test)


def on_post_page(output: str, page: Any, **_: Any) -> str:
    path = page.file.src_uri
    anchors = set(re.findall(r'id="([^"]+)"', output))
    for module_name in EXPORTS.get(path, []):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if f"{module_name}.{name}" not in anchors:
                log.warning("%s: no entry for %s.%s (in its __all__)", path, module_name, name)
    if path == SETTINGS_PAGE:
        for name in settings_fields():
            if SETTINGS_ANCHOR + name not in anchors:
                log.warning("%s: no entry for the setting %r", path, name)
    return output


def on_post_build(**_: Any) -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (ROOT / target).exists():
            log.warning("README.md links to %s, which does not exist", target)
    counter = (ROOT / COUNTER).read_text()
    for shown in SHOWS_COUNTER:
        if counter not in (ROOT / shown).read_text():
            log.warning("%s does not show %s exactly as the file is", shown, COUNTER)
