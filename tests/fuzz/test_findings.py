"""What the fuzzers found, each as its smallest input, kept as a regression test."""

from __future__ import annotations

import pytest
import trio

from tests.fuzz import chat as fuzz_chat
from tests.fuzz import http as fuzz_http

HEAD_WITHOUT_ITS_BODY = b"HEAD / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n"
"""The client shuts down writing before the promised byte: a 400, "bad request"."""


@pytest.mark.parametrize(
    "data",
    [
        HEAD_WITHOUT_ITS_BODY,
        b"HEAD / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n",  # 400
        b"HEAD / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n",  # 413
    ],
)
def test_head_with_a_bad_request_gets_its_error_without_a_body(data: bytes) -> None:
    """runtime/http.py sent an error response to a HEAD (a bad body, a head over
    max_header_bytes, a body too large or too slow) with its body, which h11 refuses: the
    exception escaped HttpServer.serve and the client got no answer."""
    output = trio.run(fuzz_http._exchange, data)  # (its own run: no exception group)
    head, _, body = output.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), output
    assert body == b"", "a response to HEAD has no body"


@pytest.mark.parametrize(
    "frames",
    [
        b'{"name": "\\ud800"}',
        b'{"name": "alice"}\n{"message": "\\udfff"}',
    ],
)
def test_chat_answers_a_lone_surrogate_with_an_error(frames: bytes) -> None:
    """examples/chat/app.py took a name or message with a lone surrogate (JSON "\\ud800",
    valid UTF-8 on the wire); then conn.state or storage.put could not encode it, on_message
    raised and the client got 1011. Now it gets an error frame."""
    fuzz_chat.one_input(frames)
