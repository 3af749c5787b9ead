"""Counters and gauges of a running server, readable as Prometheus text."""

from __future__ import annotations

import attrs


def _counter(help_text: str) -> int:
    return attrs.field(default=0, metadata={"help": help_text, "type": "counter"})


def _gauge(help_text: str) -> int:
    return attrs.field(default=0, metadata={"help": help_text, "type": "gauge"})


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
    messages_out_total: int = _counter("WebSocket messages sent to clients")
    room_activations_total: int = _counter("room instances started")
    handler_errors_total: int = _counter("exceptions raised by room hooks")
    storage_commits_total: int = _counter("room events whose writes were committed")
    storage_errors_total: int = _counter("failed storage commits")
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
        "connections closed 1011: no answer to a keepalive ping"
    )
    limit_origin_total: int = _counter("upgrades refused 403: Origin not in allowed_origins")
    limit_auth_total: int = _counter("upgrades refused by a room class's on_before_connect")
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
        "node links refused: from outside cluster_link_networks, or without cluster_token"
    )
    cluster_lease_renew_ms: int = _gauge("how long the last lease renewal took (ms)")
    cluster_self_fences_total: int = _counter("times this node stopped serving: lease lost")
    cluster_dead_nodes_total: int = _counter("other nodes this node saw declared dead")
    cluster_registrations_total: int = _counter("times this node joined the cluster")

    def prometheus(self) -> str:
        lines = []
        for field in attrs.fields(Metrics):
            name, meta = field.name, field.metadata
            lines.append(f"# HELP rooms_{name} {meta['help']}")
            lines.append(f"# TYPE rooms_{name} {meta['type']}")
            lines.append(f"rooms_{name} {getattr(self, name)}")
        return "\n".join(lines) + "\n"
