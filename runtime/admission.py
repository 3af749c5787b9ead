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

import attrs
import trio

from rooms import HTTPError, Request, Response, Room
from rooms._engine import ProxyRoute, error_response, text_error

from .config import Settings
from .metrics import Metrics

log = logging.getLogger("rooms.edge")

_MAX_BUCKETS = 10_000  # addresses tracked before full (idle) buckets are forgotten


@attrs.frozen
class TokenBucket:
    """The rule of a token bucket: at most ``burst`` tokens, refilled at ``rate`` per
    second, one spent per action. Each bucket's state, (tokens, when), is kept by its
    owner: here per client address, in the edge per WebSocket (two slots, no object)."""

    rate: float
    burst: float

    def take(self, tokens: float, then: float, now: float) -> tuple[float, float]:
        """Spend a token from a bucket that held ``tokens`` at ``then``: the tokens it
        holds now, and 0 if one was spent, else the seconds until one can be."""
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1:
            return tokens - 1, 0.0
        return tokens, (1 - tokens) / self.rate

    def full(self, tokens: float, then: float, now: float) -> bool:
        """Whether that bucket has refilled by ``now`` (it carries no information)."""
        return tokens + (now - then) * self.rate >= self.burst


class Admission:
    """The upgrade-time rules of one server, and the per-address state they need."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._open: dict[str, int] = {}  # address -> open WebSockets
        self._bucket = TokenBucket(
            settings.upgrades_per_second_per_ip, float(settings.upgrade_burst_per_ip)
        )
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, time)

    async def admit(self, request: Request, target: type[Room] | ProxyRoute) -> Response | None:
        """None to let the upgrade to a room class or proxied route through (with
        ``request.identity`` set), or the refusal."""
        address = request.client[0]
        allowed = target.allowed_origins
        origin = request.header("origin")
        if allowed is not None and origin is not None and origin not in allowed:
            self.metrics.limit_origin_total += 1
            return text_error(403, f"origin {origin!r} may not connect here")
        wait = self._take_token(address)
        if wait > 0:
            self.metrics.limit_ip_rate_total += 1
            retry = str(max(1, math.ceil(wait)))
            return text_error(
                429, "too many new connections from your address", {"retry-after": retry}
            )
        cap = self.settings.max_connections_per_ip
        if cap and self._open.get(address, 0) >= cap:
            self.metrics.limit_ip_connections_total += 1
            return text_error(429, f"at most {cap} connections per address", {"retry-after": "5"})
        hook = target.on_before_connect
        if hook is None:
            return None
        try:
            request.identity = await hook(request)
        except HTTPError as exc:
            self.metrics.limit_auth_total += 1
            return error_response(exc)
        except Exception:
            owner = target.pattern if isinstance(target, ProxyRoute) else target.__name__
            log.exception("%s: on_before_connect raised on %s; answered 500", owner, request.path)
            return text_error(500, "internal server error")
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
        bucket = self._bucket
        if not bucket.rate:
            return 0.0
        now = trio.current_time()
        tokens, wait = bucket.take(*self._buckets.get(address, (bucket.burst, now)), now)
        if not wait and len(self._buckets) >= _MAX_BUCKETS:
            self._forget_full(now)
        self._buckets[address] = (tokens, now)
        return wait

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: they carry no information."""
        full = [a for a, state in self._buckets.items() if self._bucket.full(*state, now)]
        for address in full:
            del self._buckets[address]
        if len(self._buckets) >= _MAX_BUCKETS:  # a flood from many addresses: the oldest go
            for address in list(self._buckets)[: _MAX_BUCKETS // 2]:
                del self._buckets[address]
