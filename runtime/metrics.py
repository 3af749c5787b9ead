"""Counters and gauges of a running server, readable as Prometheus text."""

from __future__ import annotations

from typing import ClassVar


class Metrics:
    """Plain integer counters (cheap to bump on the hot path) and gauges.

    Each limit of ``Settings`` has a counter here that says how often it was hit."""

    HELP: ClassVar[dict[str, str]] = {
        "connections_open": "open TCP connections (gauge)",
        "websockets_open": "open WebSocket connections (gauge)",
        "rooms_active": "rooms live or hibernated (gauge)",
        "rooms_in_memory": "rooms whose instance is in memory (gauge; max_rooms_in_memory)",
        "rooms_hibernated": "rooms out of memory whose connections stay open (gauge)",
        "room_hibernations_total": "times a room hibernated (idle for hibernate_after, or evicted)",
        "room_evictions_total": "idle rooms asked to leave memory: max_rooms_in_memory",
        "alarms_fired_total": "room alarms fired (retries included)",
        "http_requests_total": "plain HTTP requests answered",
        "websocket_upgrades_total": "WebSocket upgrades accepted",
        "messages_in_total": "WebSocket messages received from clients",
        "messages_out_total": "WebSocket messages sent to clients",
        "room_activations_total": "room instances started",
        "handler_errors_total": "exceptions raised by room hooks",
        "storage_commits_total": "room events whose writes were committed",
        "storage_errors_total": "failed storage commits",
        "limit_message_too_big_total": "connections closed 1009: message over max_message_bytes",
        "limit_outbox_overflow_total": "connections closed 1008: outbox over max_outbox_bytes",
        "limit_mailbox_full_total": "times a reader waited because a room mailbox was full",
        "limit_connections_total": "upgrades refused 503: max_connections",
        "limit_room_connections_total": "upgrades refused 503: max_connections_per_room",
        "limit_header_too_big_total": "requests refused 431: max_header_bytes",
        "limit_body_too_big_total": "requests refused 413: max_body_bytes",
        "limit_handshake_timeout_total": "connections closed: no request head in handshake_timeout",
        "protocol_errors_total": "WebSocket connections closed for a protocol error",
        "keepalive_timeouts_total": "connections closed 1011: no answer to a keepalive ping",
        "limit_origin_total": "upgrades refused 403: Origin not in allowed_origins",
        "limit_auth_total": "upgrades refused by a room class's on_before_connect",
        "limit_ip_rate_total": "upgrades refused 429: upgrades_per_second_per_ip",
        "limit_ip_connections_total": "upgrades refused 429: max_connections_per_ip",
        "idle_timeouts_total": "connections closed 1001: no message in idle_timeout",
        "limit_message_rate_total": "messages over messages_per_second_per_connection",
        "auto_replies_total": "messages answered by a room class's auto_reply, room not woken",
        "tls_handshake_failures_total": "connections closed: TLS handshake failed or timed out",
        "proxied_websockets_total": "WebSockets relayed to an upstream (app.proxy routes)",
        "upstream_failures_total": "proxied upgrades answered 502/504: upstream unreachable",
        "upstream_refusals_total": "proxied upgrades the upstream refused (status passed on)",
    }

    def __init__(self) -> None:
        for name in self.HELP:
            setattr(self, name, 0)

    # Declared for type checkers; set in __init__.
    connections_open: int
    websockets_open: int
    rooms_active: int
    rooms_in_memory: int
    rooms_hibernated: int
    room_hibernations_total: int
    room_evictions_total: int
    alarms_fired_total: int
    http_requests_total: int
    websocket_upgrades_total: int
    messages_in_total: int
    messages_out_total: int
    room_activations_total: int
    handler_errors_total: int
    storage_commits_total: int
    storage_errors_total: int
    limit_message_too_big_total: int
    limit_outbox_overflow_total: int
    limit_mailbox_full_total: int
    limit_connections_total: int
    limit_room_connections_total: int
    limit_header_too_big_total: int
    limit_body_too_big_total: int
    limit_handshake_timeout_total: int
    protocol_errors_total: int
    auto_replies_total: int
    limit_origin_total: int
    limit_auth_total: int
    limit_ip_rate_total: int
    limit_ip_connections_total: int
    keepalive_timeouts_total: int
    idle_timeouts_total: int
    limit_message_rate_total: int
    tls_handshake_failures_total: int
    proxied_websockets_total: int
    upstream_failures_total: int
    upstream_refusals_total: int

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.HELP}

    def prometheus(self) -> str:
        lines = []
        for name, help_text in self.HELP.items():
            kind = "gauge" if "(gauge)" in help_text else "counter"
            lines.append(f"# HELP rooms_{name} {help_text}")
            lines.append(f"# TYPE rooms_{name} {kind}")
            lines.append(f"rooms_{name} {getattr(self, name)}")
        return "\n".join(lines) + "\n"
