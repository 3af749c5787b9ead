"""Counters, gauges and histograms of a running server, readable as Prometheus text.

The hot path only bumps plain integers and bucket counts; the text is made when it is
scraped, by prometheus-client from these values (a custom collector: its own metric objects
would take a lock per update). Labels are the ones an operator slices by (the route, the
room class), never a room id: that would be one time series per room.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import attrs
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of ``Metrics.prometheus``'s text: the classic text format, the one
``generate_latest`` writes and every Prometheus version reads."""

SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATIONS = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
LAGS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZES = (16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0)


class Histogram:
    """Observations counted into buckets (Prometheus' ``le``: at most that bound), and their
    sum: an observation costs a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float, _bisect: Callable[..., int] = bisect_left) -> None:
        # (bisect as a default argument: a local, not a global lookup, on the hot path)
        self.counts[_bisect(self.bounds, value)] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        """Count ``other``'s observations here too (the same bounds)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per bound, ``+Inf`` last, as Prometheus writes them."""
        total, out = 0, []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class Histograms:
    """One ``Histogram`` per value of a label (a route, a room class), made when first used."""

    __slots__ = ("bounds", "by")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.by: dict[str, Histogram] = {}

    def merged(self) -> Histogram:
        """Every label's observations in one histogram."""
        total = Histogram(self.bounds)
        for histogram in self.by.values():
            total.add(histogram)
        return total

    def of(self, label: str) -> Histogram:
        histogram = self.by.get(label)
        if histogram is None:
            histogram = self.by[label] = Histogram(self.bounds)
        return histogram


def _counter(help_text: str) -> int:
    return attrs.field(default=0, metadata={"help": help_text, "type": "counter"})


def _gauge(help_text: str) -> int:
    return attrs.field(default=0, metadata={"help": help_text, "type": "gauge"})


def _histogram(help_text: str, label: str = "") -> dict[str, str]:
    """The metadata of a histogram field: one histogram per value of ``label`` (a
    ``Histograms``), or just one (a ``Histogram``) without a label."""
    return {"help": help_text, "type": "histogram", "label": label}


@attrs.define(slots=True)
class Metrics:
    """Plain integer counters (cheap to bump on the hot path) and gauges, each declared once
    with its help text; exported as ``rooms_<name>``. Each limit of ``Settings`` has a
    counter here that says how often it was hit."""

    connections_open: int = _gauge("open TCP connections")
    websockets_open: int = _gauge("open WebSocket connections")
    rooms_active: int = _gauge("rooms with an activation: in memory or hibernated")
    rooms_in_memory: int = _gauge("rooms whose instance is in memory (max_rooms_in_memory)")
    rooms_hibernated: int = _gauge("rooms out of memory whose connections stay open")
    room_hibernations_total: int = _counter(
        "times a room hibernated (idle for hibernate_after, or evicted)"
    )
    room_evictions_total: int = _counter("idle rooms asked to leave memory: max_rooms_in_memory")
    alarms_fired_total: int = _counter("room alarms fired (retries included)")
    http_requests_total: int = _counter("plain HTTP requests answered")
    websocket_upgrades_total: int = _counter("WebSocket upgrades accepted")
    messages_in_total: int = _counter("WebSocket messages received from clients")
    relayed_messages_total: int = _counter(
        "messages the server relayed for their room without waking it (Room.relay_prefix)"
    )
    messages_out_total: int = _counter("WebSocket messages sent to clients")
    room_activations_total: int = _counter("room instances started")
    handler_errors_total: int = _counter("exceptions raised by room hooks")
    storage_commits_total: int = _counter("room events whose writes were committed")
    storage_errors_total: int = _counter("failed storage commits")
    storage_cache_resets_total: int = _counter(
        "times a room's read cache reached storage_cache_bytes and started over"
    )
    limit_message_too_big_total: int = _counter(
        "connections closed 1009: message over max_message_bytes"
    )
    limit_outbox_overflow_total: int = _counter(
        "connections closed 1008: outbox over max_outbox_bytes"
    )
    limit_mailbox_full_total: int = _counter(
        "times a reader waited because a room mailbox was full"
    )
    limit_connections_total: int = _counter("upgrades refused 503: max_connections")
    limit_room_connections_total: int = _counter("upgrades refused 503: max_connections_per_room")
    limit_header_too_big_total: int = _counter("requests refused 431: max_header_bytes")
    limit_body_too_big_total: int = _counter("requests refused 413: max_body_bytes")
    limit_handshake_timeout_total: int = _counter(
        "connections closed: no request head in handshake_timeout"
    )
    limit_body_timeout_total: int = _counter(
        "requests answered 408: body not received in body_timeout"
    )
    protocol_errors_total: int = _counter("WebSocket connections closed for a protocol error")
    keepalive_timeouts_total: int = _counter(
        "connections closed 1011: no answer to a keepalive ping (a node link: nothing came "
        "on it for two thirds of cluster_lease_seconds)"
    )
    limit_origin_total: int = _counter("upgrades refused 403: Origin not in allowed_origins")
    limit_auth_total: int = _counter("upgrades refused by a room class's on_before_connect")
    limit_seats_total: int = _counter(
        "upgrades refused for want of a seat: the room full or locked (max_clients, lock)"
    )
    tickets_refused_total: int = _counter(
        "upgrades refused for their seat ticket: forged, expired, for another room, or used"
    )
    limit_ip_rate_total: int = _counter("upgrades refused 429: upgrades_per_second_per_ip")
    limit_ip_connections_total: int = _counter("upgrades refused 429: max_connections_per_ip")
    idle_timeouts_total: int = _counter("connections closed 1001: no message in idle_timeout")
    limit_first_message_total: int = _counter(
        "connections closed 1008: no message in first_message_timeout"
    )
    limit_message_rate_total: int = _counter("messages over messages_per_second_per_connection")
    auto_replies_total: int = _counter(
        "messages answered by a room class's auto_reply, room not woken"
    )
    tls_handshake_failures_total: int = _counter(
        "connections closed: TLS handshake failed or timed out"
    )
    proxied_websockets_total: int = _counter("WebSockets relayed to an upstream (app.proxy routes)")
    upstream_failures_total: int = _counter(
        "proxied upgrades answered 502/504: upstream unreachable"
    )
    upstream_refusals_total: int = _counter(
        "proxied upgrades the upstream refused (status passed on)"
    )
    cluster_claims_total: int = _counter("rooms this node claimed (cluster mode)")
    cluster_fenced_commits_total: int = _counter(
        "commits refused because another node took the room over (clients closed 1012)"
    )
    cluster_forwarded_websockets: int = _gauge("clients here whose room lives on another node")
    cluster_remote_peers: int = _gauge("clients of rooms here connected through another node")
    cluster_link_queue_bytes: int = _gauge("bytes queued on the links to other nodes")
    cluster_link_refusals_total: int = _counter(
        "node links refused: from outside cluster_link_networks, without cluster_token, or "
        "speaking another link protocol"
    )
    cluster_lease_renew_ms: int = _gauge("how long the last lease renewal took (ms)")
    cluster_self_fences_total: int = _counter("times this node stopped serving: lease lost")
    cluster_dead_nodes_total: int = _counter("other nodes this node saw declared dead")
    cluster_registrations_total: int = _counter("times this node joined the cluster")
    event_seconds: Histograms = attrs.field(
        factory=partial(Histograms, SECONDS),
        metadata=_histogram(
            "time a room took to handle one event, its awaits included", "room_class"
        ),
    )
    commit_seconds: Histograms = attrs.field(
        factory=partial(Histograms, SECONDS),
        metadata=_histogram("time from an event's end to its writes being durable", "room_class"),
    )
    message_bytes: Histograms = attrs.field(
        factory=partial(Histograms, SIZES),
        metadata=_histogram(
            "size of the messages clients sent (characters of a text one)", "route"
        ),
    )
    connection_seconds: Histograms = attrs.field(
        factory=partial(Histograms, DURATIONS),
        metadata=_histogram("how long a WebSocket was open, at its close", "route"),
    )
    loop_lag_seconds: Histogram = attrs.field(
        factory=partial(Histogram, LAGS),
        metadata=_histogram(
            "how late the event loop woke a task that slept a tenth of a second: how long "
            "everything waited behind other work then"
        ),
    )

    def counts(self) -> dict[str, int]:
        """Every counter and gauge by name (the histograms aside)."""
        return {
            field.name: getattr(self, field.name)
            for field in attrs.fields(Metrics)
            if field.metadata["type"] != "histogram"
        }

    def prometheus(self, routes: Mapping[str, Mapping[str, int]] = {}) -> str:
        """The Prometheus text of every metric; ``routes``: the usage totals per route
        (``Usage.report``), exported as counters labelled by route."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, routes))
        return generate_latest(registry).decode()


ROUTE_COUNTERS = {
    "websockets": "WebSockets opened",
    "bytes_in": "bytes clients sent over WebSockets",
    "bytes_out": "bytes sent to clients over WebSockets (the bandwidth figure)",
    "messages_in": "WebSocket messages clients sent",
    "messages_out": "WebSocket messages sent to clients",
}
"""The usage totals exported per route, as ``rooms_route_<name>_total{route=...}``."""


class _Collector(Collector):
    def __init__(self, metrics: Metrics, routes: Mapping[str, Mapping[str, int]]) -> None:
        self.metrics = metrics
        self.routes = routes

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        for field in attrs.fields(Metrics):
            name, meta = f"rooms_{field.name}", field.metadata
            value = getattr(metrics, field.name)
            if meta["type"] == "counter":
                yield CounterMetricFamily(name, meta["help"], value=value)
            elif meta["type"] == "gauge":
                yield GaugeMetricFamily(name, meta["help"], value=value)
            elif isinstance(value, Histogram):
                family = HistogramMetricFamily(name, meta["help"])
                family.add_metric([], value.buckets(), value.sum)
                yield family
            else:
                family = HistogramMetricFamily(name, meta["help"], labels=[meta["label"]])
                for label, histogram in sorted(value.by.items()):
                    family.add_metric([label], histogram.buckets(), histogram.sum)
                yield family
        for key, help_text in ROUTE_COUNTERS.items():
            per_route = CounterMetricFamily(f"rooms_route_{key}_total", help_text, labels=["route"])
            for route, counts in sorted(self.routes.items()):
                per_route.add_metric([route], counts[key])
            yield per_route
