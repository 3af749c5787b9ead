"""Coverage-guided fuzzing of the parsing surfaces (atheris, libFuzzer for Python).

Each module here is one target: a plain ``one_input(data: bytes) -> None`` that feeds the
bytes to one surface and lets only that surface's documented errors pass, so anything else
that escapes is a finding:

- ``frames``: ``runtime.frames.FrameParser``, server (masked) and client (unmasked) side;
- ``http``: ``runtime.http.HttpServer.serve`` over a socket pair, as the edge drives it;
- ``handshake``: ``runtime.handshake``'s upgrade checks, the 101 and the client's check of it;
- ``codec``: ``rooms._codec``, the msgpack codec of stored values;
- ``chat``: the example chat's ``on_message``, through ``rooms.testing``;
- ``link``: ``runtime.link.unpack``, the cluster's node link messages.

Run one under atheris (``make fuzz`` runs each for ``FUZZ_SECONDS``, 60 by default)::

    python -m tests.fuzz frames --seconds 120
    python -m tests.fuzz all --seconds 60
    python -m tests.fuzz chat --merge       # minimise that target's corpus in place
    python -m tests.fuzz link -- -runs=1000 # anything after -- goes to libFuzzer

The corpus of a target is ``tests/fuzz/corpus/<target>/`` (hand-written ``seed-*`` inputs, plus
what a run found interesting; ``--merge`` keeps the seeds and only the inputs that add
coverage); ``tests/fuzz/dicts/<target>.dict``, if there is one, is its libFuzzer dictionary.
A crash is written to ``.fuzz/<target>/`` (git-ignored); replay it with
``python -m tests.fuzz TARGET FILE`` (the traceback is printed), or call ``one_input``.
``tests/fuzz/test_corpus.py`` replays every corpus file without atheris (``make test`` runs
it), and ``tests/fuzz/test_findings.py`` keeps each finding as a regression test.

atheris is imported only by the runner (``__main__``): the targets and the tests need none.
Nothing here imports the code under test either, so the runner can instrument it on import.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
ARTIFACTS = HERE.parent.parent / ".fuzz"

MAX_LEN: dict[str, int] = {
    "frames": 2048,  # room for a 16-bit length, fragments and a close; 1009 needs less
    "http": 2048,  # past the fuzz settings' 512-byte head limit (431) and 256-byte body (413)
    "handshake": 1024,
    "codec": 1024,
    "chat": 1024,  # a few frames; a name past 32 characters or a message past 256 fit
    "link": 1024,
}
"""Each target, with libFuzzer's ``-max_len`` for it: bounded, so a run explores structure
rather than size (the limits that matter are set low in the targets)."""

TARGETS = tuple(MAX_LEN)
