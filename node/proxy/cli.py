"""``llm-node proxy``: a local OpenAI-compatible server that talks to a node encrypted.

Every flag has an environment variable ``LLM_NODE_PROXY_<FLAG>`` (for example
``LLM_NODE_PROXY_API_KEY``, which keeps the key out of the process list).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import trio
from coincurve import PrivateKey

from node.client import ClientError
from node.client.cli import UsageError, load_client_key
from node.client.discovery import normalize_address
from node.client.session import random_client_key
from node.proxy.link import (
    DEFAULT_IDLE_TTL_S,
    PROTOCOL_CHOICES,
    ProtocolUnavailable,
    SessionPool,
)
from node.proxy.server import ProxyConfig, ProxyServer, check_listen

log = logging.getLogger("node.proxy")
DEFAULT_LISTEN = "127.0.0.1:8090"
EXIT_FAILED = 1
EXIT_USAGE = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _flag(name: str) -> bool:
    return (_env(name, "") or "").lower() in ("1", "true", "yes", "on")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_proxy_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "proxy",
        help="serve the OpenAI API locally, end-to-end encrypted to a node",
        description=(
            "Run a local OpenAI-compatible HTTP server (POST /v1/chat/completions, "
            "POST /v1/completions, GET /v1/models, GET /health) that forwards every request "
            "to NODE over an encrypted session: prompts and answers are in plaintext only "
            "on this machine. Each flag can be set with LLM_NODE_PROXY_<FLAG>."
        ),
    )
    p.add_argument(
        "--node", default=_env("LLM_NODE_PROXY_NODE"), help="the node's base URL (http://h:p)"
    )
    p.add_argument(
        "--listen",
        type=parse_listen,
        default=_env("LLM_NODE_PROXY_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN}; port 0 = any free port)",
    )
    p.add_argument(
        "--expect-host-address",
        default=_env("LLM_NODE_PROXY_EXPECT_HOST_ADDRESS"),
        help="refuse to start unless the node's host key has this Ethereum address",
    )
    p.add_argument(
        "--client-key-file",
        default=_env("LLM_NODE_PROXY_CLIENT_KEY_FILE"),
        help="file with this client's private key (0x + 64 hex); default: an ephemeral key",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOL_CHOICES,
        default=_env("LLM_NODE_PROXY_PROTOCOL", "auto"),
        help="auto (default): v2 when the node offers it; v1 only with --allow-v1",
    )
    p.add_argument(
        "--allow-v1",
        action="store_true",
        default=_flag("LLM_NODE_PROXY_ALLOW_V1"),
        help="with --protocol auto, fall back to the older v1 protocol (logged as a warning)",
    )
    p.add_argument(
        "--api-key",
        default=_env("LLM_NODE_PROXY_API_KEY"),
        help="require Authorization: Bearer KEY (required when not listening on loopback); "
        "prefer LLM_NODE_PROXY_API_KEY, which stays out of the process list",
    )
    p.add_argument(
        "--max-concurrency",
        type=_positive,
        default=_env("LLM_NODE_PROXY_MAX_CONCURRENCY", "4"),
        help="encrypted sessions used at once (default 4); more requests wait their turn",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=_positive_seconds,
        default=_env("LLM_NODE_PROXY_SESSION_IDLE_TIMEOUT", f"{DEFAULT_IDLE_TTL_S:g}"),
        metavar="SECONDS",
        help=f"close a pooled session after this long unused (default {DEFAULT_IDLE_TTL_S:g}); "
        "keep it below the node's --idle-timeout (300 by default)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[o for o in (_env("LLM_NODE_PROXY_ALLOW_ORIGINS", "") or "").split(",") if o],
        help="an Origin allowed to call the proxy (repeatable); by default browsers are refused",
    )
    p.add_argument(
        "--log-level",
        default=_env("LLM_NODE_PROXY_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    p.add_argument(
        "--log-format", default=_env("LLM_NODE_PROXY_LOG_FORMAT", "text"), choices=["text", "json"]
    )
    p.set_defaults(func=run_proxy)


async def proxy_main(args: argparse.Namespace, config: ProxyConfig, key: PrivateKey) -> int:
    async with SessionPool.open(
        args.node,
        protocol=args.protocol,
        allow_v1=args.allow_v1,
        expected_host_address=args.expect_host_address,
        client_key=key,
        max_concurrency=args.max_concurrency,
        idle_ttl_s=args.session_idle_timeout,
    ) as link:
        if link.protocol == "v1":
            log.warning(
                "speaking protocol v1 to the node: encrypted, but its frames show session and "
                "request ids in plaintext; prefer a node that offers v2"
            )
        server = ProxyServer(config, link)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
                log.info(
                    "proxy listening on %s -> node %s, protocol %s, host %s%s",
                    server.url,
                    args.node,
                    link.protocol,
                    link.host.address,
                    " (pinned)" if args.expect_host_address else "",
                    extra={"client_address": link.client_address},
                )
    return 0


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("signal received, stopping", extra={"signal": signum})
        scope.cancel()
        return


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested one-member groups (what a nursery wraps)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_proxy(args: argparse.Namespace) -> int:
    from node.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call to the node
    try:
        if not args.node:
            raise UsageError("--node is required (or LLM_NODE_PROXY_NODE): the node's base URL")
        if args.expect_host_address is not None:
            try:
                normalize_address(args.expect_host_address)
            except ValueError as exc:
                raise UsageError(f"--expect-host-address: {exc}") from None
        host, port = args.listen
        config = ProxyConfig(
            listen_host=host,
            listen_port=port,
            api_key=args.api_key or None,
            allowed_origins=frozenset(o.strip() for o in args.allow_origin),
        )
        try:
            check_listen(config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        key = load_client_key(args.client_key_file) if args.client_key_file else random_client_key()
        try:
            return trio.run(proxy_main, args, config, key)
        except BaseExceptionGroup as group:
            leaf = _single(group)
            if leaf is group:
                raise
            raise leaf from None
    except UsageError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except ProtocolUnavailable as exc:
        print(f"error [PROTOCOL_UNAVAILABLE]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error [LISTEN_FAILED]: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
