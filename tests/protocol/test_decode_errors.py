"""Every class of malformed input gets exactly its wire code (PROTOCOL.md sections 1-4, 6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.crypto.errors import ErrorCode
from node.protocol import ProtocolError, decode
from tests.protocol._support import (
    error_code,
    init_frame,
    init_payload,
    make_conn,
    make_init,
    message_frame,
)

INIT_PAYLOAD = init_payload(bytes(range(32)))
MSG_PAYLOAD = {"ciphertextHex": "ab" * 20, "nonceHex": "cd" * 24, "aadHex": b"message_0".hex()}

E = ErrorCode


def init(**payload_overrides: Any) -> str:
    payload = {**INIT_PAYLOAD, **payload_overrides}
    for name in [k for k, v in payload.items() if v is DROP]:
        del payload[name]
    return json.dumps({"type": "encrypted_session_init", "session_id": "1", "payload": payload})


def msg(**payload_overrides: Any) -> str:
    payload = {**MSG_PAYLOAD, **payload_overrides}
    for name in [k for k, v in payload.items() if v is DROP]:
        del payload[name]
    return json.dumps({"type": "encrypted_message", "session_id": "1", "payload": payload})


def env(**fields: Any) -> str:
    return json.dumps(fields)


DROP: Any = object()
DEEP = "[" * 100_000 + "]" * 100_000

CASES: list[tuple[str, str | bytes, ErrorCode]] = [
    # frame level
    ("invalid-json", "{", E.INVALID_MESSAGE),
    ("empty-frame", "", E.INVALID_MESSAGE),
    ("trailing-garbage", '{"type":"ping"} x', E.INVALID_MESSAGE),
    ("invalid-utf8-bytes", b'{"type":"ping","id":"\xff"}', E.INVALID_MESSAGE),
    ("utf16-bytes", '{"type":"ping"}'.encode("utf-16"), E.INVALID_MESSAGE),
    ("non-object-array", "[]", E.INVALID_MESSAGE),
    ("non-object-number", "1", E.INVALID_MESSAGE),
    ("non-object-string", '"ping"', E.INVALID_MESSAGE),
    ("non-object-null", "null", E.INVALID_MESSAGE),
    ("unknown-type", env(type="pong"), E.INVALID_MESSAGE),
    ("unknown-type-outbound", env(type="session_init_ack"), E.INVALID_MESSAGE),
    ("missing-type", env(id=1), E.INVALID_MESSAGE),
    ("type-not-string", env(type=1), E.INVALID_MESSAGE),
    ("type-null", env(type=None), E.INVALID_MESSAGE),
    # deep nesting, huge numbers, non-finite numbers
    ("deep-nesting", DEEP, E.INVALID_MESSAGE),
    ("deep-nesting-in-field", '{"type":"ping","x":' + DEEP + "}", E.INVALID_MESSAGE),
    ("huge-integer-literal", '{"type":"ping","id":' + "9" * 5000 + "}", E.INVALID_MESSAGE),
    ("id-out-of-range", env(type="ping", id=2**64), E.INVALID_MESSAGE),
    ("session-id-huge-int", env(type="stream_cancel", session_id=10**100), E.INVALID_MESSAGE),
    ("job-id-80-digits", env(type="session_init", job_id="1" * 80), E.INVALID_MESSAGE),
    ("nan", '{"type":"ping","id":NaN}', E.INVALID_MESSAGE),
    ("infinity", '{"type":"ping","x":Infinity}', E.INVALID_MESSAGE),
    ("minus-infinity", '{"type":"ping","x":-Infinity}', E.INVALID_MESSAGE),
    (
        "float-overflow-temperature",
        '{"type":"prompt","prompt":"p","temperature":1e999}',
        E.INVALID_MESSAGE,
    ),
    # envelope field types
    ("id-object", env(type="ping", id={"a": 1}), E.INVALID_MESSAGE),
    ("id-bool", env(type="ping", id=True), E.INVALID_MESSAGE),
    ("id-too-long", env(type="ping", id="x" * 257), E.INVALID_MESSAGE),
    ("session-id-float", env(type="stream_cancel", session_id=1.5), E.INVALID_MESSAGE),
    ("session-id-bool", env(type="stream_cancel", session_id=True), E.INVALID_MESSAGE),
    ("session-id-negative", env(type="stream_cancel", session_id=-1), E.INVALID_MESSAGE),
    ("session-id-not-decimal", env(type="stream_cancel", session_id="0x10"), E.INVALID_MESSAGE),
    ("session-id-leading-zero", env(type="stream_cancel", session_id="01"), E.INVALID_MESSAGE),
    (
        "session-id-unicode-digits",
        env(type="stream_cancel", session_id="\u0664\u0662"),
        E.INVALID_MESSAGE,
    ),
    ("job-id-list", env(type="session_init", job_id=[1]), E.INVALID_MESSAGE),
    ("chain-id-string", env(type="session_init", job_id="1", chain_id="84532"), E.INVALID_MESSAGE),
    ("chain-id-zero", env(type="session_init", job_id="1", chain_id=0), E.INVALID_MESSAGE),
    ("chain-id-bool", env(type="session_init", job_id="1", chain_id=True), E.INVALID_MESSAGE),
    ("cancel-reason-number", env(type="stream_cancel", reason=5), E.INVALID_MESSAGE),
    ("cancel-reason-surrogate", env(type="stream_cancel", reason="\ud800"), E.INVALID_MESSAGE),
    # plaintext prompt fields
    ("prompt-missing", env(type="prompt"), E.INVALID_MESSAGE),
    ("prompt-number", env(type="prompt", prompt=5), E.INVALID_MESSAGE),
    ("prompt-lone-surrogate", env(type="inference", prompt="a\ud800"), E.INVALID_MESSAGE),
    ("prompt-request-not-object", env(type="prompt", prompt="p", request=[]), E.INVALID_MESSAGE),
    ("prompt-model-number", env(type="prompt", prompt="p", model=1), E.INVALID_MESSAGE),
    ("prompt-max-tokens-zero", env(type="prompt", prompt="p", max_tokens=0), E.INVALID_MESSAGE),
    ("prompt-max-tokens-string", env(type="prompt", prompt="p", max_tokens="5"), E.INVALID_MESSAGE),
    ("prompt-max-tokens-float", env(type="prompt", prompt="p", max_tokens=5.0), E.INVALID_MESSAGE),
    ("prompt-max-tokens-bool", env(type="prompt", prompt="p", max_tokens=True), E.INVALID_MESSAGE),
    (
        "prompt-temperature-high",
        env(type="prompt", prompt="p", temperature=10.5),
        E.INVALID_MESSAGE,
    ),
    (
        "prompt-temperature-negative",
        env(type="prompt", prompt="p", temperature=-0.1),
        E.INVALID_MESSAGE,
    ),
    ("prompt-stream-string", env(type="prompt", prompt="p", stream="yes"), E.INVALID_MESSAGE),
    # missing payload / payload not an object
    ("init-missing-payload", env(type="encrypted_session_init", session_id="1"), E.MISSING_PAYLOAD),
    (
        "init-null-payload",
        env(type="encrypted_session_init", session_id="1", payload=None),
        E.MISSING_PAYLOAD,
    ),
    ("msg-missing-payload", env(type="encrypted_message", session_id="1"), E.MISSING_PAYLOAD),
    (
        "init-payload-list",
        env(type="encrypted_session_init", session_id="1", payload=[]),
        E.INVALID_PAYLOAD,
    ),
    (
        "init-payload-string",
        env(type="encrypted_session_init", session_id="1", payload="x"),
        E.INVALID_PAYLOAD,
    ),
    (
        "msg-payload-list",
        env(type="encrypted_message", session_id="1", payload=[1]),
        E.INVALID_PAYLOAD,
    ),
    # missing or mistyped payload fields
    *[
        (f"init-missing-{f}", init(**{f: DROP}), E.INVALID_PAYLOAD)
        for f in ("ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex")
    ],
    *[
        (f"init-number-{f}", init(**{f: 12}), E.INVALID_PAYLOAD)
        for f in ("ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex")
    ],
    *[
        (f"msg-missing-{f}", msg(**{f: DROP}), E.INVALID_PAYLOAD)
        for f in ("ciphertextHex", "nonceHex", "aadHex")
    ],
    *[
        (f"msg-null-{f}", msg(**{f: None}), E.INVALID_PAYLOAD)
        for f in ("ciphertextHex", "nonceHex", "aadHex")
    ],
    ("init-salt-number", init(saltHex=0), E.INVALID_PAYLOAD),
    ("init-salt-nonzero", init(saltHex="01" * 32), E.INVALID_PAYLOAD),
    ("init-salt-short-zero", init(saltHex="00" * 16), E.INVALID_PAYLOAD),
    ("init-info-nonempty", init(info="ctx"), E.INVALID_PAYLOAD),
    ("init-eph-wrong-length", init(ephPubHex="02" + "11" * 31), E.INVALID_PAYLOAD),
    ("init-ciphertext-short", init(ciphertextHex="00" * 15), E.INVALID_PAYLOAD),
    ("msg-ciphertext-short", msg(ciphertextHex="00" * 15), E.INVALID_PAYLOAD),
    # hex
    ("init-odd-hex", init(nonceHex="abc"), E.INVALID_HEX_ENCODING),
    ("init-non-hex", init(ephPubHex="zz" * 33), E.INVALID_HEX_ENCODING),
    ("init-hex-with-space", init(signatureHex="ab " * 32 + "ab"), E.INVALID_HEX_ENCODING),
    ("init-aad-non-hex", init(aadHex="0xg0"), E.INVALID_HEX_ENCODING),
    ("init-salt-odd", init(saltHex="000"), E.INVALID_HEX_ENCODING),
    ("msg-odd-hex", msg(ciphertextHex="a" * 41), E.INVALID_HEX_ENCODING),
    ("msg-non-hex", msg(nonceHex="xy" * 24), E.INVALID_HEX_ENCODING),
    ("msg-double-prefix", msg(aadHex="0x0x00"), E.INVALID_HEX_ENCODING),
    ("msg-unicode-digits", msg(aadHex="\u0661\u0662"), E.INVALID_HEX_ENCODING),
    # sizes
    ("init-nonce-23", init(nonceHex="00" * 23), E.INVALID_NONCE_SIZE),
    ("init-nonce-12", init(nonceHex="00" * 12), E.INVALID_NONCE_SIZE),
    ("msg-nonce-25", msg(nonceHex="00" * 25), E.INVALID_NONCE_SIZE),
    ("msg-nonce-empty", msg(nonceHex=""), E.INVALID_NONCE_SIZE),
    ("init-signature-64", init(signatureHex="11" * 64), E.INVALID_SIGNATURE),
    ("init-signature-66", init(signatureHex="11" * 66), E.INVALID_SIGNATURE),
    # AAD
    *[
        (f"aad-{text!r}", msg(aadHex=text.encode().hex()), E.INVALID_AAD)
        for text in (
            "",
            "message_",
            "message_01",
            "message_-1",
            "Message_0",
            "chunk_0",
            "message_0 ",
            "message_1x",
            "message_" + "9" * 20,
            "encrypted_response_final",
        )
    ],
    ("aad-non-ascii", msg(aadHex=("message_\u0661").encode().hex()), E.INVALID_AAD),
    # session id
    (
        "msg-missing-session-id",
        env(type="encrypted_message", payload=MSG_PAYLOAD),
        E.MISSING_SESSION_ID,
    ),
    (
        "msg-null-session-id",
        env(type="encrypted_message", session_id=None, payload=MSG_PAYLOAD),
        E.MISSING_SESSION_ID,
    ),
    (
        "init-missing-session-id",
        env(type="encrypted_session_init", job_id="1", payload=INIT_PAYLOAD),
        E.MISSING_SESSION_ID,
    ),
    ("plain-init-no-ids", env(type="session_init", chain_id=1), E.MISSING_SESSION_ID),
]


@pytest.mark.parametrize(("text", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_gets_its_code(text: str | bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code is code, info.value.message
    assert info.value.message  # a person-readable message, never empty


def test_case_ids_are_unique() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


def test_errors_do_not_echo_hex_values() -> None:
    secretish = "0123456789abcdeg" * 4
    with pytest.raises(ProtocolError) as info:
        decode(msg(ciphertextHex=secretish))
    assert secretish not in info.value.message
    assert "ciphertextHex" in info.value.message


def test_replay_is_refused_by_the_state_machine() -> None:
    """REPLAY_DETECTED cannot come from decode alone: it needs the connection's counter."""
    key = bytes(range(32))
    conn = make_conn()
    conn.receive(make_init(key))
    frame = message_frame(key, 0)
    conn.receive(frame)
    conn.finish("stop", prompt_tokens=1)
    assert error_code(conn.receive(frame)) is E.REPLAY_DETECTED


def test_init_replay_is_refused_by_the_state_machine() -> None:
    payload = init_payload(bytes(range(32)))
    conn = make_conn()
    conn.receive(init_frame(payload))
    assert error_code(conn.receive(init_frame(payload))) is E.REPLAY_DETECTED


def test_deep_nesting_is_refused_before_the_parser_recurses() -> None:
    """With a raised recursion limit the C parser would overflow the C stack on 500k levels
    (a segfault seen here); the depth check refuses such frames before parsing."""
    import sys

    from node.crypto.encoding import too_deep

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200_000)
    try:
        for text in ("[" * 500_000, '{"a":' * 200_000, "[1," * 100 + "1" + "]" * 100):
            with pytest.raises(ProtocolError) as info:
                decode(text)
            assert info.value.code == E.INVALID_MESSAGE
    finally:
        sys.setrecursionlimit(old)
    assert not too_deep("[]" * 10_000)
    assert not too_deep('{"a":"' + "[" * 5_000 + '"}')  # brackets inside a string
    assert not too_deep("[" * 64 + "]" * 64)
    assert too_deep("[" * 65 + "]" * 65)
    assert too_deep("[[]" * 1_000)
