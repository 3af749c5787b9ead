"""Server settings: defaults, a TOML file, and command-line overrides."""

from __future__ import annotations

import ipaddress
import ssl
import tomllib
from pathlib import Path
from typing import Any

import attrs

KiB = 1024
MiB = 1024 * KiB


@attrs.frozen(kw_only=True)
class Settings:
    """Every setting of a Rooms server, with its default.

    Each limit is enforced with an error the client can read and counted in a metric
    (see ``runtime.metrics``)."""

    host: str = "127.0.0.1"
    """Address to listen on ("0.0.0.0" or "::" for every interface)."""
    port: int = 8000
    """Port to listen on."""
    data_dir: str = "data"
    """Folder of the SQLite database (``rooms.sqlite3``); ":memory:" keeps nothing."""
    certfile: str = ""
    """PEM certificate chain: with it the server speaks https and wss only."""
    keyfile: str = ""
    """PEM private key of ``certfile`` (empty: the key is in ``certfile``)."""
    synchronous: str = "NORMAL"
    """SQLite durability: NORMAL survives a killed process, FULL also a power loss."""

    max_message_bytes: int = 1 * MiB
    """Largest WebSocket message a client may send; larger ones close with 1009."""
    messages_per_second_per_connection: float = 0.0
    """Sustained messages per second one WebSocket may send (a token bucket holding
    ``message_burst_per_connection``); 0: no limit (the default)."""
    message_burst_per_connection: int = 50
    """Messages one WebSocket may send at once before the rate above applies."""
    message_rate_action: str = "close"
    """Past the rate: "close" (1008 "message rate limit exceeded") or "drop" (the message
    is dropped and the client gets the text frame {"error": "too many messages: ..."})."""
    max_outbox_bytes: int = 4 * MiB
    """Bytes queued for one client that is not reading; past it the client is closed (1008)."""
    mailbox_size: int = 1024
    """Events queued per room; when full the edge stops reading the senders' sockets."""
    max_connections: int = 10_000
    """Open TCP connections in total; past it upgrades get 503."""
    max_connections_per_room: int = 10_000
    """WebSocket connections per room; past it upgrades get 503."""
    max_connections_per_ip: int = 0
    """WebSockets one client address may hold open; past it upgrades get 429 (0: no limit,
    the default, since many users can share one address behind a NAT)."""
    upgrades_per_second_per_ip: float = 0.0
    """Sustained WebSocket upgrades per second from one address (a token bucket holding
    ``upgrade_burst_per_ip``); past it 429 with Retry-After (0: no limit, the default)."""
    upgrade_burst_per_ip: int = 20
    """Upgrades one address may make at once before ``upgrades_per_second_per_ip`` applies."""
    max_header_bytes: int = 16 * KiB
    """Request line plus headers; larger requests get 431."""
    max_body_bytes: int = 1 * MiB
    """Plain HTTP request bodies; larger ones get 413."""
    handshake_timeout: float = 10.0
    """Seconds to receive a complete request head (slowloris guard); then 408."""
    body_timeout: float = 30.0
    """Seconds to receive a plain HTTP request's whole body once its head is in (a guard
    against bodies trickled a byte at a time); then 408. At ``max_body_bytes``' default it
    asks about 35 KB/s of an uploader."""
    keepalive_timeout: float = 15.0
    """Seconds an idle keep-alive HTTP connection stays open."""
    close_timeout: float = 5.0
    """Seconds to wait for the client's Close reply before dropping the TCP connection."""
    ping_interval: float = 20.0
    """Seconds a WebSocket may be silent before the server pings it (0: never ping)."""
    ping_timeout: float = 20.0
    """Seconds to wait for any answer to that ping; then the connection is closed with 1011
    ("keepalive timeout"), so a client that vanished without closing does not linger."""
    idle_timeout: float = 0.0
    """Seconds a WebSocket may go without a message from its client before it is closed
    with 1001 "idle timeout" (0: never, the default; pings and pongs do not count)."""
    first_message_timeout: float = 0.0
    """Seconds a new WebSocket may stay silent before its first message; then it is closed
    with 1008 "no message within N s of connecting" (0: never, the default, for rooms whose
    clients may only watch). A room class's ``first_message_timeout`` overrides it."""
    drain_timeout: float = 10.0
    """Seconds a stopping server (SIGTERM, SIGINT) waits for its WebSockets to close (1012)
    and its running events and commits to finish; a second signal stops it at once."""
    room_idle_timeout: float = 30.0
    """Seconds a room with no connections and no events stays in memory."""
    max_rooms_in_memory: int = 10_000
    """Room instances kept in memory; past it the least recently used idle ones leave
    (hibernated if they have connections, unloaded otherwise) at their next step, so rooms
    busy with an event, or on their way out, may take it briefly past."""
    storage_cache_bytes: int = 256 * 1024
    """Bytes of stored values (keys and values read or written) a room keeps in memory for
    reads again; past it its cache starts over. The caches of all rooms in memory hold at
    most ``max_rooms_in_memory`` times this."""
    max_inflight_commits: int = 64
    """Commits one room may have in flight before it waits for the disk."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (``10.0.0.0/8``) of reverse proxies whose ``X-Forwarded-For``
    names the real client; from anyone else the header is ignored (it is trivially forged)."""
    usage_log: str = ""
    """A file to append one JSON line to per closed WebSocket (see the deployment guide,
    Accounting); empty: none (the totals at /_rooms/usage are kept either way)."""
    upstream_timeout: float = 10.0
    """Seconds to connect to a proxied route's upstream and finish its WebSocket handshake;
    then the client gets 504 (an unreachable upstream gets 502 at once)."""
    cluster: str = ""
    """A PostgreSQL connection string (``postgresql://USER@HOST/DB``): serve as one node of a
    cluster whose nodes share that database; empty: embedded mode (SQLite, one process)."""
    node_address: str = ""
    """``host:port`` at which the other nodes reach this one (its own listener); empty: this
    node's ``host`` and ``port`` (which must then be a concrete address, not 0.0.0.0)."""
    cluster_token: str = ""
    """The shared secret of the links between nodes (required in cluster mode)."""
    cluster_link_networks: tuple[str, ...] = (
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    )
    """Networks other nodes may open links from (loopback and the private ranges); a link
    upgrade from anywhere else gets 403 before its token is even looked at, so a node
    listening on a public address does not offer its links to the internet. Add a public
    network only if the nodes really reach each other over one."""
    cluster_lease_seconds: float = 3.0
    """How long a node's lease lasts (renewed three times as often): a node cut off from the
    database stops serving its rooms just before, and others may take them just after."""
    max_link_queue_bytes: int = 16 * MiB
    """Bytes queued on the link to another node; past it the edge stops reading the sockets
    of the clients sending through that link until it drains (backpressure, as a full
    mailbox does)."""
    ticket_secret: str = ""
    """The secret seat tickets (``Room.seat_ticket``) are signed with; empty: in a cluster,
    one derived from ``cluster_token`` (every node agrees), else a fresh one at each start
    (tickets live seconds)."""
    admin_token: str = ""
    """Bearer token for /_rooms/metrics, /_rooms/usage and /_rooms/analytics; empty: only
    loopback clients may read them."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_file: str = ""
    """A file to append the server's log to; empty: standard error."""
    log_format: str = "text"
    """"text" (one readable line per event) or "json" (one JSON object per line)."""

    def replace(self, **changes: Any) -> Settings:
        return attrs.evolve(self, **changes)


class ConfigError(ValueError):
    """A configuration file or option is wrong; the message names the key."""


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then the TOML file at ``path`` (top-level keys named as the settings), then
    ``overrides`` whose value is not None. Unknown keys and wrong types raise ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in attrs.fields(Settings)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(fields)}")
        default = fields[key].default
        expected = float if isinstance(default, float) else type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        if expected is tuple and isinstance(value, list):
            values[key] = value = tuple(value)
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool):
            raise ConfigError(
                f"setting {key!r} must be {expected.__name__}, got {type(value).__name__}"
            )
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"setting {key!r} must not be negative, got {value}")
        if key in _CHOICES and str(value).upper() not in _CHOICES[key]:
            choices = ", ".join(_CHOICES[key])
            raise ConfigError(f"setting {key!r} must be one of {choices}, got {value!r}")
    for key in ("trusted_proxies", "cluster_link_networks"):
        for network in values.get(key, ()):
            try:
                ipaddress.ip_network(network, strict=False)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"setting {key!r}: {network!r} is not an IP address or network"
                ) from None
    if values.get("port", 0) > 65535:
        raise ConfigError(f"setting 'port' must be at most 65535, got {values['port']}")
    settings = Settings(**values)
    if settings.cluster:
        check_cluster(settings)
    tls_context(settings)  # a missing or wrong certificate is reported now, naming the key
    return settings


def check_cluster(settings: Settings) -> None:
    """What cluster mode needs, checked before serving (ConfigError naming the key)."""
    if not settings.cluster.startswith(("postgresql://", "postgres://")):
        raise ConfigError("setting 'cluster' must be a postgresql:// connection string")
    if not settings.cluster_token:
        raise ConfigError(
            "setting 'cluster_token' is required with 'cluster': the shared secret of the "
            "links between nodes"
        )
    if settings.certfile:
        raise ConfigError(
            "setting 'certfile': cluster mode's links between nodes speak plain WebSocket; "
            "terminate TLS at the load balancer and keep the nodes on a private network"
        )
    node_address(settings)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(
            "setting 'cluster': cluster mode needs psycopg (pip install 'trio-rooms[postgres]')"
        ) from None


def node_address(settings: Settings) -> str:
    """The ``host:port`` the other nodes reach this one at."""
    if settings.node_address:
        return settings.node_address
    if settings.host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"setting 'node_address' is required when listening on {settings.host!r}: the "
            "address the other nodes reach this one at, e.g. 10.0.0.5:8000"
        )
    return f"{settings.host}:{settings.port}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``certfile``."""
    if not settings.certfile:
        if settings.keyfile:
            raise ConfigError("setting 'keyfile' needs 'certfile' too")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    for key in ("certfile", "keyfile"):
        path = getattr(settings, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"setting {key!r}: no such file {path!r}")
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"settings 'certfile'/'keyfile': cannot load the certificate and key: {exc}"
        ) from None
    return context


_CHOICES = {
    "message_rate_action": ("CLOSE", "DROP"),
    "synchronous": ("NORMAL", "FULL"),  # never OFF: the kill -9 guarantee needs a journal
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    "log_format": ("TEXT", "JSON"),
}
