"""Every error code of PROTOCOL.md section 6 over a real WebSocket, and the closing codes.

After each error the connection must still be usable (a ping gets its pong); the closing
cases check the WebSocket close code instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from coincurve import PrivateKey, PublicKey

from node.crypto.curve import address_of, e2ee_v1_digest, sign_recoverable
from node.crypto.errors import ErrorCode
from node.crypto.kdf import ZERO_SALT
from node.inference.base import Emit, GenerationRequest, GenerationResult
from node.inference.echo import EchoBackend
from node.inference.errors import ModelNotFound
from tests.server._support import (
    GatedBackend,
    RunningNode,
    WsClient,
    init_frame,
    seal_raw_init,
    ws_client,
)
from tests.server.conftest import NodeFactory

Case = Callable[[WsClient, RunningNode], Awaitable[None]]
CASES: dict[str, tuple[dict[str, Any], Case]] = {}


def case(name: str, **node_kw: Any) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES
        CASES[name] = (node_kw, fn)
        return fn

    return register


def _init(node: RunningNode, **kw: Any) -> dict[str, Any]:
    return init_frame(node.host_public_key, **kw)[0]


# --------------------------------------------------------------- INVALID_MESSAGE


@case("binary-frame")
async def _binary(c: WsClient, node: RunningNode) -> None:
    await c.send(b'{"type":"ping"}')
    await c.expect_error("INVALID_MESSAGE")


@case("bad-json")
async def _bad_json(c: WsClient, node: RunningNode) -> None:
    await c.send('{"type": "ping",')
    await c.expect_error("INVALID_MESSAGE")


@case("not-an-object")
async def _not_object(c: WsClient, node: RunningNode) -> None:
    await c.send("[1, 2, 3]")
    await c.expect_error("INVALID_MESSAGE")


@case("unknown-type")
async def _unknown_type(c: WsClient, node: RunningNode) -> None:
    await c.send({"type": "frobnicate", "id": "u-1"})
    await c.expect_error("INVALID_MESSAGE", request_id="u-1")


@case("nan-constant")
async def _nan(c: WsClient, node: RunningNode) -> None:
    await c.send('{"type": "prompt", "prompt": "x", "temperature": NaN}')
    await c.expect_error("INVALID_MESSAGE")


# ------------------------------------------------------ envelope / payload shape


@case("missing-payload-init")
async def _missing_payload_init(c: WsClient, node: RunningNode) -> None:
    await c.send({"type": "encrypted_session_init", "session_id": "1", "id": 3})
    await c.expect_error("MISSING_PAYLOAD", request_id=3)


@case("missing-payload-message")
async def _missing_payload_message(c: WsClient, node: RunningNode) -> None:
    await c.send({"type": "encrypted_message", "session_id": "1"})
    await c.expect_error("MISSING_PAYLOAD")


@case("invalid-payload-field-missing")
async def _payload_field_missing(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    del frame["payload"]["ephPubHex"]
    await c.send(frame)
    await c.expect_error("INVALID_PAYLOAD")


@case("invalid-payload-not-on-curve")
async def _not_on_curve(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    # x = 5 has no point on secp256k1 (5^3 + 7 = 132 is not a square mod p).
    frame["payload"]["ephPubHex"] = "02" + (5).to_bytes(32, "big").hex()
    await c.send(frame)
    await c.expect_error("INVALID_PAYLOAD")


@case("invalid-payload-salt")
async def _salt(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    frame["payload"]["saltHex"] = "01" * 32
    await c.send(frame)
    error = await c.expect_error("INVALID_PAYLOAD")
    assert "salt" in error["message"]


@case("invalid-hex-odd")
async def _odd_hex(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    frame["payload"]["ciphertextHex"] += "a"
    await c.send(frame)
    await c.expect_error("INVALID_HEX_ENCODING")


@case("invalid-hex-char")
async def _bad_hex_char(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    frame = session.message_frame({"prompt": "x"})
    frame["payload"]["nonceHex"] = "zz" * 24
    await c.send(frame)
    await c.expect_error("INVALID_HEX_ENCODING")


@case("invalid-nonce-size-init")
async def _nonce_size_init(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    frame["payload"]["nonceHex"] = "00" * 12
    await c.send(frame)
    await c.expect_error("INVALID_NONCE_SIZE")


@case("invalid-nonce-size-message")
async def _nonce_size_message(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    frame = session.message_frame({"prompt": "x"})
    frame["payload"]["nonceHex"] = "00" * 12
    await c.send(frame)
    await c.expect_error("INVALID_NONCE_SIZE")


# ------------------------------------------------------------------- crypto


@case("decryption-failed-init")
async def _tampered_init(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    ct = bytearray.fromhex(frame["payload"]["ciphertextHex"])
    ct[0] ^= 1
    frame["payload"]["ciphertextHex"] = ct.hex()
    await c.send(frame)
    await c.expect_error("DECRYPTION_FAILED")


@case("decryption-failed-message")
async def _wrong_key_message(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    await c.send(session.message_frame({"prompt": "x"}, key=os.urandom(32)))
    await c.expect_error("DECRYPTION_FAILED")
    # The failed message did not move the counter: message_0 still works.
    session.next_index = 0
    assert (await c.ask(session, "ok now")).text == "ok now"


@case("invalid-signature-other-signer")
async def _other_signer(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    p = frame["payload"]
    digest = e2ee_v1_digest(
        bytes.fromhex(p["ephPubHex"]),
        node.host_public_key,
        ZERO_SALT,
        bytes.fromhex(p["nonceHex"]),
        b"",
        b"",
    )
    p["signatureHex"] = sign_recoverable(PrivateKey(), digest).hex()
    await c.send(frame)
    await c.expect_error("INVALID_SIGNATURE")


@case("invalid-signature-size")
async def _short_signature(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    frame["payload"]["signatureHex"] = frame["payload"]["signatureHex"][:128]
    await c.send(frame)
    await c.expect_error("INVALID_SIGNATURE")


@case("invalid-session-data-not-json")
async def _session_not_json(c: WsClient, node: RunningNode) -> None:
    payload = seal_raw_init(node.host_public_key, PrivateKey(), b"not json at all")
    await c.send({"type": "encrypted_session_init", "session_id": "1", "payload": payload})
    await c.expect_error("INVALID_SESSION_DATA")


@case("invalid-session-data-no-key")
async def _session_no_key(c: WsClient, node: RunningNode) -> None:
    data = json.dumps({"jobId": "1", "modelName": "m", "pricePerToken": 0}).encode()
    payload = seal_raw_init(node.host_public_key, PrivateKey(), data)
    await c.send({"type": "encrypted_session_init", "session_id": "1", "payload": payload})
    await c.expect_error("INVALID_SESSION_DATA")


@case("invalid-aad")
async def _bad_aad(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    await c.send(session.message_frame({"prompt": "x"}, aad=b"chunk_0"))
    await c.expect_error("INVALID_AAD")


@case("replay-message")
async def _replayed_message(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    frame = session.message_frame({"prompt": "once"})
    await c.send(frame)
    assert (await c.collect(session)).text == "once"
    await c.send(frame)
    await c.expect_error("REPLAY_DETECTED")
    # A lower index under a fresh nonce is a replay too; a higher one is fine.
    await c.send(session.message_frame({"prompt": "x"}, index=0))
    await c.expect_error("REPLAY_DETECTED")
    await c.send(session.message_frame({"prompt": "skip"}, index=5))
    assert (await c.collect(session)).text == "skip"


@case("replay-init")
async def _replayed_init(c: WsClient, node: RunningNode) -> None:
    frame = _init(node)
    await c.send(frame)
    await c.expect("session_init_ack")
    await c.send(frame)
    await c.expect_error("REPLAY_DETECTED")


@case("replay-init-other-key-encoding")
async def _replayed_init_uncompressed(c: WsClient, node: RunningNode) -> None:
    """The same ephemeral point in its 65-byte form opens the same init: still a replay."""
    frame = _init(node)
    await c.send(frame)
    await c.expect("session_init_ack")
    eph = PublicKey(bytes.fromhex(frame["payload"]["ephPubHex"]))
    frame["payload"]["ephPubHex"] = eph.format(compressed=False).hex()
    await c.send(frame)
    await c.expect_error("REPLAY_DETECTED")


@case("session-auth-denied", allowed_clients=frozenset({"0x" + "11" * 20}))
async def _auth_denied(c: WsClient, node: RunningNode) -> None:
    await c.send(_init(node))
    error = await c.expect_error("SESSION_AUTH_DENIED")
    assert error["session_id"] == "1"
    assert node.held_keys() == []


# ---------------------------------------------------------------- sessions


@case("session-key-not-found")
async def _no_session(c: WsClient, node: RunningNode) -> None:
    _, session = init_frame(node.host_public_key, session_id="55")
    await c.send(session.message_frame({"prompt": "x"}, request_id="q"))
    error = await c.expect_error("SESSION_KEY_NOT_FOUND", request_id="q")
    assert error["session_id"] == "55"


@case("session-key-not-found-plaintext-session")
async def _plaintext_session_has_no_key(c: WsClient, node: RunningNode) -> None:
    await c.send({"type": "session_init", "session_id": "6"})
    await c.expect("session_init_ack")
    _, session = init_frame(node.host_public_key, session_id="6")
    await c.send(session.message_frame({"prompt": "x"}))
    await c.expect_error("SESSION_KEY_NOT_FOUND")


@case("missing-session-id")
async def _missing_session_id(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    frame = session.message_frame({"prompt": "x"})
    del frame["session_id"]
    await c.send(frame)
    await c.expect_error("MISSING_SESSION_ID")
    init = _init(node)
    del init["session_id"]
    await c.send(init)
    await c.expect_error("MISSING_SESSION_ID")


@case("session-expired", session_ttl_s=0.0)
async def _expired(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    await c.send(session.message_frame({"prompt": "x"}))
    await c.expect_error("SESSION_EXPIRED")
    assert node.held_keys() == []  # wiped when it expired, before it was used


# ------------------------------------------------------------------- modes


@case("encryption-not-supported", host_key=None)
async def _no_host_key(c: WsClient, node: RunningNode) -> None:
    frame, session = init_frame(PrivateKey().public_key.format())
    await c.send(frame)
    await c.expect_error("ENCRYPTION_NOT_SUPPORTED")
    await c.send(session.message_frame({"prompt": "x"}))
    await c.expect_error("ENCRYPTION_NOT_SUPPORTED")
    # Plaintext still works on this node.
    await c.send({"type": "prompt", "prompt": "plain"})
    assert (await c.collect(None)).text == "plain"


@case("encryption-required", require_encryption=True)
async def _encryption_required(c: WsClient, node: RunningNode) -> None:
    await c.send({"type": "prompt", "prompt": "x", "id": 1})
    await c.expect_error("ENCRYPTION_REQUIRED", request_id=1)
    await c.send({"type": "session_init", "session_id": "1"})
    await c.expect_error("ENCRYPTION_REQUIRED")
    _, session = await c.init(node.host_public_key)
    assert (await c.ask(session, "encrypted is fine")).text == "encrypted is fine"


@case("mixed-mode-rejected")
async def _mixed(c: WsClient, node: RunningNode) -> None:
    await c.init(node.host_public_key)
    await c.send({"type": "prompt", "prompt": "x"})
    await c.expect_error("MIXED_MODE_REJECTED")


@case("unsupported-action")
async def _unsupported_action(c: WsClient, node: RunningNode) -> None:
    _, session = await c.init(node.host_public_key)
    await c.send(session.message_frame({"action": "delete_everything", "prompt": "x"}))
    error = await c.expect_error("UNSUPPORTED_ACTION")
    assert "delete_everything" not in error["message"]  # decrypted text is never echoed


@case("rate-limited-inits")
async def _rate_limited(c: WsClient, node: RunningNode) -> None:
    # Pipelined: all twelve are read before the allowance can refill by a whole init.
    frames = [_init(node, session_id=str(i), request_id=i) for i in range(12)]
    for frame in frames:
        await c.send(frame)
    replies = [await c.recv() for _ in frames]
    assert [r["type"] for r in replies[:10]] == ["session_init_ack"] * 10
    assert [r["id"] for r in replies] == list(range(12))
    assert replies[11]["type"] == "error"
    assert replies[11]["code"] == "RATE_LIMITED"


# Two entries per accepted init: its (ephemeral key, nonce) and its session key.
@case("rate-limited-replay-cache-full", replay_max_entries=2)
async def _replay_cache_full(c: WsClient, node: RunningNode) -> None:
    await c.init(node.host_public_key, session_id="1")
    await c.send(_init(node, session_id="2"))
    await c.expect_error("RATE_LIMITED")


@pytest.mark.parametrize("name", sorted(CASES))
async def test_error_reply_keeps_the_connection_usable(
    node_factory: NodeFactory, name: str
) -> None:
    node_kw, run_case = CASES[name]
    node = await node_factory.start(**node_kw)
    with trio.fail_after(20):
        async with ws_client(node) as client:
            await run_case(client, node)
            await client.ping()
            await client.ping()


def test_every_protocol_error_code_is_exercised() -> None:
    """This file names every code of PROTOCOL.md section 6 in an expectation."""
    source = Path(__file__).read_text(encoding="utf-8")
    not_here = {"INTERNAL_ERROR"}  # the node maps backend crashes to INFERENCE_FAILED
    for code in ErrorCode:
        if code.value in not_here:
            continue
        assert f'"{code.value}"' in source, f"{code.value} is not tested over the wire"


async def test_storage_unavailable_refuses_without_closing(node_factory: NodeFactory) -> None:
    """A node that cannot record usage (``--on-ledger-failure refuse``) refuses new work
    with a code, charges no error budget and keeps the connection (more cases in
    test_storage_failures.py)."""
    node = await node_factory.start(on_ledger_failure="refuse")
    node.ctx.storage.failed("ledger")
    with trio.fail_after(20):
        async with ws_client(node) as c:
            for _ in range(node.ctx.config.max_errors + 1):
                await c.send(_init(node, session_id="5"))
                await c.expect_error("STORAGE_UNAVAILABLE")
            await c.ping()
            node.ctx.storage.recovered("ledger")
            await c.init(node.host_public_key, session_id="6")


async def test_allow_list_admits_only_listed_clients(node_factory: NodeFactory) -> None:
    listed = PrivateKey()
    node = await node_factory.start(
        allowed_clients=frozenset({address_of(listed.public_key).lower()})
    )
    with trio.fail_after(20):
        async with ws_client(node) as c:
            ack, session = await c.init(node.host_public_key, session_id="1", client_key=listed)
            assert ack["client_address"] == address_of(listed.public_key)
            await c.send(_init(node, session_id="2"))
            await c.expect_error("SESSION_AUTH_DENIED")
            assert (await c.ask(session, "allowed")).text == "allowed"
            assert len(node.held_keys()) == 1


# ------------------------------------------------------- errors from streaming


async def test_request_in_progress(node_factory: NodeFactory) -> None:
    backend = GatedBackend()
    node = await node_factory.start(backend=backend)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            _, session = await c.init(node.host_public_key)
            await c.send(session.message_frame({"prompt": "x"}, request_id="r1"))
            first = await c.expect("encrypted_chunk")
            assert first["id"] == "r1"
            await backend.streaming.wait()
            # While it streams: other requests are refused, ping is answered.
            await c.send(session.message_frame({"prompt": "y"}, request_id="r2"))
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="r2")
            await c.send({"type": "prompt", "prompt": "z", "id": "r3"})
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="r3")
            await c.send(_init(node, session_id="2", request_id="r4"))
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="r4")
            await c.ping()
            backend.release.set()
            # The rest of r1 arrives intact (chunk 0 was consumed above).
            rest = await c.collect(session, request_id="r1", skip_chunks=1)
            assert rest.text == " second"
            assert rest.final_reason == "stop"
            assert rest.end["tokens_used"] == 2
            assert not backend.cancelled.is_set()
            await c.ping()


async def test_token_limit_exceeded(node_factory: NodeFactory) -> None:
    node = await node_factory.start(backend=EchoBackend(context_window=4))
    with trio.fail_after(20):
        async with ws_client(node) as c:
            _, session = await c.init(node.host_public_key)
            result = await c.ask(session, "one two three four five", request_id="t")
            (error,) = result.errors
            assert error["code"] == "TOKEN_LIMIT_EXCEEDED"
            assert error["id"] == "t"
            assert error["prompt_tokens"] == 5
            assert error["context_window_size"] == 4
            assert result.text == ""
            assert result.final_reason == "error"
            assert result.end["reason"] == "error"
            assert result.end["tokens_used"] == 0
            await c.ping()
            assert (await c.ask(session, "short one")).text == "short one"


async def test_inference_failed_after_streaming_began(node_factory: NodeFactory) -> None:
    # max_errors=1: a node-side failure must not count against the client's budget.
    node = await node_factory.start(backend=EchoBackend(fail_after_pieces=2), max_errors=1)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            _, session = await c.init(node.host_public_key)
            await c.send(session.message_frame({"prompt": "a b c d e"}, request_id="f"))
            frames = []
            for _ in range(50):
                frames.append(await c.recv())
                if frames[-1]["type"] == "stream_end":
                    break
            kinds = [f["type"] for f in frames]
            error_at = kinds.index("error")
            assert frames[error_at]["code"] == "INFERENCE_FAILED"
            assert "encrypted_chunk" in kinds[:error_at]  # streaming had begun
            assert kinds[-1] == "stream_end"
            assert error_at < kinds.index("encrypted_response")
            assert frames[-1]["reason"] == "error"
            assert frames[-1]["finish_reason"] == "error"
            assert frames[-1]["tokens_used"] == 2
            await c.ping()
            # Same for plaintext... on a fresh connection.
        async with ws_client(node) as p:
            await p.send({"type": "prompt", "prompt": "a b c d e"})
            result = await p.collect(None)
            assert result.text == "a b"
            assert [e["code"] for e in result.errors] == ["INFERENCE_FAILED"]
            assert result.end["reason"] == "error"
            await p.ping()


class PickyBackend(EchoBackend):
    """Echo that serves only the model "echo" and fails on the prompt "explode"."""

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        if request.model not in (None, "echo"):
            raise ModelNotFound(["echo"])
        if request.prompt == "explode":
            raise RuntimeError("internal detail that must not reach the client")
        return await super().generate(request, emit)


async def test_model_not_found_and_unexpected_backend_errors(node_factory: NodeFactory) -> None:
    node = await node_factory.start(backend=PickyBackend())
    with trio.fail_after(20):
        async with ws_client(node) as c:
            _, session = await c.init(node.host_public_key)
            result = await c.ask(session, {"prompt": "hi", "model": "gpt-9"}, request_id="m")
            assert [e["code"] for e in result.errors] == ["MODEL_NOT_FOUND"]
            assert "echo" in result.errors[0]["message"]
            assert result.end["reason"] == "error"
            await c.ping()
            # An unexpected exception in the backend is INFERENCE_FAILED without its text.
            result = await c.ask(session, "explode")
            assert [e["code"] for e in result.errors] == ["INFERENCE_FAILED"]
            assert "internal detail" not in json.dumps(result.errors)
            assert result.final_reason == "error"
            await c.ping()
            assert (await c.ask(session, {"prompt": "fine", "model": "echo"})).text == "fine"


# ------------------------------------------------------------------ closing


async def test_error_budget_closes_with_1008(node_factory: NodeFactory) -> None:
    node = await node_factory.start(max_errors=4)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            for _ in range(3):
                await c.send("garbage")
                await c.expect_error("INVALID_MESSAGE")
            await c.ping()
            await c.send("garbage")
            code, frames = await c.wait_closed()
            assert code == 1008
            assert [f["code"] for f in frames] == ["INVALID_MESSAGE"]
    await node.wait_no_connections()


async def test_error_budget_close_wipes_keys(node_factory: NodeFactory) -> None:
    node = await node_factory.start(max_errors=2)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            await c.init(node.host_public_key)
            keys = node.held_keys()
            assert len(keys) == 1
            assert not keys[0].is_all_zero()
            await c.send("garbage")
            await c.send("garbage")
            code, _ = await c.wait_closed()
            assert code == 1008
        await node.wait_no_connections()
        assert keys[0].is_all_zero()


async def test_oversized_frame_closes_with_1009(node_factory: NodeFactory) -> None:
    node = await node_factory.start(max_frame_bytes=1024)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            # Just under the limit is fine ...
            await c.send({"type": "prompt", "prompt": "x" * 900})
            assert (await c.collect(None)).text == "x" * 900
            # ... one frame above it closes the connection.
            await c.send({"type": "prompt", "prompt": "x" * 2000})
            code, frames = await c.wait_closed()
            assert code == 1009
            assert frames == []
    await node.wait_no_connections()


async def test_the_node_never_sends_a_frame_above_its_own_limit(
    node_factory: NodeFactory,
) -> None:
    node = await node_factory.start(max_frame_bytes=2048)
    with trio.fail_after(20):
        async with ws_client(node) as c:
            prompt = "\U0001f999" * 300
            frame = json.dumps({"type": "prompt", "prompt": prompt}, ensure_ascii=False)
            assert len(frame) < 2048
            await c.send(frame)
            sizes = []
            for _ in range(100):
                text = await c.ws.get_message()
                sizes.append(len(text))
                if json.loads(text)["type"] == "stream_end":
                    break
            assert max(sizes) <= 2048, sizes
