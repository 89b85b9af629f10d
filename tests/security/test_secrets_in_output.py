"""Secrets never leave the node in clear: a full encrypted session (host-key discovery,
init, prompts, a re-init, refused frames, a backend that crashes with the prompt in its
exception text) runs through a live node with every logger at DEBUG (the node's,
trio-websocket's, httpx's). Then the captured log records (message, both of the node's
formatters, the raw record with its arguments and extras), the ``/metrics`` text, the
other HTTP routes, every error frame, every exception text and the ``repr`` of the live
state are searched for every key and plaintext the session used, in every spelling:
hex (lower and upper), base64 (standard and URL-safe, with and without padding), Python
``repr`` of the bytes, Latin-1 text of the raw bytes, the decimal integer.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import httpx
import pytest
import trio
from coincurve import PrivateKey

from node.client import ClientError, open_session
from node.crypto.curve import parse_public_key
from node.crypto.hostkey import HostKey
from node.crypto.kdf import hkdf_sha256_fast32
from node.inference.base import Emit, GenerationRequest, GenerationResult, ModelInfo, Piece
from node.inference.echo import EchoBackend
from node.logs import JsonFormatter, TextFormatter
from tests.server._support import init_frame, parse_prometheus

from ._support import ws_client

GUARD_S = 60
PROMPTS = [
    "Quokka-Zebra-4417 öffnet das Kästchen 秘密の箱 🦘 please",
    "Narwhal-Tangerine-9913 second question",
    "Okapi-Pelican-2208 after the re-init",
]
CRASH_PROMPT = "Axolotl-CRASH-5521 this one makes the backend fail"
UNSUPPORTED_ACTION = "Platypus-Action-7734"
MODEL_SECRET = "Ibex-Model-6650"


class LeakyBackend:
    """Echo, except that a prompt containing CRASH emits a piece and then raises a plain
    exception whose text carries the prompt (what a careless library might do)."""

    name = "leaky"

    def __init__(self) -> None:
        self.echo = EchoBackend()

    def models(self) -> list[ModelInfo]:
        return self.echo.models()

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self.echo.aclose()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        prompt = request.prompt or ""
        if "CRASH" in prompt:
            await emit(Piece(prompt[:12], 1))
            raise RuntimeError(f"model exploded while reading {prompt!r}")
        return await self.echo.generate(request, emit)


class RecordingRng:
    """os.urandom that remembers what it handed out (the client's secrets)."""

    def __init__(self) -> None:
        self.outputs: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        data = os.urandom(n)
        self.outputs.append(data)
        return data


def spellings(secret: bytes) -> set[str]:
    b64 = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    return {
        secret.hex(),
        secret.hex().upper(),
        b64,
        b64.rstrip("="),
        url,
        url.rstrip("="),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
        str(int.from_bytes(secret, "big")),
    }


def text_spellings(text: str) -> set[str]:
    raw = text.encode("utf-8")
    return {
        text,
        json.dumps(text)[1:-1],  # the ASCII-escaped JSON spelling
        raw.hex(),
        base64.b64encode(raw).decode().rstrip("="),
        *[word for word in text.split() if "-" in word],  # each distinctive word alone
    }


def leaks(needles: dict[str, set[str]], haystacks: dict[str, str]) -> list[str]:
    found = []
    for secret_name, forms in needles.items():
        for form in forms:
            for where, text in haystacks.items():
                if form and form in text:
                    found.append(f"{secret_name} ({form[:16]}...) in {where}")
    return found


def test_the_leak_search_finds_what_is_there() -> None:
    secret = os.urandom(32)
    for form in spellings(secret):
        assert leaks({"s": {form}}, {"log": f"x {form} y"}) == [f"s ({form[:16]}...) in log"]
    assert leaks({"p": text_spellings(PROMPTS[0])}, {"log": "Quokka-Zebra-4417"})
    assert not leaks({"s": spellings(secret)}, {"log": os.urandom(32).hex()})


def _render(record: logging.LogRecord) -> str:
    return "\n".join(
        [
            record.getMessage(),
            TextFormatter().format(record),
            JsonFormatter().format(record),
            repr(record.args),
            repr({k: v for k, v in record.__dict__.items() if k not in ("args", "msg")}),
            str(record.msg),
        ]
    )


async def test_no_key_or_plaintext_in_logs_metrics_errors_or_exceptions(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger and every logger under it
    host = HostKey.generate()
    host_scalar = bytes.fromhex(host.private_key_hex()[2:])
    # Protocol v1 only: this test follows v1's secrets (the client reaches v1 by fallback).
    node = await node_factory.start(
        host_key=host, backend=LeakyBackend(), max_errors=100, protocols=("v1",)
    )
    rng = RecordingRng()
    client_key = PrivateKey()
    raw_session_key = os.urandom(32)
    frames: list[str] = []
    exception_texts: list[str] = []
    http_texts: dict[str, str] = {}
    state_reprs: list[str] = []
    answers: list[str] = []

    with trio.fail_after(GUARD_S):
        # 1. Our client: discovery (/v1/host-key + challenge), init, prompts, re-init.
        async with open_session(
            node.url, model="echo", job_id=77, client_key=client_key, rng=rng
        ) as session:
            for prompt in PROMPTS[:2]:
                answers.append((await session.complete(prompt)).text)
            await session.reinit()
            answers.append((await session.complete(PROMPTS[2])).text)
            state_reprs += [repr(d.state.sessions) for d in node.ctx.drivers]
            state_reprs += [repr(s) for d in node.ctx.drivers for s in d.state.sessions.values()]
            state_reprs += [repr(session), repr(session._key), repr(node.ctx.host_key)]
            # A crash in the backend after streaming began.
            try:
                await session.complete(CRASH_PROMPT)
            except ClientError as exc:
                exception_texts += [str(exc), repr(exc), exc.code or ""]
        # 2. A raw client for frames our library would never send.
        async with ws_client(node) as raw:
            raw_rng = RecordingRng()
            frame, raw_session = init_frame(
                node.host_public_key, session_id="5", session_key=raw_session_key, rng=raw_rng
            )
            rng.outputs += raw_rng.outputs
            await raw.send(frame)
            await raw.expect("session_init_ack")
            bad = raw_session.message_frame({"prompt": PROMPTS[0]}, index=0)
            bad["payload"]["ciphertextHex"] = "00" + bad["payload"]["ciphertextHex"][2:]
            requests = [
                bad,
                raw_session.message_frame({"prompt": PROMPTS[1], "action": UNSUPPORTED_ACTION}),
                raw_session.message_frame({"prompt": PROMPTS[1], "model": 12}),
                raw_session.message_frame({"prompt": PROMPTS[1], "messages": "x"}),
                raw_session.message_frame({"prompt": PROMPTS[1], "stop": [MODEL_SECRET] * 9}),
                raw_session.message_frame(b"\xff\xfe" + PROMPTS[1].encode()),
                raw_session.message_frame({"prompt": PROMPTS[1]}, index=0),  # replay index 0
            ]
            raw_session.next_index = 6  # past the frames above that reached the AEAD
            for request in requests:
                await raw.send(request)
                reply = await raw.recv()
                assert reply["type"] == "error", reply
                frames.append(json.dumps(reply))
            # A request that does run, with a distinctive model name (echo accepts any).
            await raw.send(raw_session.message_frame({"prompt": PROMPTS[1], "model": MODEL_SECRET}))
            result = await raw.collect(raw_session)
            assert result.text == PROMPTS[1]
            frames.append(json.dumps(result.end))
        # 3. Every HTTP route.
        async with httpx.AsyncClient(base_url=node.url) as http:
            for path in ("/metrics", "/health", "/v1/version", "/v1/models", "/v1/host-key"):
                http_texts[path] = (await http.get(path)).text
        await node.wait_no_connections()
        http_texts["/metrics after"] = node.ctx.metrics.render()

    assert answers == PROMPTS
    assert exception_texts
    assert exception_texts[-1] == "INFERENCE_FAILED"
    samples = parse_prometheus(http_texts["/metrics"])
    assert samples['llm_node_errors_total{code="INFERENCE_FAILED"}'] == 1

    records = caplog.records
    loggers = {r.name for r in records}
    assert {"node.server", "trio-websocket"} <= loggers, loggers  # the capture is real
    assert any(r.levelno == logging.DEBUG for r in records)
    assert any(getattr(r, "error_type", None) == "RuntimeError" for r in records)

    # Everything secret the session used.
    eph_and_keys = [o for o in rng.outputs if len(o) == 32]
    shared: list[bytes] = []
    host_point = parse_public_key(host.public_key)
    for scalar in eph_and_keys:
        try:  # every 32-byte output that is a valid scalar may have been an ephemeral key
            x = host_point.multiply(scalar).format(compressed=True)[1:]
        except ValueError:
            continue
        shared += [x, bytes(hkdf_sha256_fast32(x))]
    needles: dict[str, set[str]] = {"host private key": spellings(host_scalar)}
    needles["client signing key"] = spellings(client_key.secret)
    needles["raw session key"] = spellings(raw_session_key)
    for i, secret in enumerate(eph_and_keys):
        needles[f"client rng secret {i}"] = spellings(secret)
    for i, secret in enumerate(shared):
        needles[f"derived init secret {i}"] = spellings(secret)
    for i, prompt in enumerate([*PROMPTS, CRASH_PROMPT]):
        needles[f"prompt {i}"] = text_spellings(prompt)
    needles["action"] = {UNSUPPORTED_ACTION}
    needles["model"] = {MODEL_SECRET}
    assert len(eph_and_keys) >= 4  # challenge, two session keys, two ephemeral scalars ...

    haystacks: dict[str, str] = {}
    for i, record in enumerate(records):
        haystacks[f"log record {i} ({record.name}: {record.msg!s:.40})"] = _render(record)
    haystacks.update({f"http {path}": text for path, text in http_texts.items()})
    for i, text in enumerate(frames):
        haystacks[f"frame {i}"] = text
    for i, text in enumerate(exception_texts):
        haystacks[f"exception text {i}"] = text
    for i, text in enumerate(state_reprs):
        haystacks[f"repr {i}"] = text
    found = leaks(needles, haystacks)
    assert not found, "\n".join(found[:20])
