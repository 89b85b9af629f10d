"""The one settings object of a node, filled from flags and environment variables."""

from __future__ import annotations

import ipaddress

import attrs

from node.protocol.storage import LedgerPolicy


@attrs.define
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "llama"
    model_path: str | None = None
    n_threads: int | None = None
    n_ctx: int | None = None
    queue_limit: int = 8
    echo_delay_ms: float = 0.0
    upstream_url: str | None = None
    upstream_api_key: str | None = attrs.field(default=None, repr=False)
    upstream_model_map: dict[str, str] = attrs.field(factory=dict)
    upstream_timeout_s: float = 60.0
    require_encryption: bool = False
    idle_timeout_s: float = 300.0
    session_ttl_s: float = 24 * 3600.0
    max_frame_bytes: int = 1024 * 1024
    max_connections: int = 10_000
    # At least the session TTL by default: an init is remembered for as long as the
    # session it opened may live.
    replay_window_s: float = attrs.field(
        default=attrs.Factory(lambda self: max(900.0, self.session_ttl_s), takes_self=True)
    )
    # Entries the init replay cache holds; an encrypted init records two. When it is full
    # of entries inside the window, new inits get RATE_LIMITED (see docs/DEPLOYMENT.md).
    replay_cache_entries: int = 4_000_000
    max_errors: int = 10
    allowed_clients: frozenset[str] | None = None
    # With allowed_clients set, plaintext sessions (which prove no address) are refused
    # unless this is on.
    allow_plaintext_with_allowlist: bool = False
    # Browser origins that may open /v1/ws (lowercase, no trailing slash; "*" = any).
    # None: any origin on a public address, none on a loopback one (see origin_allowed).
    allowed_origins: frozenset[str] | None = None
    v1_challenge: bool = True  # POST /v1/auth/challenge answers (off: 403)
    max_session_bytes: int = 64 * 1024 * 1024  # client session data held, all connections
    shutdown_grace_s: float = 5.0
    max_sessions: int = 64  # sessions one connection may hold at once
    init_burst: int = 10  # session inits (either mode) a connection may send at once ...
    init_refill_per_s: float = 1.0  # ... and how fast that allowance comes back
    n_gpu_layers: int = 0  # llama: layers offloaded to a GPU
    default_max_tokens: int = 256  # llama, openai: when a request names none
    default_temperature: float | None = None  # None: llama 0.7, openai the upstream's
    trusted_proxies: tuple[str, ...] = ()  # networks whose X-Forwarded-For is believed
    ledger_path: str | None = None
    ledger_recover: bool = True  # workers leave recovery to the parent process
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    stream_queue_size: int = 64
    protocols: tuple[str, ...] = ("v1", "v2")  # the WebSocket protocols this node serves
    coalesce: bool = True  # merge queued pieces into one frame when the client is slower
    on_ledger_failure: LedgerPolicy = "serve"  # see node.protocol.storage
    # New sessions per network address and per client address, node-wide (0: no limit).
    address_init_burst: int = 60
    address_init_rate: float = 5.0


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (a listening address) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalize_origin(text: str) -> str:
    """An origin as compared: lowercase, surrounding space and a trailing slash dropped."""
    return text.strip().rstrip("/").lower()
