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
from node.proxy.cli import add_proxy_command
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


class FromEnv(str):
    """A flag's value that came from its environment variable (errors then name it)."""

    env: str

    def __new__(cls, value: str, env: str = "") -> FromEnv:
        self = super().__new__(cls, value)
        self.env = env
        return self


def _env_name(flag: str) -> str:
    return "LLM_NODE_" + flag.lstrip("-").upper().replace("-", "_")


def _where(value: object, flag: str) -> str:
    """How to name the source of ``value`` in an error: the variable or the flag."""
    return value.env if isinstance(value, FromEnv) else flag


def _typed(parse: Any) -> Any:
    """Wrap an argparse type so that a bad value from the environment names its variable."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except argparse.ArgumentTypeError as exc:
            if isinstance(text, FromEnv):
                raise argparse.ArgumentTypeError(f"{text.env}: {exc}") from None
            raise

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"{text[:40]!r} is not a boolean (1/0, true/false, yes/no, on/off)"
    )


class Switch(argparse.Action):
    """``--name`` / ``--no-name``; the environment variable (a boolean word) sets the
    default, so the command line can turn it either way."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        name = option_strings[0][2:]
        super().__init__([*option_strings, f"--no-{name}"], dest, nargs=0, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _choice(*choices: str) -> Any:
    """An argparse type: one of ``choices``, in any case."""

    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not one of {', '.join(choices)}")
        return word

    parse.__name__ = "choice"
    return parse


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the node (HTTP routes and /v1/ws on one port)",
        description=(
            "Run the node. Every flag can also be set with an environment variable "
            "LLM_NODE_<FLAG> (for example LLM_NODE_PORT=9000); a flag on the command line "
            "wins. The host key comes only from the environment "
            f"({ENV_VAR}); without it the node serves plaintext clients only."
        ),
    )

    def add(flag: str, help: str, default: Any = None, **kw: Any) -> None:
        env = _env_name(flag)
        shown = "unset" if default is None else str(default)
        if kw.get("action") is Switch:
            shown = "on" if default else "off"
            kw["type"] = _typed(_boolean)
        elif "type" in kw:
            if default is not None:
                default = kw["type"](str(default))  # the type the value will have
            kw["type"] = _typed(kw["type"])
        text = os.environ.get(env)
        value = FromEnv(text, env) if text is not None else default
        if "choices" in kw:
            kw["metavar"] = "{" + ",".join(kw["choices"]) + "}"
        p.add_argument(flag, default=value, help=f"{help} [{env}; default: {shown}]", **kw)

    add("--host", "address to listen on", "127.0.0.1")
    add("--port", "TCP port for HTTP and /v1/ws (0: any free port)", 8080, type=_port)
    add(
        "--backend",
        "llama: embedded model; openai: an OpenAI-compatible server; "
        "echo: streams the prompt back (tests and benchmarks)",
        "llama",
        type=_choice("llama", "openai", "echo"),
        choices=["llama", "openai", "echo"],
    )
    add("--model", "llama: GGUF file path (unset: the packaged SmolLM2)", dest="model_path")
    add("--n-threads", "llama: CPU threads (unset: all cores)", type=_positive_int)
    add("--n-ctx", "context window in tokens", type=_non_negative_int)
    add("--n-gpu-layers", "llama: layers offloaded to a GPU (GPU builds)", 0,
        type=_non_negative_int)  # fmt: skip
    add(
        "--queue-limit",
        "llama: requests that may wait for the model; more get RATE_LIMITED",
        8,
        type=_non_negative_int,
    )
    add("--default-max-tokens", "llama, openai: max_tokens when a request gives none", 256,
        type=_positive_int)  # fmt: skip
    add(
        "--default-temperature",
        "llama, openai: temperature when a request gives none (unset: llama 0.7, "
        "openai the upstream's own)",
        type=_temperature,
    )
    add("--echo-delay-ms", "echo: delay before each piece", 0, type=_non_negative_float)
    add("--upstream-url", "openai: the upstream's base URL")
    add("--upstream-model-map", "openai: node=upstream model names, comma separated")
    add("--upstream-timeout", "openai: connect / per-read timeout", 60, type=_positive_float)
    add(
        "--require-encryption",
        "refuse plaintext clients (ENCRYPTION_REQUIRED)",
        False,
        action=Switch,
    )
    add("--idle-timeout", "close a connection idle this long", 300, type=_positive_float)
    add("--session-ttl", "wipe a v1 session key this long after its init", 86400,
        type=_positive_float)  # fmt: skip
    add("--max-frame-bytes", "largest frame a client may send", 1048576, type=_frame_size)
    add("--max-connections", "open WebSocket connections per process", 10000,
        type=_positive_int)  # fmt: skip
    add("--max-sessions", "sessions one connection may hold at once", 64, type=_positive_int)
    add("--init-burst", "session inits (either mode) a connection may send at once", 10,
        type=_positive_int)  # fmt: skip
    add("--init-refill", "inits per second the burst allowance refills", 1,
        type=_positive_float)  # fmt: skip
    add("--replay-window", "seconds an accepted init is remembered (unset: the session TTL)",
        type=_positive_float)  # fmt: skip
    add(
        "--replay-cache-entries",
        "entries the init replay cache holds (2 per encrypted init); when full, new inits "
        "get RATE_LIMITED",
        4_000_000,
        type=_positive_int,
    )
    add("--max-errors", "error frames before a connection is closed", 10, type=_positive_int)
    add(
        "--allowed-clients",
        "comma-separated client addresses allowed to open encrypted sessions",
    )
    add(
        "--allow-plaintext-with-allowlist",
        "with --allowed-clients, still serve plaintext sessions (they prove no address)",
        False,
        action=Switch,
    )
    add(
        "--allowed-origins",
        "comma-separated browser origins that may open /v1/ws and /v2/ws (* for any); "
        "unset: none when listening on loopback, any otherwise",
    )
    add(
        "--v1-challenge",
        "answer POST /v1/auth/challenge; --no-v1-challenge turns it off (403): v2 clients "
        "need no challenge (their handshake proves the host key), v1 clients must pin it",
        True,
        action=Switch,
    )
    add(
        "--max-session-bytes",
        "client session data the node holds at once, all connections and both protocols "
        "together; more gets RATE_LIMITED",
        67108864,
        type=_positive_int,
    )
    add(
        "--trusted-proxies",
        "comma-separated proxy addresses or networks whose X-Forwarded-For is believed",
    )
    add(
        "--protocols",
        "WebSocket protocols to serve, comma separated: v1 (/v1/ws), v2 (/v2/ws, needs "
        "the host key)",
        "v1,v2",
    )
    add("--ledger", "SQLite ledger path (unset: the data directory's ledger.sqlite3)")
    add(
        "--on-ledger-failure",
        "when usage cannot be recorded: keep serving (serve), or refuse new sessions and "
        "requests with STORAGE_UNAVAILABLE until the ledger takes writes (refuse)",
        "serve",
        type=_choice("serve", "refuse"),
        choices=["serve", "refuse"],
    )
    add(
        "--address-init-burst",
        "new sessions one network address, or one client address, may open at once "
        "across all its connections (0: no limit)",
        60,
        type=_non_negative_int,
    )
    add("--address-init-rate", "per second, how fast that allowance comes back", 5,
        type=_non_negative_float)  # fmt: skip
    add("--workers", "processes sharing the port", 1, type=_positive_int)
    add("--shutdown-grace", "seconds open connections get to finish at shutdown", 5,
        type=_non_negative_float)  # fmt: skip
    add(
        "--log-level",
        "log verbosity",
        "info",
        type=_choice("debug", "info", "warning", "error"),
        choices=["debug", "info", "warning", "error"],
    )
    add(
        "--log-format",
        "text or json (one object per line)",
        "text",
        type=_choice("text", "json"),
        choices=["text", "json"],
    )
    p.set_defaults(func=_cmd_serve)


def _number(kind: type[int] | type[float], minimum: float, what: str) -> Any:
    """An argparse type: a number of ``kind`` at least ``minimum`` (flags and env vars)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum or value != value:  # NaN is no number
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


def _temperature(text: str) -> float:
    value: float = _non_negative_float(text)
    if value > 10:
        raise argparse.ArgumentTypeError(f"{text!r} is not a temperature (0-10)")
    return value


def parse_addresses(text: str) -> frozenset[str]:
    """Comma-separated Ethereum addresses -> lowercase set; ValueError on a bad entry.

    Each is 0x + 40 hex digits; one written in mixed case must carry a valid EIP-55
    checksum (a typo in a checksummed address is caught, not silently allowed).
    """
    from node.crypto.curve import to_checksum_address

    out: set[str] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        digits = item[2:] if item[:2] in ("0x", "0X") else None
        if (
            digits is None
            or len(digits) != 40
            or any(c not in "0123456789abcdefABCDEF" for c in digits)
        ):
            raise ValueError(f"{item[:50]!r} is not an Ethereum address (0x + 40 hex digits)")
        mixed = digits != digits.lower() and digits != digits.upper()
        if mixed and to_checksum_address(bytes.fromhex(digits)) != "0x" + digits:
            raise ValueError(f"{item[:50]!r} has a wrong EIP-55 checksum (a typo?)")
        out.add("0x" + digits.lower())
    if not out:
        raise ValueError("names no address")
    return frozenset(out)


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
    """The node's settings; ValueError naming the flag or variable of a bad value."""

    def checked(dest: str, flag: str, parse: Any) -> Any:
        value = getattr(args, dest)
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{_where(value, flag)}: {exc}") from None

    model_map = checked("upstream_model_map", "--upstream-model-map", parse_model_map) or {}
    allowed = checked("allowed_clients", "--allowed-clients", parse_addresses)
    proxies = checked("trusted_proxies", "--trusted-proxies", _proxy_list) or ()
    protocols_text = args.protocols
    try:
        protocols = parse_protocols(protocols_text)
    except ValueError as exc:
        if isinstance(protocols_text, FromEnv):
            raise ValueError(f"{protocols_text.env}: {exc}") from None
        raise
    # Plain values from here on (the settings travel to worker processes).
    args = argparse.Namespace(
        **{k: str(v) if isinstance(v, FromEnv) else v for k, v in vars(args).items()}
    )
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
        n_gpu_layers=args.n_gpu_layers,
        queue_limit=args.queue_limit,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
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
        max_sessions=args.max_sessions,
        init_burst=args.init_burst,
        init_refill_per_s=args.init_refill,
        replay_window_s=(
            args.replay_window if args.replay_window is not None else args.session_ttl
        ),
        replay_cache_entries=args.replay_cache_entries,
        max_errors=args.max_errors,
        allowed_clients=allowed,
        trusted_proxies=proxies,
        allow_plaintext_with_allowlist=args.allow_plaintext_with_allowlist,
        allowed_origins=origins,
        v1_challenge=args.v1_challenge,
        max_session_bytes=args.max_session_bytes,
        ledger_path=args.ledger,
        protocols=protocols,
        workers=args.workers,
        shutdown_grace_s=args.shutdown_grace,
        log_level=args.log_level,
        log_format=args.log_format,
        on_ledger_failure=args.on_ledger_failure,
        address_init_burst=args.address_init_burst,
        address_init_rate=args.address_init_rate,
    )


def _proxy_list(text: str) -> tuple[str, ...]:
    from node.server.remote import parse_trusted_proxies

    return tuple(str(net) for net in parse_trusted_proxies(text))


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
    add_proxy_command(sub)
    add_receipts_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
