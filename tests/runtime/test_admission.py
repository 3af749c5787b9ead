"""Upgrade-time rules (``runtime.admission``): the token bucket, then ``Admission.admit`` in
its order (Origin, the per-address upgrade rate, the per-address open WebSockets, the
``on_before_connect`` hook) and the metric each refusal bumps. Time is trio's mock clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio.testing

from rooms import App, HTTPError, Request, Response, Room
from rooms._engine import ProxyRoute
from runtime.admission import Admission, TokenBucket
from runtime.config import Settings
from runtime.metrics import Metrics

HOOK_CALLS: list[str] = []


class Plain(Room):
    """No rules of its own: any origin, the default hook."""


class Strict(Room):
    allowed_origins = ("https://ok.example",)


class Guarded(Room):
    """``?token=`` decides: "secret" is ada, "boom" is a bug, anything else is refused."""

    @classmethod
    async def on_before_connect(cls, request: Request) -> Any:
        token = request.query_param("token")
        HOOK_CALLS.append(token or "")
        if token == "boom":
            raise RuntimeError("a bug in the hook")
        if token != "secret":
            raise HTTPError(401, "a valid ?token= is required", {"www-authenticate": "Token"})
        return {"user": "ada"}


class StrictGuarded(Guarded):
    allowed_origins = ("https://ok.example",)


@pytest.fixture(autouse=True)
def _clear_hook_calls() -> None:
    HOOK_CALLS.clear()


def request(
    address: str = "10.0.0.1", origin: str | None = None, token: str | None = None
) -> Request:
    headers = [("host", "rooms.example")]
    if origin is not None:
        headers.append(("Origin", origin))
    return Request(
        "GET",
        "/x/a",
        query_string=f"token={token}" if token is not None else "",
        headers=headers,
        client=(address, 1234),
    )


def admission(**settings: Any) -> tuple[Admission, Metrics]:
    metrics = Metrics()
    return Admission(Settings(**settings), metrics), metrics


def proxy_route(**options: Any) -> ProxyRoute:
    app = App()
    app.proxy("/p/{x}", "ws://127.0.0.1:9/{x}", **options)
    route = app.routes[0]
    assert isinstance(route, ProxyRoute)
    return route


def body(response: Response | None) -> str:
    assert response is not None
    return response.body.decode()


# -- the token bucket ------------------------------------------------------------------------


def test_a_full_bucket_spends_one_token() -> None:
    assert TokenBucket(rate=2.0, burst=3.0).take(3.0, 10.0, 10.0) == (2.0, 0.0)


def test_an_empty_bucket_reports_the_seconds_until_its_next_token() -> None:
    bucket = TokenBucket(rate=4.0, burst=3.0)
    assert bucket.take(0.0, 10.0, 10.0) == (0.0, 0.25)
    assert bucket.take(0.5, 10.0, 10.0) == (0.5, 0.125)  # (1 - 0.5) / 4


def test_a_bucket_refills_at_its_rate_between_takes() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert bucket.take(0.0, 10.0, 10.5) == (0.0, 0.0)  # half a second: one token, spent
    assert bucket.take(0.0, 10.0, 10.25) == (0.5, 0.25)


def test_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert bucket.take(0.0, 0.0, 1000.0) == (2.0, 0.0)
    assert bucket.take(3.0, 0.0, 5.0) == (2.0, 0.0)


def test_full_says_whether_a_bucket_has_refilled_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert bucket.full(3.0, 0.0, 0.0)
    assert bucket.full(0.0, 0.0, 1.5)
    assert not bucket.full(0.0, 0.0, 1.4)
    assert not bucket.full(2.5, 7.0, 7.0)


# -- Origin ------------------------------------------------------------------------------------


async def test_an_origin_not_allowed_is_403_and_counted() -> None:
    admit, metrics = admission()
    refused = await admit.admit(request(origin="https://evil.example"), Strict)
    assert refused is not None
    assert refused.status == 403
    assert "'https://evil.example'" in body(refused)
    assert metrics.limit_origin_total == 1


async def test_an_allowed_origin_passes() -> None:
    admit, metrics = admission()
    assert await admit.admit(request(origin="https://ok.example"), Strict) is None
    assert metrics.limit_origin_total == 0


async def test_a_request_without_origin_is_not_checked() -> None:
    admit, metrics = admission()
    assert await admit.admit(request(origin=None), Strict) is None
    assert metrics.limit_origin_total == 0


async def test_a_class_without_allowed_origins_takes_any_origin() -> None:
    admit, _ = admission()
    assert await admit.admit(request(origin="https://anything.example"), Plain) is None


async def test_a_proxied_route_checks_its_allowed_origins_too() -> None:
    admit, metrics = admission()
    route = proxy_route(allowed_origins=["https://ok.example"])
    assert await admit.admit(request(origin="https://ok.example"), route) is None
    refused = await admit.admit(request(origin="https://evil.example"), route)
    assert refused is not None and refused.status == 403
    assert metrics.limit_origin_total == 1


async def test_a_refused_origin_does_not_run_the_hook() -> None:
    admit, metrics = admission()
    refused = await admit.admit(request(origin="https://evil.example", token="x"), StrictGuarded)
    assert refused is not None and refused.status == 403
    assert HOOK_CALLS == []
    assert metrics.limit_auth_total == 0


# -- the upgrade rate per address ------------------------------------------------------------


async def test_past_the_burst_an_address_gets_429_with_retry_after(
    mock_clock: trio.testing.MockClock,
) -> None:
    admit, metrics = admission(upgrades_per_second_per_ip=0.5, upgrade_burst_per_ip=2)
    assert await admit.admit(request(), Plain) is None
    assert await admit.admit(request(), Plain) is None
    refused = await admit.admit(request(), Plain)
    assert refused is not None
    assert refused.status == 429
    assert refused.headers["retry-after"] == "2"  # (1 - 0) / 0.5
    assert metrics.limit_ip_rate_total == 1


async def test_retry_after_is_rounded_up_to_whole_seconds(
    mock_clock: trio.testing.MockClock,
) -> None:
    admit, _ = admission(upgrades_per_second_per_ip=0.4, upgrade_burst_per_ip=1)
    assert await admit.admit(request(), Plain) is None
    refused = await admit.admit(request(), Plain)
    assert refused is not None and refused.headers["retry-after"] == "3"  # 2.5 s


async def test_retry_after_is_at_least_one_second(mock_clock: trio.testing.MockClock) -> None:
    admit, _ = admission(upgrades_per_second_per_ip=100.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request(), Plain) is None
    refused = await admit.admit(request(), Plain)
    assert refused is not None and refused.headers["retry-after"] == "1"  # 0.01 s


async def test_the_rate_is_counted_per_address(mock_clock: trio.testing.MockClock) -> None:
    admit, metrics = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request("10.0.0.1"), Plain) is None
    refused = await admit.admit(request("10.0.0.1"), Plain)
    assert refused is not None and refused.status == 429
    assert await admit.admit(request("10.0.0.2"), Plain) is None
    assert metrics.limit_ip_rate_total == 1


async def test_an_address_is_admitted_again_once_a_token_has_refilled(
    mock_clock: trio.testing.MockClock,
) -> None:
    admit, metrics = admission(upgrades_per_second_per_ip=0.5, upgrade_burst_per_ip=1)
    assert await admit.admit(request(), Plain) is None
    mock_clock.jump(1.5)
    refused = await admit.admit(request(), Plain)
    assert refused is not None and refused.headers["retry-after"] == "1"  # 0.75 token: 0.5 s
    mock_clock.jump(0.5)
    assert await admit.admit(request(), Plain) is None
    assert metrics.limit_ip_rate_total == 1


async def test_a_refused_upgrade_spends_no_token(mock_clock: trio.testing.MockClock) -> None:
    """Being refused does not push the address's next chance further out."""
    admit, _ = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request(), Plain) is None
    for _ in range(5):
        assert await admit.admit(request(), Plain) is not None
    mock_clock.jump(1.0)
    assert await admit.admit(request(), Plain) is None


async def test_a_refused_origin_spends_no_token(mock_clock: trio.testing.MockClock) -> None:
    admit, metrics = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    refused = await admit.admit(request(origin="https://evil.example"), Strict)
    assert refused is not None and refused.status == 403
    assert await admit.admit(request(origin="https://ok.example"), Strict) is None
    assert metrics.limit_ip_rate_total == 0


async def test_without_a_rate_there_is_no_limit(mock_clock: trio.testing.MockClock) -> None:
    admit, metrics = admission(upgrades_per_second_per_ip=0.0, upgrade_burst_per_ip=1)
    for _ in range(50):
        assert await admit.admit(request(), Plain) is None
    assert metrics.limit_ip_rate_total == 0


async def test_a_rate_refusal_does_not_run_the_hook(mock_clock: trio.testing.MockClock) -> None:
    admit, _ = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request(token="secret"), Guarded) is None
    refused = await admit.admit(request(token="secret"), Guarded)
    assert refused is not None and refused.status == 429
    assert HOOK_CALLS == ["secret"]


async def test_buckets_that_refilled_are_forgotten_without_changing_any_answer(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime.admission._MAX_BUCKETS", 2)
    admit, _ = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request("10.0.0.1"), Plain) is None
    assert await admit.admit(request("10.0.0.2"), Plain) is None
    mock_clock.jump(1.0)
    assert await admit.admit(request("10.0.0.3"), Plain) is None  # .1 and .2 are forgotten
    assert await admit.admit(request("10.0.0.1"), Plain) is None
    refused = await admit.admit(request("10.0.0.3"), Plain)
    assert refused is not None and refused.status == 429


async def test_in_a_flood_from_many_addresses_the_oldest_buckets_go(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded; an address whose bucket was dropped starts full again."""
    monkeypatch.setattr("runtime.admission._MAX_BUCKETS", 2)
    admit, _ = admission(upgrades_per_second_per_ip=1.0, upgrade_burst_per_ip=1)
    assert await admit.admit(request("10.0.0.1"), Plain) is None
    assert await admit.admit(request("10.0.0.2"), Plain) is None
    assert await admit.admit(request("10.0.0.3"), Plain) is None  # none full: .1 goes
    refused = await admit.admit(request("10.0.0.2"), Plain)  # (a refusal forgets nothing)
    assert refused is not None and refused.status == 429
    assert await admit.admit(request("10.0.0.1"), Plain) is None


# -- open WebSockets per address -------------------------------------------------------------


async def test_past_max_connections_per_ip_an_address_gets_429() -> None:
    admit, metrics = admission(max_connections_per_ip=2)
    for _ in range(2):
        assert await admit.admit(request(), Plain) is None
        admit.opened("10.0.0.1")
    refused = await admit.admit(request(), Plain)
    assert refused is not None
    assert refused.status == 429
    assert refused.headers["retry-after"] == "5"
    assert body(refused) == "at most 2 connections per address\n"
    assert metrics.limit_ip_connections_total == 1


async def test_a_closed_connection_frees_its_slot() -> None:
    admit, metrics = admission(max_connections_per_ip=1)
    assert await admit.admit(request(), Plain) is None
    admit.opened("10.0.0.1")
    assert await admit.admit(request(), Plain) is not None
    admit.closed("10.0.0.1")
    assert await admit.admit(request(), Plain) is None
    assert metrics.limit_ip_connections_total == 1


async def test_open_connections_are_counted_per_address() -> None:
    admit, _ = admission(max_connections_per_ip=1)
    admit.opened("10.0.0.1")
    assert await admit.admit(request("10.0.0.2"), Plain) is None
    refused = await admit.admit(request("10.0.0.1"), Plain)
    assert refused is not None and refused.status == 429


async def test_admitting_alone_takes_no_slot() -> None:
    """A slot is taken by ``opened`` (the WebSocket joined), not by passing the rules."""
    admit, _ = admission(max_connections_per_ip=1)
    for _ in range(3):
        assert await admit.admit(request(), Plain) is None


async def test_without_a_cap_any_number_of_connections_may_be_open() -> None:
    admit, metrics = admission(max_connections_per_ip=0)
    for _ in range(100):
        admit.opened("10.0.0.1")
    assert await admit.admit(request(), Plain) is None
    assert metrics.limit_ip_connections_total == 0


# -- on_before_connect -------------------------------------------------------------------------


async def test_the_hooks_value_becomes_the_requests_identity() -> None:
    admit, metrics = admission()
    upgrade = request(token="secret")
    assert await admit.admit(upgrade, Guarded) is None
    assert upgrade.identity == {"user": "ada"}
    assert HOOK_CALLS == ["secret"]
    assert metrics.limit_auth_total == 0


async def test_the_default_hook_leaves_the_identity_none() -> None:
    admit, _ = admission()
    upgrade = request()
    upgrade.identity = "stale"
    assert await admit.admit(upgrade, Plain) is None
    assert upgrade.identity is None


async def test_an_http_error_from_the_hook_is_its_status_reason_and_headers() -> None:
    admit, metrics = admission()
    upgrade = request(token="wrong")
    refused = await admit.admit(upgrade, Guarded)
    assert refused is not None
    assert refused.status == 401
    assert body(refused) == "a valid ?token= is required"
    assert refused.headers["www-authenticate"] == "Token"
    assert upgrade.identity is None
    assert metrics.limit_auth_total == 1


async def test_any_other_exception_from_the_hook_is_500_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admit, metrics = admission()
    with caplog.at_level(logging.ERROR, logger="rooms.edge"):
        refused = await admit.admit(request(token="boom"), Guarded)
    assert refused is not None
    assert refused.status == 500
    assert body(refused) == "internal server error\n"
    assert metrics.limit_auth_total == 0
    assert "Guarded: on_before_connect raised on /x/a" in caplog.text


async def test_a_proxied_routes_hook_names_the_identity() -> None:
    async def hook(request: Request) -> str:
        return "ada"

    admit, _ = admission()
    upgrade = request()
    assert await admit.admit(upgrade, proxy_route(on_before_connect=hook)) is None
    assert upgrade.identity == "ada"


async def test_a_proxied_route_without_a_hook_is_admitted() -> None:
    admit, _ = admission()
    upgrade = request()
    assert await admit.admit(upgrade, proxy_route()) is None
    assert upgrade.identity is None


async def test_a_proxied_routes_failing_hook_is_500_naming_the_pattern(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def hook(request: Request) -> str:
        raise KeyError("oops")

    admit, _ = admission()
    with caplog.at_level(logging.ERROR, logger="rooms.edge"):
        refused = await admit.admit(request(), proxy_route(on_before_connect=hook))
    assert refused is not None and refused.status == 500
    assert "/p/{x}: on_before_connect raised" in caplog.text


async def test_the_hook_runs_after_the_address_limits_pass() -> None:
    admit, metrics = admission(max_connections_per_ip=1)
    admit.opened("10.0.0.1")
    refused = await admit.admit(request(token="secret"), Guarded)
    assert refused is not None and refused.status == 429
    assert HOOK_CALLS == []
    assert metrics.limit_auth_total == 0
