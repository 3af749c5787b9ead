"""``runtime.metrics``: every metric declared once and exported as Prometheus text whose TYPE
says what it is (a counter only grows, a gauge goes up and down, a histogram has cumulative
buckets), read back here with the Prometheus client's own parser; and, over real sockets,
the histograms and per-route counters of a server with traffic."""

from __future__ import annotations

import json
import re
import time

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from trio_websocket import open_websocket_url

from examples.echo.app import app as echo_app
from runtime.config import Settings
from runtime.metrics import LAGS, ROUTE_COUNTERS, Histogram, Metrics
from runtime.server import watch_loop_lag
from tests.support import REPO, raw_request, start_server


def families(text: str) -> dict[str, tuple[str, str, list[Sample]]]:
    """name -> (type, help, samples), as a Prometheus server reads the text."""
    return {
        f.name: (f.type, f.documentation, f.samples) for f in text_string_to_metric_families(text)
    }


def test_every_field_is_exported_once_with_its_type_and_help() -> None:
    exported = families(Metrics().prometheus())
    fields = attrs.fields(Metrics)
    for field in fields:
        name = f"rooms_{field.name}".removesuffix("_total")  # (the parser's family name)
        kind, text, samples = exported[name]
        assert kind == field.metadata["type"] and text == field.metadata["help"], name
        if kind != "histogram":
            assert [s.value for s in samples] == [0.0], name
    assert len(exported) == len(fields) + len(ROUTE_COUNTERS)  # and the counters per route


def test_totals_are_counters_and_everything_else_gauges_or_histograms() -> None:
    for field in attrs.fields(Metrics):
        kind = field.metadata["type"]
        assert (kind == "counter") == field.name.endswith("_total"), field.name
        assert kind != "histogram" or field.name.endswith(("_seconds", "_bytes")), field.name


def test_values_are_the_current_counts() -> None:
    metrics = Metrics()
    metrics.websockets_open += 3
    metrics.messages_in_total += 7
    exported = families(metrics.prometheus())
    assert exported["rooms_websockets_open"][2][0].value == 3
    assert exported["rooms_messages_in"][2][0].value == 7


def test_a_histogram_counts_each_observation_in_every_bucket_at_or_above_it() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.sum == 2.65
    metrics = Metrics()
    metrics.event_seconds.by["Chat"] = histogram
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in families(metrics.prometheus())["rooms_event_seconds"][2]
    }
    assert samples[("rooms_event_seconds_bucket", "+Inf")] == 4
    assert samples[("rooms_event_seconds_count", None)] == 4
    assert samples[("rooms_event_seconds_sum", None)] == 2.65


async def test_a_server_with_traffic_reports_histograms_and_counters_per_route(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/metrics") as ws:
        for size in (10, 100, 1000):
            await ws.send_message("x" * size)
            assert len(await ws.get_message()) == size
    await trio.sleep(0.1)  # (the server's side of the close)
    response = await raw_request(port, b"GET /_rooms/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 0.5)
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: text/plain; version=" in head.lower()
    exported = families(body.decode())

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in exported[family][2] if s.name == sample and s.labels == labels]
        assert len(found) == 1, (sample, labels)
        return found[0]

    route = {"route": "/echo/{name}"}
    assert value("rooms_route_websockets", "rooms_route_websockets_total", **route) == 1
    assert value("rooms_route_messages_in", "rooms_route_messages_in_total", **route) == 3
    assert value("rooms_route_bytes_out", "rooms_route_bytes_out_total", **route) > 1110
    sizes = "rooms_message_bytes", "rooms_message_bytes_bucket"
    assert value(*sizes, le="16.0", **route) == 1
    assert value(*sizes, le="1024.0", **route) == 3
    assert value("rooms_message_bytes", "rooms_message_bytes_sum", **route) == 1110
    durations = "rooms_connection_seconds", "rooms_connection_seconds_count"
    assert value(*durations, **route) == 1
    events = "rooms_event_seconds", "rooms_event_seconds_count"
    assert value(*events, room_class="EchoRoom") >= 3  # the connect, 3 messages, the close


def test_the_grafana_dashboard_asks_only_for_metrics_the_server_exports() -> None:
    """docs/grafana-dashboard.json: every ``rooms_*`` series its queries name exists."""
    metrics = Metrics()
    for field in attrs.fields(Metrics):
        if field.metadata["type"] == "histogram":
            histogram = getattr(metrics, field.name)
            (histogram if isinstance(histogram, Histogram) else histogram.of("x")).observe(1.0)
    counts = dict.fromkeys(
        ["websockets", "bytes_in", "bytes_out", "messages_in", "messages_out"], 1
    )
    text = metrics.prometheus({"/route": counts})
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {name for query in queries for name in re.findall(r"\brooms_[a-z_]+", query)}
    assert len(queries) > 10 and named
    assert named <= exported, named - exported


async def test_a_blocked_event_loop_is_measured_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A room's handler that blocks for a second (a synchronous call) delays everything: the
    lag shows in ``loop_lag_seconds`` and a warning says what it means."""
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_loop_lag, metrics)
        await trio.sleep(0.35)  # (a few looks at an idle loop)
        time.sleep(1.2)  # noqa: ASYNC251 - the blocking call under test
        await trio.sleep(0.15)
        nursery.cancel_scope.cancel()
    lag = metrics.loop_lag_seconds
    assert lag.counts[0] >= 2  # idle: under a millisecond late
    assert sum(lag.counts[LAGS.index(1.0) + 1 :]) == 1 and lag.sum >= 1.1
    assert "the event loop was blocked for 1." in caplog.text
    exported = families(metrics.prometheus())["rooms_loop_lag_seconds"][2]
    assert [s.value for s in exported if s.labels == {"le": "+Inf"}] == [sum(lag.counts)]
