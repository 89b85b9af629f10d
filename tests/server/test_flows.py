"""Whole request flows over a real WebSocket on 127.0.0.1: encrypted, SDK replay, plaintext."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
from coincurve import PrivateKey, PublicKey

from node.crypto import aead
from node.crypto.curve import address_of, to_checksum_address
from node.inference.text import split_word_pieces
from tests.conftest import load_vector
from tests.server._support import (
    DEV_HOST_PUBLIC_HEX,
    ClientSession,
    RunningNode,
    init_frame,
    url_client,
    ws_client,
)

PROMPT = "The quick brown fox jumps over the lazy dog, twice:  again and again."


async def test_encrypted_flow_end_to_end(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_key = PrivateKey()
    with trio.fail_after(20):
        async with url_client(node) as client:
            ack, session = await client.init(
                node.host_public_key,
                session_id="42",
                job_id=4242,
                client_key=client_key,
                request_id="init-1",
                chain_id=8453,
            )
            expected_address = address_of(client_key.public_key)
            assert expected_address == to_checksum_address(bytes.fromhex(expected_address[2:]))
            assert expected_address != expected_address.lower()  # really mixed case
            assert ack == {
                "type": "session_init_ack",
                "status": "success",
                "session_id": "42",
                "job_id": 4242,
                "chain_id": 8453,
                "client_address": expected_address,
                "message": ack["message"],
                "id": "init-1",
            }
            request = {"prompt": PROMPT, "model": "echo", "max_tokens": 500, "stream": True}
            result = await client.ask(session, request, request_id="req-1")
            assert result.text == PROMPT
            assert result.errors == []
            assert result.other == []
            assert result.final_reason == "stop"
            n = len(split_word_pieces(PROMPT))
            assert sum(result.tokens) == n
            assert all(t >= 1 for t in result.tokens)
            assert result.end == {
                "type": "stream_end",
                "reason": "complete",
                "tokens_used": n,
                "finish_reason": "stop",
                "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n},
                "id": "req-1",
                "session_id": "42",
            }
            # A second request on the same session continues at message_1.
            again = await client.ask(session, "second prompt", request_id=7)
            assert again.text == "second prompt"
            assert again.end["id"] == 7
            assert session.next_index == 2

            key_hex = session.key.hex()
    # Nothing secret reached the logs: not the session key, not a prompt, not an answer.
    for record in caplog.records:
        text = record.getMessage() + " " + json.dumps(record.__dict__, default=str)
        assert key_hex not in text
        assert "quick brown fox" not in text
        assert "second prompt" not in text
    await node.wait_no_connections()
    (session_row,) = node.accounting.started
    assert session_row.client_address == expected_address
    assert [r.finish_reason for _, _, r in node.accounting.finished] == ["stop", "stop"]


async def test_a_session_works_with_an_uncompressed_host_key_and_camelcase(
    node: RunningNode,
) -> None:
    """The client may use the 65-byte host key and camelCase envelope keys."""
    uncompressed = PublicKey(node.host_public_key).format(compressed=False)
    async with ws_client(node) as client:
        frame, session = init_frame(uncompressed, session_id="9")
        frame["sessionId"] = frame.pop("session_id")
        frame["jobId"] = frame.pop("job_id")
        await client.send(frame)
        ack = await client.expect("session_init_ack")
        assert ack["session_id"] == "9"
        assert ack["job_id"] == 9
        result = await client.ask(session, "hello")
        assert result.text == "hello"


def _expected_echo(request: dict[str, Any]) -> tuple[str, str]:
    pieces = split_word_pieces(request["prompt"])
    limit = request.get("max_tokens")
    if limit is not None and limit < len(pieces):
        return "".join(pieces[:limit]), "length"
    return request["prompt"], "stop"


_SDK = load_vector("sdk/session_init_dev.json")


@pytest.mark.parametrize("case", _SDK["cases"], ids=[c["id"] for c in _SDK["cases"]])
async def test_sdk_recorded_frames_replayed_over_the_wire(
    node: RunningNode, case: dict[str, Any]
) -> None:
    assert node.ctx.host_key is not None
    assert node.ctx.host_key.public_key_hex == DEV_HOST_PUBLIC_HEX == case["host_public_key_hex"]
    expected = case["expected"]
    key = bytes.fromhex(expected["session_key_hex"])
    with trio.fail_after(20):
        async with ws_client(node) as client:
            await client.send(case["wire_text"])  # the exact bytes the SDK sent
            ack = await client.expect("session_init_ack")
            assert ack["client_address"] == expected["client_address_eip55"]
            assert ack["client_address"] != expected["rust_node_client_address"]
            assert ack["session_id"] == expected["session_id"]
            assert ack["job_id"] == int(expected["job_id_u64"])
            assert ack["chain_id"] == expected["chain_id"]
            assert ack["status"] == "success"
            for k in ("type", "status", "session_id", "chain_id", "message"):
                assert ack[k] == expected["ack"][k], k
            session = ClientSession(expected["session_id"], key, PrivateKey())
            for message in case["messages"]:
                await client.send(message["wire_text"])
                result = await client.collect(session, request_id=message["message"]["id"])
                text, finish = _expected_echo(message["expected_request"])
                assert result.text == text
                assert result.final_reason == finish
                assert result.end["finish_reason"] == finish
                assert result.end["reason"] == "complete"
                assert result.errors == []
            # Replaying the recorded init on a new connection is refused (replay cache).
        async with ws_client(node) as again:
            await again.send(case["wire_text"])
            await again.expect_error("REPLAY_DETECTED")
            await again.ping()


async def test_plaintext_flow(node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node.server")
    async with ws_client(node) as client:
        await client.send({"type": "session_init", "session_id": "5", "job_id": "5", "id": 1})
        ack = await client.expect("session_init_ack")
        assert "client_address" not in ack
        assert (ack["session_id"], ack["job_id"], ack["id"]) == ("5", 5, 1)
        await client.send({"type": "prompt", "prompt": "hello big  world", "id": "p1"})
        result = await client.collect(None, request_id="p1")
        assert result.text == "hello big  world"  # pieces may be coalesced
        assert sum(result.tokens) == 3
        assert result.end["reason"] == "complete"
        assert result.end["tokens_used"] == 3
        assert result.end["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 3,
            "total_tokens": 6,
        }
        # The nested request form ("inference" with a request object) works too.
        await client.send(
            {
                "type": "inference",
                "request": {"model": "whatever", "prompt": "a b c d", "max_tokens": 2},
                "id": "p2",
            }
        )
        result = await client.collect(None, request_id="p2")
        assert result.text == "a b"
        assert result.end["finish_reason"] == "length"
    deprecations = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(deprecations) == 1  # once per connection


async def test_upgrade_plaintext_to_encrypted_then_no_downgrade(node: RunningNode) -> None:
    async with ws_client(node) as client:
        await client.send({"type": "prompt", "prompt": "plain words"})
        assert (await client.collect(None)).text == "plain words"
        ack, session = await client.init(node.host_public_key, session_id="3")
        assert ack["client_address"] == session.client_address
        result = await client.ask(session, "now encrypted")
        assert result.text == "now encrypted"
        assert result.final_reason == "stop"
        await client.send({"type": "prompt", "prompt": "plain again", "id": "x"})
        await client.expect_error("MIXED_MODE_REJECTED", request_id="x")
        await client.send({"type": "session_init", "session_id": "4"})
        await client.expect_error("MIXED_MODE_REJECTED")
        await client.ping()
        # The encrypted session is unaffected by the refusals.
        assert (await client.ask(session, "still fine")).text == "still fine"


async def test_reinit_replaces_the_key_and_restarts_the_counter(node: RunningNode) -> None:
    async with ws_client(node) as client:
        _, first = await client.init(node.host_public_key, session_id="8")
        assert (await client.ask(first, "one")).text == "one"
        old_key = node.held_keys()[0]
        _, second = await client.init(node.host_public_key, session_id="8")
        assert old_key.wiped
        assert old_key.is_all_zero()
        assert len(node.held_keys()) == 1
        # message_0 is accepted again under the new key ...
        assert (await client.ask(second, "two")).text == "two"
        # ... and a message under the old key no longer decrypts.
        await client.send(first.message_frame({"prompt": "old"}, index=5))
        await client.expect_error("DECRYPTION_FAILED")


async def test_session_ids_are_per_connection(node: RunningNode) -> None:
    """A session id learned on one connection never works on another."""
    async with ws_client(node) as a, ws_client(node) as b:
        _, session = await a.init(node.host_public_key, session_id="77")
        await b.send(session.message_frame({"prompt": "steal"}, index=0))
        await b.expect_error("SESSION_KEY_NOT_FOUND")
        # The rightful owner is untouched and message_0 was not consumed.
        session.next_index = 0
        assert (await a.ask(session, "mine")).text == "mine"


async def test_chunks_are_sealed_under_fresh_nonces(node: RunningNode) -> None:
    async with ws_client(node) as client:
        _, session = await client.init(node.host_public_key)
        words = " ".join(f"w{i}" for i in range(40))
        await client.send(session.message_frame({"prompt": words}))
        nonces: list[str] = []
        for _ in range(100):
            m = await client.recv()
            if m["type"] in ("encrypted_chunk", "encrypted_response"):
                nonces.append(m["payload"]["nonceHex"])
                p = m["payload"]
                # Tampering with any frame is detected by the client.
                with pytest.raises(Exception, match="decryption failed"):
                    aead.open(
                        bytes(32),
                        bytes.fromhex(p["nonceHex"]),
                        bytes.fromhex(p["ciphertextHex"]),
                        bytes.fromhex(p["aadHex"]),
                    )
            if m["type"] == "stream_end":
                break
        assert len(nonces) >= 3
        assert len(set(nonces)) == len(nonces)
