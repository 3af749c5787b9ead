"""Unit tests of ``runtime.handshake``, sans-I/O: the server's check of an upgrade request and
its 101, the client's request headers and its check of the answer, and the closing states."""

from __future__ import annotations

import base64

import pytest

from rooms import Request, Response
from runtime.frames import Close, encode_close
from runtime.handshake import (
    CloseState,
    HandshakeError,
    accept_response,
    check_accept,
    check_upgrade,
    client_headers,
    client_key,
    is_upgrade,
    receive_close,
    start_close,
)

# The sample handshake of RFC 6455, section 1.3.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
UPGRADED = {"upgrade": "websocket", "connection": "Upgrade"}  # a 101's switch headers

TEXT_PLAIN = "text/plain; charset=utf-8"


def upgrade_request(
    *,
    method: str = "GET",
    connection: str | None = "Upgrade",
    version: str | None = "13",
    key: str | None = KEY,
    extra: list[tuple[str, str]] | None = None,
) -> Request:
    """A valid upgrade request, but for the headers given (None leaves one out)."""
    headers = [("host", "example.com"), ("upgrade", "websocket")]
    if connection is not None:
        headers.append(("connection", connection))
    if version is not None:
        headers.append(("sec-websocket-version", version))
    if key is not None:
        headers.append(("sec-websocket-key", key))
    headers += extra or []
    return Request(method, "/room/a", headers=headers)


def refusal(request: Request, http_version: bytes = b"1.1") -> Response:
    response = check_upgrade(request, http_version)
    assert response is not None
    return response


def parse_101(data: bytes) -> tuple[str, dict[str, str]]:
    """The status line and header fields (lower-case names) of a response head."""
    assert data.endswith(b"\r\n\r\n")
    status, *lines = data[:-4].decode().split("\r\n")
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        fields[name.lower()] = value
    return status, fields


# -- is_upgrade ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", [("upgrade", "websocket"), ("Upgrade", "WebSocket"), ("upgrade", "websocket, h2c")]
)
def test_a_request_naming_websocket_in_upgrade_is_an_upgrade(header: tuple[str, str]) -> None:
    assert is_upgrade(Request("GET", "/room/a", headers=[header]))


@pytest.mark.parametrize(
    "headers",
    [[], [("upgrade", "h2c")], [("connection", "Upgrade")], [("upgrade", "websocketx")]],
)
def test_a_request_without_a_websocket_upgrade_is_not_an_upgrade(
    headers: list[tuple[str, str]],
) -> None:
    assert not is_upgrade(Request("GET", "/room/a", headers=headers))


# -- check_upgrade ---------------------------------------------------------------------------


def test_a_valid_upgrade_request_passes() -> None:
    assert check_upgrade(upgrade_request(), b"1.1") is None


@pytest.mark.parametrize("connection", ["upgrade", "keep-alive, Upgrade", "Upgrade ,close"])
def test_connection_may_carry_upgrade_among_other_tokens_in_any_case(connection: str) -> None:
    assert check_upgrade(upgrade_request(connection=connection), b"1.1") is None


def test_header_names_are_matched_case_insensitively() -> None:
    request = Request(
        "GET",
        "/room/a",
        headers=[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", KEY),
        ],
    )
    assert check_upgrade(request, b"1.1") is None


@pytest.mark.parametrize("method", ["POST", "HEAD", "get"])
def test_an_upgrade_that_is_not_a_get_is_refused_with_400(method: str) -> None:
    response = refusal(upgrade_request(method=method))
    assert response.status == 400
    assert response.body == b"a WebSocket upgrade must use GET\n"
    assert response.headers["content-type"] == TEXT_PLAIN


@pytest.mark.parametrize("http_version", [b"1.0", b"2"])
def test_an_upgrade_over_another_http_version_than_1_1_is_refused_with_400(
    http_version: bytes,
) -> None:
    response = refusal(upgrade_request(), http_version)
    assert response.status == 400
    assert response.body == b"a WebSocket upgrade needs HTTP/1.1\n"


@pytest.mark.parametrize("connection", [None, "keep-alive", "upgraded", ""])
def test_an_upgrade_without_connection_upgrade_is_refused_with_400(
    connection: str | None,
) -> None:
    response = refusal(upgrade_request(connection=connection))
    assert response.status == 400
    assert response.body == b"a WebSocket upgrade needs 'Connection: Upgrade'\n"


@pytest.mark.parametrize("version", [None, "8", "12", "14", "13, 8"])
def test_an_upgrade_for_another_version_than_13_is_refused_with_426_naming_13(
    version: str | None,
) -> None:
    response = refusal(upgrade_request(version=version))
    assert response.status == 426
    assert response.headers["sec-websocket-version"] == "13"
    assert response.headers["content-type"] == TEXT_PLAIN
    assert response.body == b"unsupported Sec-WebSocket-Version: this server speaks version 13"


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "not base64 at all!!!!!!!",
        KEY[:12] + "*" + KEY[12:],  # the right bytes, with a character outside base64
        base64.b64encode(bytes(15)).decode(),
        base64.b64encode(bytes(17)).decode(),
        KEY.rstrip("="),  # the right bytes, without the padding
        "é" * 24,
    ],
    ids=[
        "missing",
        "empty",
        "not-base64",
        "junk-inside",
        "15-bytes",
        "17-bytes",
        "unpadded",
        "non-ascii",
    ],
)
def test_an_upgrade_with_a_bad_key_is_refused_with_400(key: str | None) -> None:
    response = refusal(upgrade_request(key=key))
    assert response.status == 400
    assert response.body == b"invalid Sec-WebSocket-Key: expected 16 random bytes in base64\n"


def test_the_method_is_checked_before_the_rest() -> None:
    response = refusal(upgrade_request(method="POST", version="8", key=None), b"1.0")
    assert response.body == b"a WebSocket upgrade must use GET\n"


# -- accept_response -------------------------------------------------------------------------


def test_the_101_is_exactly_the_rfc_6455_answer() -> None:
    assert accept_response(upgrade_request()) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"upgrade: websocket\r\n"
        b"connection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )


def test_the_101_names_the_chosen_subprotocol() -> None:
    assert accept_response(upgrade_request(), "chat") == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"upgrade: websocket\r\n"
        b"connection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"sec-websocket-protocol: chat\r\n"
        b"\r\n"
    )


def test_an_empty_subprotocol_adds_no_header() -> None:
    assert accept_response(upgrade_request(), "") == accept_response(upgrade_request())
    assert b"sec-websocket-protocol" not in accept_response(upgrade_request(), "")


# -- the client side -------------------------------------------------------------------------


def test_a_client_key_is_16_random_bytes_in_base64() -> None:
    keys = {client_key() for _ in range(8)}
    assert len(keys) == 8
    for key in keys:
        assert len(base64.b64decode(key, validate=True)) == 16


def test_client_headers_carry_the_required_headers() -> None:
    assert client_headers("up.example:8080", KEY, None) == [
        ("host", "up.example:8080"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", KEY),
        ("sec-websocket-version", "13"),
    ]


def test_client_headers_carry_the_extras_then_the_offer() -> None:
    extra = [("x-forwarded-for", "10.0.0.1"), ("cookie", "a=1")]
    assert client_headers("up.example", KEY, "chat, superchat", extra) == [
        ("host", "up.example"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", KEY),
        ("sec-websocket-version", "13"),
        ("x-forwarded-for", "10.0.0.1"),
        ("cookie", "a=1"),
        ("sec-websocket-protocol", "chat, superchat"),
    ]


def test_client_headers_leave_out_an_empty_offer() -> None:
    headers = client_headers("up.example", KEY, "")
    assert [name for name, _ in headers if name == "sec-websocket-protocol"] == []


def test_a_client_request_passes_the_server_check() -> None:
    key = client_key()
    request = Request("GET", "/", headers=client_headers("up.example", key, "chat"))
    assert is_upgrade(request)
    assert check_upgrade(request, b"1.1") is None


@pytest.mark.parametrize(
    ("fields", "missing"),
    [
        ({"connection": "Upgrade", "sec-websocket-accept": ACCEPT}, "'Upgrade: websocket'"),
        ({"upgrade": "h2c", "connection": "Upgrade", "sec-websocket-accept": ACCEPT}, "'Upgrade"),
        ({"upgrade": "websocket", "sec-websocket-accept": ACCEPT}, "'Connection: Upgrade'"),
    ],
)
def test_check_accept_refuses_a_101_that_does_not_switch_to_websocket(
    fields: dict[str, str], missing: str
) -> None:
    # RFC 6455 section 4.1: without these the client must fail the connection.
    with pytest.raises(HandshakeError, match=f"lacks {missing}"):
        check_accept(fields, KEY, None)


def test_check_accept_refuses_an_empty_subprotocol_nobody_offered() -> None:
    fields = {**UPGRADED, "sec-websocket-accept": ACCEPT, "sec-websocket-protocol": ""}
    with pytest.raises(HandshakeError, match="subprotocol ''"):
        check_accept(fields, KEY, None)


def test_check_accept_takes_a_correct_answer_without_a_subprotocol() -> None:
    assert check_accept({**UPGRADED, "sec-websocket-accept": ACCEPT}, KEY, None) is None
    assert check_accept({**UPGRADED, "sec-websocket-accept": ACCEPT}, KEY, "chat") is None


@pytest.mark.parametrize("chosen", ["chat", "superchat"])
def test_check_accept_returns_the_offered_subprotocol_the_server_chose(chosen: str) -> None:
    fields = {**UPGRADED, "sec-websocket-accept": ACCEPT, "sec-websocket-protocol": chosen}
    assert check_accept(fields, KEY, "chat, superchat") == chosen


def test_check_accept_takes_the_servers_own_101() -> None:
    key = client_key()
    request = Request("GET", "/", headers=client_headers("up.example", key, "a, b"))
    status, fields = parse_101(accept_response(request, "b"))
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert check_accept(fields, key, "a, b") == "b"


@pytest.mark.parametrize(
    "fields",
    [
        UPGRADED,
        {**UPGRADED, "sec-websocket-accept": KEY},
        {**UPGRADED, "sec-websocket-accept": ACCEPT.lower()},
    ],
    ids=["missing", "the-key-itself", "wrong-case"],
)
def test_check_accept_refuses_a_wrong_accept_key(fields: dict[str, str]) -> None:
    with pytest.raises(HandshakeError, match="wrong Sec-WebSocket-Accept"):
        check_accept(fields, KEY, None)


def test_check_accept_refuses_the_accept_key_of_another_request() -> None:
    other = base64.b64encode(bytes(16)).decode()
    with pytest.raises(HandshakeError, match="wrong Sec-WebSocket-Accept"):
        check_accept({**UPGRADED, "sec-websocket-accept": ACCEPT}, other, None)


def test_check_accept_refuses_an_extension_that_was_not_offered() -> None:
    fields = {
        **UPGRADED,
        "sec-websocket-accept": ACCEPT,
        "sec-websocket-extensions": "permessage-deflate",
    }
    with pytest.raises(HandshakeError, match="extension that was not offered"):
        check_accept(fields, KEY, None)


@pytest.mark.parametrize("offered", [None, "chat", "chat, superchat"])
def test_check_accept_refuses_a_subprotocol_that_was_not_offered(offered: str | None) -> None:
    fields = {**UPGRADED, "sec-websocket-accept": ACCEPT, "sec-websocket-protocol": "mqtt"}
    with pytest.raises(HandshakeError, match="subprotocol 'mqtt'"):
        check_accept(fields, KEY, offered)


# -- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "allowed"),
    [
        (CloseState.OPEN, True),
        (CloseState.CLOSING, False),
        (CloseState.CLOSED, False),
        (CloseState.BROKEN, False),
    ],
)
def test_a_close_may_be_started_only_from_open(state: CloseState, allowed: bool) -> None:
    assert start_close(state) is allowed


@pytest.mark.parametrize("code", [1000, 1001, 4000])
def test_a_close_received_while_open_is_echoed_with_its_code_and_no_reason(code: int) -> None:
    state, frame = receive_close(CloseState.OPEN, Close(code, "going away"))
    assert state is CloseState.CLOSED
    assert frame == encode_close(code, "")
    assert frame == b"\x88\x02" + code.to_bytes(2, "big")


def test_an_empty_close_received_while_open_is_echoed_as_an_empty_close() -> None:
    assert receive_close(CloseState.OPEN, Close(None, "")) == (CloseState.CLOSED, b"\x88\x00")


def test_a_close_received_while_closing_finishes_with_nothing_to_send() -> None:
    assert receive_close(CloseState.CLOSING, Close(1000, "")) == (CloseState.CLOSED, b"")


@pytest.mark.parametrize("state", [CloseState.CLOSED, CloseState.BROKEN])
def test_a_close_received_after_closed_or_broken_changes_nothing(state: CloseState) -> None:
    assert receive_close(state, Close(1000, "late")) == (state, b"")
