"""Shape of every wire message: decoding each inbound type, encoding each outbound type."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.crypto.errors import ErrorCode
from node.crypto.kdf import ZERO_SALT
from node.protocol import ProtocolError, decode, encode
from node.protocol.messages import (
    DEFAULT_CHAIN_ID,
    ChunkPayload,
    Connected,
    EncryptedChunk,
    EncryptedMessage,
    EncryptedResponse,
    EncryptedSessionInit,
    ErrorMessage,
    Ping,
    Pong,
    PromptRequest,
    SessionInit,
    SessionInitAck,
    StreamCancel,
    StreamChunk,
    StreamEnd,
    Usage,
    request_id_of,
)
from tests.conftest import load_vector
from tests.protocol._support import init_payload

SDK = load_vector("sdk/session_init_dev.json")
PAYLOAD = init_payload(bytes(range(32)))


def test_ping_with_and_without_id() -> None:
    assert decode('{"type":"ping"}') == Ping(None)
    assert decode('{"type":"ping","id":"p-1"}') == Ping("p-1")
    assert decode('{"type":"ping","id":7}') == Ping(7)
    assert decode(b'{"type":"ping","id":7}') == Ping(7)


@pytest.mark.parametrize(
    "envelope",
    [
        {"session_id": "42", "job_id": "43", "chain_id": 8453},
        {"sessionId": "42", "jobId": "43", "chainId": 8453},
        {"session_id": 42, "job_id": 43, "chain_id": 8453},
        {"session_id": "42", "jobId": "43n", "chainId": 8453},
    ],
    ids=["snake", "camel", "integers", "bigint-suffix"],
)
def test_encrypted_session_init_envelope_spellings(envelope: dict[str, Any]) -> None:
    msg = decode(
        json.dumps({"type": "encrypted_session_init", "id": "x", "payload": PAYLOAD, **envelope})
    )
    assert isinstance(msg, EncryptedSessionInit)
    assert (msg.session_id, msg.job_id, msg.chain_id, msg.id) == ("42", 43, 8453, "x")
    p = msg.payload
    assert p.ephemeral_public.hex() == PAYLOAD["ephPubHex"]
    assert p.ciphertext.hex() == PAYLOAD["ciphertextHex"]
    assert p.nonce.hex() == PAYLOAD["nonceHex"]
    assert p.signature.hex() == PAYLOAD["signatureHex"]
    assert (p.aad, p.salt, p.info) == (b"", ZERO_SALT, b"")


def test_encrypted_session_init_defaults() -> None:
    msg = decode(
        json.dumps({"type": "encrypted_session_init", "session_id": "5", "payload": PAYLOAD})
    )
    assert isinstance(msg, EncryptedSessionInit)
    assert msg.chain_id == DEFAULT_CHAIN_ID == 84532
    assert msg.job_id is None
    assert msg.id is None


def test_encrypted_session_init_accepts_0x_and_uppercase_hex() -> None:
    payload = dict(PAYLOAD)
    payload["nonceHex"] = "0x" + PAYLOAD["nonceHex"].upper()
    payload["ephPubHex"] = "0X" + PAYLOAD["ephPubHex"]
    msg = decode(
        json.dumps({"type": "encrypted_session_init", "session_id": "5", "payload": payload})
    )
    assert isinstance(msg, EncryptedSessionInit)
    assert msg.payload.nonce.hex() == PAYLOAD["nonceHex"]
    assert msg.payload.ephemeral_public.hex() == PAYLOAD["ephPubHex"]


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        ({"session_id": "9", "job_id": "9"}, ("9", 9, DEFAULT_CHAIN_ID)),
        ({"jobId": 11, "chainId": 1}, ("11", 11, 1)),  # session id defaults to the job id
        ({"sessionId": "3"}, ("3", None, DEFAULT_CHAIN_ID)),
    ],
)
def test_plaintext_session_init(envelope: dict[str, Any], expected: tuple[Any, ...]) -> None:
    msg = decode(json.dumps({"type": "session_init", "id": 5, **envelope}))
    assert isinstance(msg, SessionInit)
    assert (msg.session_id, msg.job_id, msg.chain_id) == expected
    assert msg.id == 5


def test_encrypted_message_fields_and_aad_index() -> None:
    for k in (0, 1, 2, 10, 123456789):
        aad = b"message_%d" % k
        msg = decode(
            json.dumps(
                {
                    "type": "encrypted_message",
                    "sessionId": "77",
                    "id": "m",
                    "payload": {
                        "ciphertextHex": "ab" * 20,
                        "nonceHex": "0x" + "CD" * 24,
                        "aadHex": aad.hex(),
                    },
                }
            )
        )
        assert isinstance(msg, EncryptedMessage)
        assert (msg.session_id, msg.id) == ("77", "m")
        assert msg.payload.ciphertext == b"\xab" * 20
        assert msg.payload.nonce == b"\xcd" * 24
        assert msg.payload.aad == aad
        assert msg.payload.index == k


@pytest.mark.parametrize("kind", ["prompt", "inference"])
def test_plaintext_prompt_top_level_and_nested(kind: str) -> None:
    msg = decode(json.dumps({"type": kind, "prompt": "hi", "id": "r1", "session_id": "4"}))
    assert msg == PromptRequest(prompt="hi", session_id="4", id="r1")
    nested = decode(
        json.dumps(
            {
                "type": kind,
                "request": {
                    "model": "m",
                    "prompt": "inner",
                    "max_tokens": 5,
                    "temperature": 0,
                    "stream": False,
                },
                "id": 3,
            }
        )
    )
    assert nested == PromptRequest(
        prompt="inner", model="m", max_tokens=5, temperature=0.0, stream=False, id=3
    )
    # The top-level prompt wins over request.prompt; request fields win over top-level ones.
    both = decode(
        json.dumps(
            {
                "type": kind,
                "prompt": "top",
                "max_tokens": 1,
                "request": {"prompt": "x", "max_tokens": 2},
            }
        )
    )
    assert isinstance(both, PromptRequest)
    assert (both.prompt, both.max_tokens) == ("top", 2)


def test_stream_cancel() -> None:
    assert decode('{"type":"stream_cancel"}') == StreamCancel()
    assert decode('{"type":"stream_cancel","sessionId":"8","reason":"user","id":"c"}') == (
        StreamCancel(session_id="8", reason="user", id="c")
    )


def test_unknown_envelope_keys_are_ignored() -> None:
    msg = decode('{"type":"ping","web_search":false,"max_searches":0,"search_queries":null}')
    assert msg == Ping()


# ------------------------------------------------------------------------ SDK frames


@pytest.mark.parametrize("case", SDK["cases"], ids=[c["id"] for c in SDK["cases"]])
def test_every_sdk_frame_decodes(case: dict[str, Any]) -> None:
    init = decode(case["wire_text"])
    assert isinstance(init, EncryptedSessionInit)
    raw = case["message"]
    expected = case["expected"]
    assert init.session_id == expected["session_id"] == raw["session_id"]
    assert init.job_id == int(raw["job_id"])
    assert init.chain_id == expected["chain_id"] == 84532
    assert init.id is None
    payload = raw["payload"]
    assert init.payload.ephemeral_public == bytes.fromhex(payload["ephPubHex"])
    assert init.payload.ciphertext == bytes.fromhex(payload["ciphertextHex"])
    assert init.payload.nonce == bytes.fromhex(payload["nonceHex"])
    assert init.payload.signature == bytes.fromhex(payload["signatureHex"])
    assert init.payload.aad == b""
    assert len(case["messages"]) == 3
    for k, item in enumerate(case["messages"]):
        msg = decode(item["wire_text"])
        assert isinstance(msg, EncryptedMessage)
        wire = json.loads(item["wire_text"])
        assert msg.session_id == expected["session_id"]
        assert msg.id == wire["id"]
        assert msg.payload.index == k
        assert msg.payload.aad == item["aad_ascii"].encode() == b"message_%d" % k
        assert msg.payload.nonce == bytes.fromhex(wire["payload"]["nonceHex"])
        assert msg.payload.ciphertext == bytes.fromhex(wire["payload"]["ciphertextHex"])


def test_sdk_case_with_session_id_different_from_job_id() -> None:
    case = next(c for c in SDK["cases"] if c["id"] == "dev-08")
    init = decode(case["wire_text"])
    assert isinstance(init, EncryptedSessionInit)
    assert (init.session_id, init.job_id) == ("100", 200)


def test_sdk_u64_max_ids_are_exact() -> None:
    case = next(c for c in SDK["cases"] if c["message"]["session_id"] == str(2**64 - 1))
    init = decode(case["wire_text"])
    assert isinstance(init, EncryptedSessionInit)
    assert init.session_id == "18446744073709551615"
    assert init.job_id == 2**64 - 1


# ------------------------------------------------------------------------ outbound


def test_encode_exact_bytes_for_small_messages() -> None:
    assert encode(Connected("hello")) == '{"type":"connected","message":"hello"}'
    assert encode(Pong()) == '{"type":"pong"}'
    assert encode(Pong("a")) == '{"type":"pong","id":"a"}'
    assert encode(Pong(5)) == '{"type":"pong","id":5}'
    assert encode(StreamChunk("hé\n", 1, id="r")) == (
        '{"type":"stream_chunk","content":"h\\u00e9\\n","tokens":1,"id":"r"}'
    )
    assert encode(StreamChunk("x", 2, session_id="4")) == (
        '{"type":"stream_chunk","content":"x","tokens":2,"session_id":"4"}'
    )


def test_encode_session_init_ack() -> None:
    encrypted = SessionInitAck("42", 42, 84532, "ok", client_address="0xAbC", id="i")
    assert encode(encrypted) == (
        '{"type":"session_init_ack","status":"success","session_id":"42","job_id":42,'
        '"chain_id":84532,"client_address":"0xAbC","message":"ok","id":"i"}'
    )
    plaintext = SessionInitAck("7", None, 1, "plain")
    assert encode(plaintext) == (
        '{"type":"session_init_ack","status":"success","session_id":"7","job_id":null,'
        '"chain_id":1,"message":"plain"}'
    )


def test_encode_encrypted_chunk_and_response() -> None:
    payload = ChunkPayload(b"\xab\xcd" * 9, b"\x0f" * 24, b"chunk_3", 3)
    chunk = EncryptedChunk(1, payload, id="r", session_id="42")
    assert encode(chunk) == (
        '{"type":"encrypted_chunk","tokens":1,"payload":{"ciphertextHex":"'
        + "abcd" * 9
        + '","nonceHex":"'
        + "0f" * 24
        + '","aadHex":"6368756e6b5f33","index":3},"id":"r","session_id":"42"}'
    )
    final = json.loads(encode(EncryptedChunk(0, payload, final=True)))
    assert final["final"] is True
    assert list(final) == ["type", "tokens", "payload", "final"]
    response = EncryptedResponse(
        ChunkPayload(b"\x01" * 17, b"\x02" * 24, b"encrypted_response_final")
    )
    data = json.loads(encode(response))
    assert list(data) == ["type", "payload"]
    assert list(data["payload"]) == ["ciphertextHex", "nonceHex", "aadHex"]  # no index
    assert bytes.fromhex(data["payload"]["aadHex"]) == b"encrypted_response_final"


def test_encode_stream_end_and_error() -> None:
    end = StreamEnd("complete", 3, "stop", Usage(5, 3, 8), id=9, session_id="42")
    assert encode(end) == (
        '{"type":"stream_end","reason":"complete","tokens_used":3,"finish_reason":"stop",'
        '"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8},'
        '"id":9,"session_id":"42"}'
    )
    err = ErrorMessage("INVALID_AAD", "bad aad", id="q", session_id="1")
    assert encode(err) == (
        '{"type":"error","code":"INVALID_AAD","message":"bad aad","id":"q","session_id":"1"}'
    )
    extra = ErrorMessage(
        "TOKEN_LIMIT_EXCEEDED", "too long", extra={"prompt_tokens": 9, "context_window_size": 8}
    )
    assert encode(extra) == (
        '{"type":"error","code":"TOKEN_LIMIT_EXCEEDED","message":"too long",'
        '"prompt_tokens":9,"context_window_size":8}'
    )


def test_encoded_frames_are_ascii_and_decodable_json() -> None:
    text = encode(StreamChunk("\U0001f999 \u2028 \x00", 1))
    assert text.isascii()
    assert json.loads(text)["content"] == "\U0001f999 \u2028 \x00"


def test_request_id_of_is_best_effort() -> None:
    assert request_id_of('{"type":"nope","id":"z"}') == "z"
    assert request_id_of('{"id":12}') == 12
    assert request_id_of("[1]") is None
    assert request_id_of("not json") is None
    assert request_id_of('{"id":{"x":1}}') is None  # an unusable id is not echoed
    assert request_id_of(b"\xff") is None


def test_protocol_error_carries_code_and_extra() -> None:
    exc = ProtocolError(ErrorCode.TOKEN_LIMIT_EXCEEDED, "too long", prompt_tokens=3)
    assert exc.code is ErrorCode.TOKEN_LIMIT_EXCEEDED
    assert exc.message == "too long"
    assert exc.extra == {"prompt_tokens": 3}


def test_converter_writes_any_bytes_as_lowercase_hex() -> None:
    from node.protocol.messages import converter

    assert converter.unstructure(b"\xab\x0f") == "ab0f"
