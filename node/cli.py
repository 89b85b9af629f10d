"""The ``llm-node`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from node import __version__
from node.client.cli import add_chat_command
from node.config import NodeConfig, normalize_origin
from node.crypto.errors import HostKeyError
from node.crypto.hostkey import ENV_VAR, HostKey
from node.inference.factory import parse_model_map
from node.settlement.cli import add_receipts_command


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = HostKey.generate()
    try:
        if args.json:
            print(
                json.dumps(
                    {
                        "private_key": key.private_key_hex(),
                        "public_key": key.public_key_hex,
                        "address": key.address,
                    }
                )
            )
        else:
            print(f"{ENV_VAR}={key.private_key_hex()}")
            print(f"public key: {key.public_key_hex}")
            print(f"address:    {key.address}")
            print(
                f"Keep the private key secret; start the node with {ENV_VAR} set in its "
                "environment.",
                file=sys.stderr,
            )
    finally:
        key.wipe()
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    try:
        key = HostKey.from_env()
    except HostKeyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if key is None:
        print(f"error: {ENV_VAR} is not set (this node would run plaintext-only)", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps({"public_key": key.public_key_hex, "address": key.address}))
        else:
            print(f"public key: {key.public_key_hex}")
            print(f"address:    {key.address}")
    finally:
        key.wipe()
    return 0


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LLM_NODE_{name}", default)


def _env_flag(name: str) -> bool:
    return (_env(name, "") or "").lower() in ("1", "true", "yes", "on")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the node (HTTP routes and /v1/ws on one port)",
        description=(
            "Run the node. Every flag can also be set with an environment variable "
            "LLM_NODE_<FLAG> (for example LLM_NODE_PORT=9000). The host key comes only from "
            f"the environment ({ENV_VAR}); without it the node serves plaintext clients only."
        ),
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=_port, default=_env("PORT", "8080"))
    p.add_argument(
        "--backend",
        choices=["llama", "openai", "echo"],
        default=_env("BACKEND", "llama"),
        help="llama: embedded model (default); openai: an OpenAI-compatible server; "
        "echo: streams the prompt back (tests and benchmarks)",
    )
    p.add_argument("--model", dest="model_path", default=_env("MODEL"), help="GGUF file path")
    p.add_argument("--n-threads", type=_positive_int, default=_env("N_THREADS"))
    p.add_argument("--n-ctx", type=_non_negative_int, default=_env("N_CTX"), help="context window")
    p.add_argument(
        "--queue-limit",
        type=_non_negative_int,
        default=_env("QUEUE_LIMIT", "8"),
        help="requests that may wait for the model; more get RATE_LIMITED",
    )
    p.add_argument("--echo-delay-ms", type=_non_negative_float, default=_env("ECHO_DELAY_MS", "0"))
    p.add_argument("--upstream-url", default=_env("UPSTREAM_URL"), help="OpenAI-compatible URL")
    p.add_argument(
        "--upstream-model-map",
        default=_env("UPSTREAM_MODEL_MAP"),
        help="node=upstream model names, comma separated",
    )
    p.add_argument(
        "--upstream-timeout", type=_positive_float, default=_env("UPSTREAM_TIMEOUT", "60")
    )
    p.add_argument(
        "--require-encryption",
        action="store_true",
        default=_env_flag("REQUIRE_ENCRYPTION"),
        help="refuse plaintext clients (ENCRYPTION_REQUIRED)",
    )
    p.add_argument("--idle-timeout", type=_positive_float, default=_env("IDLE_TIMEOUT", "300"))
    p.add_argument("--session-ttl", type=_positive_float, default=_env("SESSION_TTL", "86400"))
    p.add_argument(
        "--max-frame-bytes", type=_frame_size, default=_env("MAX_FRAME_BYTES", "1048576")
    )
    p.add_argument(
        "--max-connections", type=_positive_int, default=_env("MAX_CONNECTIONS", "10000")
    )
    p.add_argument("--replay-window", type=_positive_float, default=_env("REPLAY_WINDOW", "900"))
    p.add_argument("--max-errors", type=_positive_int, default=_env("MAX_ERRORS", "10"))
    p.add_argument(
        "--allowed-clients",
        default=_env("ALLOWED_CLIENTS"),
        help="comma-separated client addresses allowed to open encrypted sessions",
    )
    p.add_argument(
        "--allow-plaintext-with-allowlist",
        action="store_true",
        default=_env_flag("ALLOW_PLAINTEXT_WITH_ALLOWLIST"),
        help="with --allowed-clients, still serve plaintext sessions (they prove no address)",
    )
    p.add_argument(
        "--allowed-origins",
        default=_env("ALLOWED_ORIGINS"),
        help="comma-separated browser origins that may open /v1/ws and /v2/ws (* for any); "
        "unset: none when listening on loopback, any otherwise",
    )
    p.add_argument(
        "--no-v1-challenge",
        action="store_true",
        default=_env_flag("NO_V1_CHALLENGE"),
        help="turn POST /v1/auth/challenge off (403); clients must pin the host key",
    )
    p.add_argument(
        "--max-session-bytes",
        type=_positive_int,
        default=_env("MAX_SESSION_BYTES", "67108864"),
        help="client session data the node holds at once, all connections together; "
        "more gets RATE_LIMITED",
    )
    p.add_argument(
        "--protocols",
        default=_env("PROTOCOLS", "v1,v2"),
        help="WebSocket protocols to serve, comma separated: v1 (/v1/ws), v2 (/v2/ws, needs "
        "the host key); default v1,v2",
    )
    p.add_argument("--ledger", default=_env("LEDGER"), help="SQLite ledger path")
    p.add_argument("--workers", type=_positive_int, default=_env("WORKERS", "1"))
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    p.add_argument("--log-format", default=_env("LOG_FORMAT", "text"), choices=["text", "json"])
    p.set_defaults(func=_cmd_serve)


def _number(kind: type[int] | type[float], minimum: float, what: str) -> Any:
    """An argparse type: a number of ``kind`` at least ``minimum`` (flags and env vars)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_positive_int = _number(int, 1, "a positive integer")
_non_negative_int = _number(int, 0, "a non-negative integer")
_positive_float = _number(float, 1e-9, "a positive number")
_non_negative_float = _number(float, 0, "a non-negative number")
_frame_size = _number(int, 1024, "a frame size of at least 1024 bytes")


def _port(text: str) -> int:
    value: int = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


KNOWN_PROTOCOLS = ("v1", "v2")


def parse_protocols(text: str) -> tuple[str, ...]:
    """``v1,v2`` -> ("v1", "v2"): known names, no repeats, at least one, in that order."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in KNOWN_PROTOCOLS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"--protocols {text[:40]!r} is not a list of protocols (comma separated, each "
            "once: v1, v2)"
        )
    return tuple(p for p in KNOWN_PROTOCOLS if p in names)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    model_map = parse_model_map(args.upstream_model_map) if args.upstream_model_map else {}
    allowed = None
    if args.allowed_clients:
        allowed = frozenset(a.strip().lower() for a in args.allowed_clients.split(",") if a)
    origins = None
    if args.allowed_origins:
        origins = frozenset(
            normalize_origin(o) for o in args.allowed_origins.split(",") if o.strip()
        )
    return NodeConfig(
        host=args.host,
        port=args.port,
        backend=args.backend,
        model_path=args.model_path,
        n_threads=args.n_threads,
        n_ctx=args.n_ctx,
        queue_limit=args.queue_limit,
        echo_delay_ms=args.echo_delay_ms,
        upstream_url=args.upstream_url,
        upstream_api_key=os.environ.get("LLM_NODE_UPSTREAM_API_KEY"),
        upstream_model_map=model_map,
        upstream_timeout_s=args.upstream_timeout,
        require_encryption=args.require_encryption,
        idle_timeout_s=args.idle_timeout,
        session_ttl_s=args.session_ttl,
        max_frame_bytes=args.max_frame_bytes,
        max_connections=args.max_connections,
        replay_window_s=args.replay_window,
        max_errors=args.max_errors,
        allowed_clients=allowed,
        allow_plaintext_with_allowlist=args.allow_plaintext_with_allowlist,
        allowed_origins=origins,
        v1_challenge=not args.no_v1_challenge,
        max_session_bytes=args.max_session_bytes,
        ledger_path=args.ledger,
        protocols=parse_protocols(args.protocols),
        workers=args.workers,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from node.logs import configure_logging
    from node.serve import serve_main

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    return serve_main(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-node", description="End-to-end encrypted LLM host node."
    )
    parser.add_argument("--version", action="version", version=f"llm-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a new host key and print it with its address")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("pubkey", help=f"print the public key and address of {ENV_VAR}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_pubkey)

    _add_serve(sub)
    add_chat_command(sub)
    add_receipts_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
