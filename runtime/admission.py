"""Upgrade-time rules: what the edge checks before a WebSocket joins a room (or a proxied
route's upstream).

In order: the room class's (or route's) ``allowed_origins`` (403), the client address's upgrade
rate (429 with Retry-After), its open WebSockets (429), then the ``on_before_connect`` hook,
which may refuse (its HTTPError) or name the client (``request.identity``). Like a WAF, these
see only the upgrade; the room is not woken for a refused client.
"""

from __future__ import annotations

import logging
import math

import trio

from rooms import HTTPError, Request, Response, Room
from rooms._app import ProxyRoute

from .config import Settings
from .metrics import Metrics

log = logging.getLogger("rooms.edge")

_MAX_BUCKETS = 10_000  # addresses tracked before full (idle) buckets are forgotten


class Admission:
    """The upgrade-time rules of one server, and the per-address state they need."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._open: dict[str, int] = {}  # address -> open WebSockets
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, time)

    async def admit(self, request: Request, target: type[Room] | ProxyRoute) -> Response | None:
        """None to let the upgrade to a room class or proxied route through (with
        ``request.identity`` set), or the refusal."""
        address = request.client[0]
        allowed = target.allowed_origins
        origin = request.header("origin")
        if allowed is not None and origin is not None and origin not in allowed:
            self.metrics.limit_origin_total += 1
            return _refuse(403, f"origin {origin!r} may not connect here")
        wait = self._take_token(address)
        if wait > 0:
            self.metrics.limit_ip_rate_total += 1
            retry = str(max(1, math.ceil(wait)))
            return _refuse(429, "too many new connections from your address", retry)
        cap = self.settings.max_connections_per_ip
        if cap and self._open.get(address, 0) >= cap:
            self.metrics.limit_ip_connections_total += 1
            return _refuse(429, f"at most {cap} connections per address", "5")
        hook = target.on_before_connect
        if hook is None:
            return None
        try:
            request.identity = await hook(request)
        except HTTPError as exc:
            self.metrics.limit_auth_total += 1
            return Response.text(exc.reason, exc.status, exc.headers)
        except Exception:
            owner = target.pattern if isinstance(target, ProxyRoute) else target.__name__
            log.exception("%s: on_before_connect raised on %s; answered 500", owner, request.path)
            return _refuse(500, "internal server error")
        return None

    def opened(self, address: str) -> None:
        self._open[address] = self._open.get(address, 0) + 1

    def closed(self, address: str) -> None:
        left = self._open[address] - 1
        if left:
            self._open[address] = left
        else:
            del self._open[address]

    def _take_token(self, address: str) -> float:
        """Seconds until ``address`` may upgrade again (0: now, and a token is spent)."""
        rate = self.settings.upgrades_per_second_per_ip
        if not rate:
            return 0.0
        burst = float(self.settings.upgrade_burst_per_ip)
        now = trio.current_time()
        tokens, then = self._buckets.get(address, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return (1 - tokens) / rate
        if len(self._buckets) >= _MAX_BUCKETS:
            self._forget_full(now, rate, burst)
        self._buckets[address] = (tokens - 1, now)
        return 0.0

    def _forget_full(self, now: float, rate: float, burst: float) -> None:
        """Drop the buckets that have refilled: they carry no information."""
        full = [a for a, (t, then) in self._buckets.items() if t + (now - then) * rate >= burst]
        for address in full:
            del self._buckets[address]
        if len(self._buckets) >= _MAX_BUCKETS:  # a flood from many addresses: the oldest go
            for address in list(self._buckets)[: _MAX_BUCKETS // 2]:
                del self._buckets[address]


def _refuse(status: int, message: str, retry_after: str | None = None) -> Response:
    headers = {"retry-after": retry_after} if retry_after else None
    return Response.text(message + "\n", status, headers)
