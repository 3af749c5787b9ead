"""Every input of the fuzz corpora, replayed through its target without atheris: what the
fuzzer found interesting once stays covered, and the seeds keep each target exercising
real protocol (``make fuzz`` grows the corpora; ``python -m tests.fuzz T --merge`` prunes)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.fuzz import CORPUS, MAX_LEN, TARGETS


def corpus(target: str) -> list[Path]:
    folder = CORPUS / target
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_is_seeded(target: str) -> None:
    files = corpus(target)
    assert [f for f in files if f.name.startswith("seed-")], f"no seed in {CORPUS / target}"
    assert len(files) <= 500, f"{target}: {len(files)} files; merge it (--merge)"


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays(target: str) -> None:
    """Each input runs through ``one_input`` as under the fuzzer, within ``-max_len``."""
    one_input = importlib.import_module(f"tests.fuzz.{target}").one_input
    for path in corpus(target):
        data = path.read_bytes()
        assert len(data) <= MAX_LEN[target], f"{path.name}: over -max_len"
        try:
            one_input(data)
        except Exception as exc:
            raise AssertionError(f"{target} corpus file {path.name}: {exc!r}") from exc
