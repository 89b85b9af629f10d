"""Whole encrypted exchanges through decode -> ConnectionState -> encode, as a client sees them."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from coincurve import PrivateKey

from node.crypto import HostKey, aead, seal_session_init
from node.crypto.curve import address_of
from node.protocol import (
    ConnectionState,
    InitReplayCache,
    SessionStarted,
    StartRequest,
    decode,
    encode,
)
from node.protocol.messages import SessionInitAck
from tests.conftest import load_vector
from tests.protocol._support import Clock, kinds, sends

SDK = load_vector("sdk/session_init_dev.json")


class Client:
    """The client side, built only from the crypto core's client helpers."""

    def __init__(self, host_public: bytes) -> None:
        self.key = PrivateKey(os.urandom(32))
        self.session_key = os.urandom(32)
        self.host_public = host_public
        self.sent = 0

    def init_text(self, session_id: str, job_id: int) -> str:
        payload = seal_session_init(
            self.host_public, self.key, self.session_key, job_id=job_id, model_name="m"
        )
        return json.dumps(
            {
                "type": "encrypted_session_init",
                "session_id": session_id,
                "jobId": str(job_id),
                "chainId": 84532,
                "payload": payload,
                "id": "init",
            }
        )

    def message_text(self, session_id: str, request: dict[str, Any], request_id: str) -> str:
        nonce = os.urandom(24)
        aad = b"message_%d" % self.sent
        self.sent += 1
        sealed = aead.seal(self.session_key, nonce, json.dumps(request).encode(), aad)
        return json.dumps(
            {
                "type": "encrypted_message",
                "session_id": session_id,
                "id": request_id,
                "payload": {
                    "ciphertextHex": sealed.hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": aad.hex(),
                },
            }
        )

    def open(self, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        aad = bytes.fromhex(payload["aadHex"])
        plain = aead.open(
            self.session_key,
            bytes.fromhex(payload["nonceHex"]),
            bytes.fromhex(payload["ciphertextHex"]),
            aad,
        )
        return aad, plain


def test_full_encrypted_exchange() -> None:
    host = HostKey.generate()
    clock = Clock()
    conn = ConnectionState(
        host_key=host, replay_cache=InitReplayCache(window_s=900, clock=clock), clock=clock
    )
    client = Client(host.public_key)

    actions = conn.receive(decode(client.init_text("5", 5)))
    assert kinds(actions) == ["SessionStarted", "Send"]
    ack = json.loads(encode(sends(actions)[0]))
    assert ack == {
        "type": "session_init_ack",
        "status": "success",
        "session_id": "5",
        "job_id": 5,
        "chain_id": 84532,
        "client_address": address_of(client.key.public_key),
        "message": "Encrypted session initialized successfully",
        "id": "init",
    }

    for turn, pieces in enumerate([["The", " answer", " is", " 4."], ["Yes."]]):
        request = {"prompt": f"question {turn}", "max_tokens": 16, "temperature": 0.1}
        actions = conn.receive(decode(client.message_text("5", request, f"req-{turn}")))
        assert kinds(actions) == ["StartRequest"]
        start = actions[0]
        assert isinstance(start, StartRequest)
        assert start.request_id == f"req-{turn}"
        assert (start.request.prompt, start.request.max_tokens) == (f"question {turn}", 16)
        assert start.session.session_id == "5"

        outbound = [conn.piece(p, 1) for p in pieces]
        outbound += conn.finish("stop", prompt_tokens=3)
        received = [json.loads(encode(m)) for m in outbound]

        text = []
        for i, chunk in enumerate(received[: len(pieces)]):
            assert chunk["type"] == "encrypted_chunk"
            assert chunk["id"] == f"req-{turn}"
            aad, plain = client.open(chunk["payload"])
            assert aad == b"chunk_%d" % i
            text.append(plain.decode("utf-8"))
        assert "".join(text) == "".join(pieces)

        final, response, end = received[len(pieces) :]
        assert final["final"] is True
        assert final["tokens"] == 0
        assert client.open(final["payload"]) == (b"chunk_%d" % len(pieces), b"")
        assert client.open(response["payload"]) == (b"encrypted_response_final", b"stop")
        assert end["type"] == "stream_end"
        assert end["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": len(pieces),
            "total_tokens": 3 + len(pieces),
        }
        assert end["tokens_used"] == len(pieces)
        nonces = [m["payload"]["nonceHex"] for m in received if "payload" in m]
        assert len(set(nonces)) == len(nonces)

    ended = conn.close()
    assert [e.session.session_id for e in ended] == ["5"]
    key = ended[0].session.key
    assert key is not None
    assert key.is_all_zero()


@pytest.mark.parametrize("case", SDK["cases"], ids=[c["id"] for c in SDK["cases"]])
def test_sdk_recorded_session_through_the_state_machine(case: dict[str, Any]) -> None:
    host = HostKey.parse(case["host_private_key_hex"])
    clock = Clock()
    conn = ConnectionState(
        host_key=host, replay_cache=InitReplayCache(window_s=900, clock=clock), clock=clock
    )
    expected = case["expected"]
    actions = conn.receive(decode(case["wire_text"]))
    assert kinds(actions) == ["SessionStarted", "Send"]
    started = actions[0]
    assert isinstance(started, SessionStarted)
    ack = sends(actions)[0]
    assert isinstance(ack, SessionInitAck)
    assert ack.session_id == expected["session_id"]
    assert ack.job_id == int(expected["job_id_u64"])
    assert ack.chain_id == expected["chain_id"]
    assert ack.client_address == expected["client_address_eip55"]
    assert str(ack.client_address).lower() != expected["rust_node_client_address"]
    session = started.session
    assert session.key is not None
    assert session.key.reveal().hex() == expected["session_key_hex"]
    assert session.model_name == expected["model_name"]
    assert session.vector_database == expected["vector_database"]

    for k, item in enumerate(case["messages"]):
        actions = conn.receive(decode(item["wire_text"]))
        assert kinds(actions) == ["StartRequest"]
        start = actions[0]
        assert isinstance(start, StartRequest)
        want = item["expected_request"]
        assert start.request.prompt == want["prompt"]
        assert start.request.model == want["model"]
        assert start.request.max_tokens == want["max_tokens"]
        assert start.request.temperature == want["temperature"]
        assert session.next_index == k + 1
        conn.finish("stop", prompt_tokens=1)

    replay = conn.receive(decode(case["messages"][0]["wire_text"]))
    assert [m.code for m in sends(replay)] == ["REPLAY_DETECTED"]
    other = ConnectionState(
        host_key=host, replay_cache=InitReplayCache(window_s=900, clock=clock), clock=clock
    )
    assert [m.code for m in sends(other.receive(decode(item["wire_text"])))] == [
        "SESSION_KEY_NOT_FOUND"
    ]
    conn.close()
    assert session.key.is_all_zero()
