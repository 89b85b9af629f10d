"""``llm-node chat``: talk to a node from the terminal (end-to-end encrypted by default).

With a prompt argument it asks once; without one it reads prompts from stdin, one per
line, on one connection, until end of input. Text goes to stdout as it arrives; timings
and token usage go to stderr. ``--json`` prints one JSON transcript object per prompt on
stdout instead. Errors print one line ``error [CODE]: message`` on stderr and the exit
status is non-zero (1 for a failed chat, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import trio
from coincurve import PrivateKey

from node.client.discovery import (
    endpoint_protocol,
    fetch_models,
    identity_from_public_key,
    normalize_address,
    tls_context,
    websocket_url,
)
from node.client.errors import ClientError, NodeErrorResponse
from node.client.session import (
    DEFAULT_CHAIN_ID,
    DEFAULT_CHUNK_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FIRST_CHUNK_TIMEOUT_S,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    ClientSession,
    Completion,
    open_session,
    random_client_key,
)
from node.crypto.curve import SECP256K1_N, address_of
from node.textsafe import printable

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_KEY_TEXT = re.compile(r"0x[0-9a-fA-F]{64}")


class UsageError(Exception):
    """A bad command-line argument; printed as one line, exit status 2."""

    code = "INVALID_ARGUMENT"


def add_chat_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``chat`` on the ``llm-node`` sub-command parser."""
    p = sub.add_parser(
        "chat",
        help="chat with a node (end-to-end encrypted unless --plaintext)",
        description=(
            "Send a prompt to a node and stream the answer. Without PROMPT, read prompts "
            "from stdin line by line (one connection, one session) until end of input. "
            "The host key is learned from /v1/host-key unless --host-pubkey gives it; "
            "protocol v2 proves it by its handshake, v1 by a signed challenge "
            "(POST /v1/auth/challenge)."
        ),
    )
    p.add_argument("prompt", nargs="?", help="the prompt (omit for interactive mode)")
    p.add_argument(
        "--url",
        default=os.environ.get("LLM_NODE_URL", DEFAULT_URL),
        help=f"the node's HTTP base URL or ws:// URL (default {DEFAULT_URL})",
    )
    p.add_argument("--host-pubkey", help="the node's host public key (hex); skips discovery")
    p.add_argument(
        "--ca-file",
        help="PEM file of the CA certificate(s) that signed an https/wss node's certificate "
        "(default: the system's trust store)",
    )
    p.add_argument(
        "--expect-host-address",
        help="refuse to talk unless the node's host key has this Ethereum address",
    )
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="use the deprecated unencrypted mode (the node sees nothing less, and "
        "neither does anyone on the path)",
    )
    p.add_argument(
        "--protocol",
        choices=["auto", "v1", "v2"],
        default="auto",
        help="wire protocol: auto (default) uses v2 when the node offers it and falls back "
        "to v1 with a warning; v1 or v2 pins one (v2 never falls back)",
    )
    p.add_argument(
        "--client-key-file",
        help="file holding this client's private key (0x + 64 hex); without it a fresh "
        "ephemeral key is used",
    )
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--job-id", help="job id (decimal; default random)")
    p.add_argument("--session-id", help="session id (decimal; default: the job id)")
    p.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID)
    p.add_argument(
        "--reinit-each-prompt",
        action="store_true",
        help="open the session with a new key before every prompt (as the SDK can)",
    )
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S)
    p.add_argument(
        "--first-chunk-timeout",
        type=float,
        default=DEFAULT_FIRST_CHUNK_TIMEOUT_S,
        help="seconds to wait for the first frame of an answer",
    )
    p.add_argument(
        "--chunk-timeout",
        type=float,
        default=DEFAULT_CHUNK_TIMEOUT_S,
        help="seconds to wait between frames of an answer",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON transcript per prompt on stdout instead of streaming text",
    )
    p.set_defaults(func=run_chat)


def load_client_key(path: str) -> PrivateKey:
    """Read ``0x`` + 64 hex digits from ``path``. Messages never contain the key."""
    file = Path(path)
    if not file.exists():
        raise UsageError(
            f"client key file {path} does not exist; put a private key in it as 0x followed "
            "by 64 hex digits (llm-node keygen prints one), or leave out --client-key-file "
            "to use an ephemeral key"
        )
    try:
        text = file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise UsageError(f"cannot read client key file {path}") from None
    if not _KEY_TEXT.fullmatch(text):
        raise UsageError(f"client key file {path} must hold 0x followed by 64 hex digits")
    scalar = bytes.fromhex(text[2:])
    if not 0 < int.from_bytes(scalar, "big") < SECP256K1_N:
        raise UsageError(f"client key file {path} does not hold a valid secp256k1 key")
    return PrivateKey(scalar)


def _random_job_id() -> str:
    # Below 2^53 so that JavaScript tools reading the ledger keep it exact.
    return str(int.from_bytes(os.urandom(8), "big") % (2**53 - 1) + 1)


def _check_args(args: argparse.Namespace) -> None:
    try:
        websocket_url(args.url)
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None
    if args.expect_host_address is not None:
        try:
            normalize_address(args.expect_host_address)
        except ValueError as exc:
            raise UsageError(f"--expect-host-address: {exc}") from None
    if args.host_pubkey is not None:
        try:
            identity_from_public_key(args.host_pubkey)
        except ValueError as exc:
            raise UsageError(f"--host-pubkey: {exc}") from None
    for name in ("job_id", "session_id"):
        value = getattr(args, name)
        if value is not None and not (value.isascii() and value.isdigit()):
            raise UsageError(f"--{name.replace('_', '-')} must be a decimal number")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.plaintext and args.protocol == "v2":
        raise UsageError("--protocol v2 is always encrypted; leave out --plaintext")
    try:
        args.ssl_context = tls_context(args.ca_file)
    except ValueError as exc:
        raise UsageError(f"--ca-file: {exc}") from None


def _say(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def _stats_line(completion: Completion) -> str:
    first = completion.first_token_s
    rate = completion.tokens_per_s
    parts = [
        f"first token {first:.3f} s" if first is not None else "no text",
        f"{rate:.1f} tokens/s" if rate is not None else "tokens/s n/a",
    ]
    usage = completion.usage
    if usage is not None:
        parts.append(
            f"tokens {usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
            f"= {usage.total_tokens}"
        )
    else:
        parts.append(f"tokens {completion.tokens_used} completion")
    parts.append(f"finish {completion.finish_reason}")
    parts.append(f"{completion.elapsed_s:.3f} s")
    return printable("[" + ", ".join(parts) + "]")


def _verified_by(session: ClientSession) -> str | None:
    """How the node proved it holds the host key: its v2 handshake, the v1 challenge, or
    None (plaintext; or a v1 session on a key given with --host-pubkey)."""
    host = session.host
    if host is None:
        return None
    if host.verified_by_handshake:
        return "handshake"
    return "challenge" if host.verified_by_challenge else None


def _transcript(session: ClientSession, prompt: str, completion: Completion) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage_dict(),
        "tokens_used": completion.tokens_used,
        "timings": completion.timings(),
        "client_address": session.client_address,
        "host_address": session.host.address if session.host is not None else None,
        "host_verified_by": _verified_by(session),
        "encrypted": session.encrypted,
        "protocol": session.protocol,
        "session_id": session.session_id,
        "job_id": session.job_id,
        "model": session.model,
        "request_id": completion.request_id,
    }


async def _ask(session: ClientSession, args: argparse.Namespace, prompt: str) -> None:
    response = session.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature)
    if args.json:
        result = await response.collect()
        _say(sys.stdout, json.dumps(_transcript(session, prompt, result)) + "\n")
        return
    async for piece in response:
        _say(sys.stdout, piece)
    completion = response.completion
    assert completion is not None
    _say(sys.stdout, "\n")
    _say(sys.stderr, _stats_line(completion) + "\n")


async def _read_line() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def chat_main(args: argparse.Namespace, client_key: PrivateKey) -> int:
    model = args.model
    if model is None:
        models = await fetch_models(
            args.url, timeout_s=args.connect_timeout, ssl_context=args.ssl_context
        )
        model = models[0] if models else ""
    job_id = args.job_id or _random_job_id()
    failures = 0
    async with open_session(
        args.url,
        model=model,
        job_id=job_id,
        session_id=args.session_id,
        host_public_key=args.host_pubkey,
        expected_host_address=args.expect_host_address,
        client_key=client_key,
        chain_id=args.chain_id,
        encrypted=not args.plaintext,
        protocol=args.protocol,
        reinit_each_prompt=args.reinit_each_prompt,
        connect_timeout=args.connect_timeout,
        first_chunk_timeout=args.first_chunk_timeout,
        chunk_timeout=args.chunk_timeout,
        ssl_context=args.ssl_context,
    ) as session:
        if args.protocol == "auto" and not args.plaintext and session.protocol != "v2":
            why = (
                "the URL names /v1/ws"
                if endpoint_protocol(args.url) == "v1"
                else "the node does not offer protocol v2"
            )
            _say(
                sys.stderr,
                f"warning: {why}; using protocol v1 (no forward secrecy); --protocol v2 "
                "refuses this\n",
            )
        if args.prompt is not None:
            await _ask(session, args, args.prompt)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            _say(sys.stderr, "connected; type a prompt per line, end with Ctrl-D\n")
        while True:
            if interactive:
                _say(sys.stderr, "> ")
            line = await _read_line()
            if not line:
                break
            prompt = line.rstrip("\r\n")
            if not prompt.strip():
                continue
            try:
                await _ask(session, args, prompt)
            except NodeErrorResponse as exc:
                # The node refused this prompt; the session itself is still good.
                failures += 1
                _error_line(exc.code, exc.message)
    return EXIT_FAILED if failures else 0


def _error_line(code: str, message: str) -> None:
    # Both come from the node (or from a value it echoed): shown escaped, on one line.
    _say(sys.stderr, f"error [{printable(code)}]: {printable(message)}\n")


def run_chat(args: argparse.Namespace) -> int:
    """The ``chat`` handler: returns the exit status."""
    try:
        _check_args(args)
        if args.client_key_file is not None:
            client_key = load_client_key(args.client_key_file)
        else:
            client_key = random_client_key()
            if not args.plaintext:
                _say(
                    sys.stderr,
                    "note: no --client-key-file given; using a fresh ephemeral client key "
                    f"(address {address_of(client_key.public_key)})\n",
                )
        return trio.run(chat_main, args, client_key)
    except UsageError as exc:
        _error_line(exc.code, str(exc))
        return EXIT_USAGE
    except ClientError as exc:
        _error_line(exc.code, exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say(sys.stderr, "\ninterrupted\n")
        return EXIT_INTERRUPTED
