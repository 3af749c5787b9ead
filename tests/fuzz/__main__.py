"""``python -m tests.fuzz TARGET|all [FILE...] [--seconds N] [--merge] [-- LIBFUZZER_FLAGS]``:
run fuzz targets under atheris (see the package docstring)."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import ARTIFACTS, CORPUS, MAX_LEN, TARGETS

REPO = CORPUS.parent.parent.parent
DICTS = CORPUS.parent / "dicts"
"""libFuzzer dictionaries (``-dict``), for targets whose tokens the fuzzer cannot learn."""
INSTRUMENTED = ["runtime", "rooms", "examples", "h11", "msgpack"]
"""Packages whose branches guide the fuzzer (h11: the HTTP parser the edge drives). trio is
left out: its scheduler's branches are noise that would only slow every run."""
PURE_MSGPACK = {"codec", "link"}
"""Targets whose parser is msgpack's: run on its pure-Python twin (``msgpack.fallback``, the
same format and errors), whose branches atheris sees, where the C extension would leave the
fuzzer blind. ``test_corpus.py`` replays what they found on the C extension."""


def main(argv: list[str]) -> int:
    ours, _, passed = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("files", nargs="*", type=Path, help="inputs to run once (a crash)")
    parser.add_argument("--seconds", type=int, default=60, help="libFuzzer's -max_total_time")
    parser.add_argument("--merge", action="store_true", help="minimise the corpus in place")
    args = parser.parse_args(ours)
    if args.target == "all":
        return _all(args.seconds, args.merge, passed)
    if args.merge:
        return _merge(args.target, passed)
    if args.files:
        return _fuzz(args.target, [*passed, *map(str, args.files)])
    corpus = CORPUS / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    return _fuzz(args.target, [f"-max_total_time={args.seconds}", *passed, str(corpus)])


def _split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" not in argv:
        return argv, "", []
    at = argv.index("--")
    return argv[:at], "--", argv[at + 1 :]


def _all(seconds: int, merge: bool, passed: list[str]) -> int:
    """Each target in its own process (libFuzzer exits when its time is up); the first
    failure does not stop the others."""
    failed = []
    for target in TARGETS:
        print(f"== fuzz {target}: {seconds} s", flush=True)
        command = [sys.executable, "-m", "tests.fuzz", target, "--seconds", str(seconds)]
        if subprocess.run([*command, "--", *passed], cwd=REPO).returncode:
            failed.append(target)
        elif merge and subprocess.run([*command, "--merge"], cwd=REPO).returncode:
            failed.append(f"{target} (merge)")
    print("== fuzz: " + (f"FAILED {', '.join(failed)}" if failed else "every target passed"))
    return 1 if failed else 0


def _merge(target: str, passed: list[str]) -> int:
    """libFuzzer's -merge=1 of the corpus into a fresh folder, which then replaces it: only
    the inputs that add coverage stay (the smallest that does), and the seeds."""
    corpus = CORPUS / target
    fresh = ARTIFACTS / f"merge-{target}"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    command = [sys.executable, "-m", "tests.fuzz", target, "--", "-merge=1", *passed]
    code = subprocess.run([*command, str(fresh), str(corpus)], cwd=REPO).returncode
    if code:
        return code
    kept = sorted(fresh.iterdir())
    if not kept:
        print(f"merge of {target} kept nothing; corpus left as it was", file=sys.stderr)
        return 1
    # The hand-written seeds stay, under their names (libFuzzer names files by their SHA-1).
    seeds = {path.name: path.read_bytes() for path in corpus.glob("seed-*")}
    for path in kept:
        if path.read_bytes() in seeds.values():
            path.unlink()
    for name, data in seeds.items():
        (fresh / name).write_bytes(data)
    before, after = len(list(corpus.iterdir())), len(list(fresh.iterdir()))
    shutil.rmtree(corpus)
    shutil.move(fresh, corpus)
    print(f"{target}: corpus merged from {before} to {after} files")
    return 0


def _fuzz(target: str, flags: list[str]) -> int:
    """Run libFuzzer on ``target`` (this process): it exits when done."""
    import atheris

    artifacts = ARTIFACTS / target
    artifacts.mkdir(parents=True, exist_ok=True)
    if target in PURE_MSGPACK:
        os.environ["MSGPACK_PUREPYTHON"] = "1"  # read by msgpack when it is first imported
    with atheris.instrument_imports(include=INSTRUMENTED):
        module = importlib.import_module(f"tests.fuzz.{target}")
    one_input: Callable[[bytes], None] = module.one_input
    # libFuzzer runs a merge's inner pass by re-running its argv[0] as a shell command.
    program = f"{sys.executable} -m tests.fuzz {target} --"
    defaults = [f"-max_len={MAX_LEN[target]}", f"-artifact_prefix={artifacts}/"]
    dictionary = DICTS / f"{target}.dict"
    if dictionary.exists():
        defaults.append(f"-dict={dictionary}")
    atheris.Setup([program, *defaults, "-print_final_stats=1", *flags], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
