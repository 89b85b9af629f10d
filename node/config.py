"""The one settings object of a node, filled from flags and environment variables."""

from __future__ import annotations

import ipaddress

import attrs


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
    replay_window_s: float = 900.0
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
    ledger_path: str | None = None
    ledger_recover: bool = True  # workers leave recovery to the parent process
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    stream_queue_size: int = 64
    protocols: tuple[str, ...] = ("v1", "v2")  # the WebSocket protocols this node serves
    coalesce: bool = True  # merge queued pieces into one frame when the client is slower


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
