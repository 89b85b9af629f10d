"""The client's outgoing frames have the SDK's shape, byte for byte where bytes are fixed.

``sdk/session_init_dev.json`` holds frames the TypeScript SDK sent. Our serializer must
reproduce those texts exactly from their fields, and a real session run with each case's
parameters (its client key, host key, ids, model, prompts) must send frames with the same
keys in the same order, which the node's own decoder and ``open_session_init`` accept with
the session data and client address the SDK case expects.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from coincurve import PrivateKey

from node.client import frames, open_session
from node.crypto import HostKey, SecretBytes, aead, derive_shared_key, open_session_init
from node.protocol.messages import EncryptedMessage, EncryptedSessionInit, decode
from tests.conftest import load_vector

from ._hostile import HostileNode, honest, serve_hostile
from .conftest import GUARD_S

CASES = load_vector("sdk/session_init_dev.json")["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_serializer_reproduces_the_sdk_texts(case: dict[str, Any]) -> None:
    message = case["message"]
    assert frames.dumps(message) == case["wire_text"]
    rebuilt = frames.encrypted_session_init_frame(
        message["payload"],
        session_id=message["session_id"],
        job_id=message["job_id"],
        chain_id=message["chain_id"],
    )
    assert rebuilt == case["wire_text"]
    for item in case["messages"]:
        sent = item["message"]
        payload = sent["payload"]
        rebuilt = frames.encrypted_message_frame(
            session_id=sent["session_id"],
            request_id=sent["id"],
            ciphertext=bytes.fromhex(payload["ciphertextHex"]),
            nonce=bytes.fromhex(payload["nonceHex"]),
            aad=bytes.fromhex(payload["aadHex"]),
            web_search=sent["web_search"],
            max_searches=sent["max_searches"],
            search_queries=sent["search_queries"],
        )
        assert rebuilt == item["wire_text"]
        assert frames.dumps(item["expected_request"]) == item["expected_plaintext"]


def _types(obj: dict[str, Any]) -> list[tuple[str, type]]:
    return [(k, type(v)) for k, v in obj.items()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
async def test_session_frames_match_the_sdk(case: dict[str, Any]) -> None:
    expected = case["expected"]
    host_key = HostKey.parse(case["host_private_key_hex"])
    client_key = PrivateKey(bytes.fromhex(case["client"]["private_key_hex"][2:]))
    sdk_init = case["message"]
    requests = [
        m["expected_request"]
        for m in case["messages"]
        if "search_queries" not in m["expected_request"]
    ]
    node = HostileNode(honest, host_key=host_key)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url,
                host_public_key=case["host_public_key_hex"],
                client_key=client_key,
                model=expected["model_name"],
                job_id=sdk_init["job_id"],
                session_id=sdk_init["session_id"],
                price_per_token=expected["price_per_token"],
            ) as session,
        ):
            for request in requests:
                completion = await session.complete(
                    request["prompt"],
                    max_tokens=request["max_tokens"],
                    temperature=request["temperature"],
                )
                assert completion.text == request["prompt"]
            assert session.client_address == expected["client_address_eip55"]

    init_text, *message_texts = node.received
    assert len(message_texts) == len(requests)

    # The init envelope: the SDK's keys, in its order, with values of the same types.
    ours = json.loads(init_text)
    assert _types(ours) == _types(sdk_init)
    assert _types(ours["payload"]) == _types(sdk_init["payload"])
    for field in ("type", "chain_id", "session_id", "job_id"):
        assert ours[field] == sdk_init[field]
    for field in ("saltHex", "alg", "info", "aadHex"):
        assert ours["payload"][field] == sdk_init["payload"][field]
    for field in ("ephPubHex", "nonceHex", "signatureHex"):
        assert len(ours["payload"][field]) == len(sdk_init["payload"][field])
    assert ours["payload"]["recid"] in (0, 1)
    assert ours["payload"]["recid"] == int(ours["payload"]["signatureHex"][-2:], 16)

    # The node's decoder and init opener accept it, with the SDK case's session data.
    decoded = decode(init_text)
    assert isinstance(decoded, EncryptedSessionInit)
    assert decoded.session_id == expected["session_id"]
    assert decoded.job_id == int(expected["job_id"])
    assert decoded.chain_id == expected["chain_id"]
    data = open_session_init(host_key, decoded.payload)
    assert data.job_id == int(expected["job_id"])
    assert data.model_name == expected["model_name"]
    assert data.price_per_token == int(expected["price_per_token"])
    assert data.client_address == expected["client_address_eip55"]
    assert data.recovery_public_key == bytes.fromhex(expected["recovery_public_key"][2:])
    assert data.session_key.equals(node.session_keys[0])

    # The sealed session JSON has the SDK's keys in the SDK's order.
    payload = decoded.payload
    with derive_shared_key(payload.ephemeral_public, host_key) as init_key:
        session_json = json.loads(aead.open(init_key, payload.nonce, payload.ciphertext, b""))
    sdk_session = json.loads(expected["session_init_plaintext"])
    sdk_session.pop("vectorDatabase", None)  # the client sends none
    assert list(session_json) == list(sdk_session)
    assert session_json["jobId"] == sdk_session["jobId"]
    assert session_json["recoveryPublicKey"] == sdk_session["recoveryPublicKey"]

    # Each prompt: the SDK's envelope keys and AAD message_<k>; the sealed request is the
    # SDK's plaintext byte for byte.
    sdk_message = next(m["message"] for m in case["messages"] if not m["web_search_intent"])
    key = SecretBytes(node.session_keys[0])
    plaintexts = [
        m["expected_plaintext"]
        for m in case["messages"]
        if "search_queries" not in m["expected_request"]
    ]
    for k, (text, sdk_plaintext) in enumerate(zip(message_texts, plaintexts, strict=True)):
        sent = json.loads(text)
        assert _types(sent) == _types(sdk_message)
        assert list(sent["payload"]) == list(sdk_message["payload"])
        assert sent["session_id"] == sdk_message["session_id"]
        message = decode(text)
        assert isinstance(message, EncryptedMessage)
        assert message.payload.aad == b"message_%d" % k
        plaintext = aead.open(
            key, message.payload.nonce, message.payload.ciphertext, b"message_%d" % k
        )
        assert plaintext.decode("utf-8") == sdk_plaintext


async def test_each_session_gets_a_fresh_key_and_ephemeral_key() -> None:
    node = HostileNode(honest)
    with trio.fail_after(GUARD_S):
        async with serve_hostile(node) as url:
            for job in (1, 2):
                async with open_session(
                    url, host_public_key=node.host_key.public_key, model="m", job_id=job
                ) as session:
                    await session.complete("x")
    inits = [json.loads(t) for t in node.received if '"encrypted_session_init"' in t]
    assert len(inits) == 2
    assert inits[0]["payload"]["ephPubHex"] != inits[1]["payload"]["ephPubHex"]
    assert inits[0]["payload"]["nonceHex"] != inits[1]["payload"]["nonceHex"]
    assert node.session_keys[0] != node.session_keys[1]
    assert len(node.session_keys[0]) == 32
