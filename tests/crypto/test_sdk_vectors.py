"""Every SDK-produced session init and message opens to exactly what the SDK recorded."""

from __future__ import annotations

from typing import Any

import pytest

from node.crypto import HostKey, aead, open_session_init, parse_init_payload
from node.crypto.encoding import decode_hex
from tests.conftest import load_vector

INIT = load_vector("sdk/session_init_dev.json")
N2C = load_vector("sdk/node_to_client_dev.json")


@pytest.mark.parametrize("case", INIT["cases"], ids=[c["id"] for c in INIT["cases"]])
def test_session_init_case_opens_to_expected_data(case: dict[str, Any]) -> None:
    host = HostKey.parse(case["host_private_key_hex"])
    assert host.public_key_hex == case["host_public_key_hex"]
    data = open_session_init(host, parse_init_payload(case["message"]["payload"]))
    expected = case["expected"]
    assert data.session_key.reveal().hex() == expected["session_key_hex"]
    assert data.job_id == int(expected["job_id_u64"])
    assert data.model_name == expected["model_name"]
    assert data.price_per_token == int(expected["price_per_token"])
    assert data.client_address == expected["client_address_eip55"]
    assert data.client_address != expected["rust_node_client_address"]
    assert data.vector_database == expected["vector_database"]
    recovery = expected["recovery_public_key"]
    assert data.recovery_public_key == (decode_hex(recovery, "r") if recovery else None)
    for message in case["messages"]:
        payload = message["message"]["payload"]
        plaintext = aead.open(
            data.session_key,
            decode_hex(payload["nonceHex"], "n"),
            decode_hex(payload["ciphertextHex"], "c"),
            decode_hex(payload["aadHex"], "a"),
        )
        assert plaintext.decode("utf-8") == message["expected_plaintext"]
    data.session_key.wipe()
    assert data.session_key.is_all_zero()


@pytest.mark.parametrize("example", N2C["examples"], ids=[e["id"] for e in N2C["examples"]])
def test_recorded_node_chunks_open_and_our_seal_round_trips(example: dict[str, Any]) -> None:
    key = bytes.fromhex(example["session_key_hex"])
    for item in example["frames"]:
        frame = item["frame"]
        if "payload" not in frame:
            continue
        payload = frame["payload"]
        aad = decode_hex(payload["aadHex"], "a")
        assert aad.decode() == item["aad_ascii"]
        opened = aead.open(
            key,
            decode_hex(payload["nonceHex"], "n"),
            decode_hex(payload["ciphertextHex"], "c"),
            aad,
        )
        assert opened.decode("utf-8") == item["expected_plaintext"]
        nonce = bytes(range(24))
        ours = aead.seal(key, nonce, opened, aad)
        assert aead.open(key, nonce, ours, aad) == opened
