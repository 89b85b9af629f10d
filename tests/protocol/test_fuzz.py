"""Property tests: ``decode`` and ``parse_request_plaintext`` return a value or raise
:class:`ProtocolError` with a wire code - never ``KeyError``, ``TypeError``,
``UnicodeError``, ``ValueError``, ``binascii.Error`` or anything else.

CI runs about 2,900 examples in all (a few seconds). For a longer run, scale every
example budget in this directory with an environment variable, for example::

    PROTOCOL_FUZZ_SCALE=50 .venv/bin/python -m pytest tests/protocol -q -k "fuzz or stateful"
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from node.crypto.errors import ErrorCode
from node.protocol import InferenceRequest, ProtocolError, decode
from node.protocol.messages import (
    EncryptedMessage,
    EncryptedSessionInit,
    Ping,
    PromptRequest,
    SessionInit,
    StreamCancel,
)
from node.protocol.requests import parse_request_plaintext
from tests.conftest import load_vector
from tests.protocol._support import fuzz_settings

INBOUND = (Ping, EncryptedSessionInit, SessionInit, EncryptedMessage, PromptRequest, StreamCancel)
TYPES = [
    "ping",
    "encrypted_session_init",
    "session_init",
    "encrypted_message",
    "prompt",
    "inference",
    "stream_cancel",
]
ENVELOPE_KEYS = [
    "id",
    "session_id",
    "sessionId",
    "job_id",
    "jobId",
    "chain_id",
    "chainId",
    "prompt",
    "request",
    "model",
    "max_tokens",
    "temperature",
    "stream",
    "reason",
]
PAYLOAD_KEYS = [
    "ephPubHex",
    "ciphertextHex",
    "nonceHex",
    "signatureHex",
    "aadHex",
    "saltHex",
    "info",
]
REQUEST_KEYS = [
    "action",
    "prompt",
    "messages",
    "model",
    "max_tokens",
    "temperature",
    "stop",
    "seed",
    "stream",
]

SDK = load_vector("sdk/session_init_dev.json")
SDK_FRAMES = [c["wire_text"] for c in SDK["cases"]] + [
    m["wire_text"] for c in SDK["cases"] for m in c["messages"][:1]
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
sized_hex = (
    st.sampled_from([0, 1, 15, 16, 23, 24, 25, 32, 33, 64, 65, 66])
    .flatmap(lambda n: st.binary(min_size=n, max_size=n))
    .map(bytes.hex)
)
hexish = (
    sized_hex
    | st.text("0123456789abcdefABCDEFxX \n", max_size=140)
    | st.integers(-3, 10**21).map(lambda k: f"message_{k}".encode().hex())
    | st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass").hex())
)
decimalish = st.integers(-5, 10**80).map(str) | st.from_regex(r"[0-9n]{0,6}", fullmatch=True)
field_values = json_values | hexish | decimalish
payloads = st.dictionaries(st.sampled_from(PAYLOAD_KEYS), field_values, max_size=7)
frames = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=4)},
    optional={
        **{k: field_values for k in ENVELOPE_KEYS},
        "payload": payloads | json_values,
        "request": st.dictionaries(st.sampled_from(ENVELOPE_KEYS), field_values, max_size=5),
    },
)


def check_decode(text: str | bytes) -> None:
    """Any other exception type escapes and fails the test."""
    try:
        message = decode(text)
    except ProtocolError as exc:
        error: ProtocolError | None = exc
    else:
        error = None
        assert isinstance(message, INBOUND)
    if error is not None:
        assert isinstance(error.code, ErrorCode)
        assert error.message


@fuzz_settings(400)
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    check_decode(text)


@fuzz_settings(200)
@given(st.binary())
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@fuzz_settings(300)
@given(json_values)
def test_fuzz_arbitrary_json_values(value: Any) -> None:
    check_decode(json.dumps(value))


@fuzz_settings(700)
@given(frames)
def test_fuzz_frames_with_protocol_keys(obj: dict[str, Any]) -> None:
    check_decode(json.dumps(obj))


def _mutate(data: st.DataObject, obj: dict[str, Any]) -> None:
    target = obj
    if isinstance(obj.get("payload"), dict) and data.draw(st.booleans()):
        target = obj["payload"]
    if not target:
        target["type"] = data.draw(field_values)
        return
    key = data.draw(st.sampled_from(sorted(target)))
    op = data.draw(st.sampled_from(["drop", "replace", "hex", "truncate", "prefix", "case"]))
    value = target[key]
    if op == "drop":
        del target[key]
    elif op == "replace" or not isinstance(value, str):
        target[key] = data.draw(field_values)
    elif op == "hex":
        pos = data.draw(st.integers(0, max(0, len(value) - 1)))
        ch = data.draw(st.characters())
        target[key] = value[:pos] + ch + value[pos + 1 :]
    elif op == "truncate":
        target[key] = value[: data.draw(st.integers(0, len(value)))]
    elif op == "prefix":
        target[key] = data.draw(st.sampled_from(["0x", "0X", "0x0x", " ", "-"])) + value
    else:
        target[key] = value.upper()


@fuzz_settings(600)
@given(st.sampled_from(SDK_FRAMES), st.data())
def test_fuzz_mutated_sdk_frames(wire: str, data: st.DataObject) -> None:
    obj = json.loads(wire)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, obj)
    check_decode(json.dumps(obj))


@fuzz_settings(200)
@given(
    st.sampled_from(SDK_FRAMES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_fuzz_byte_flipped_sdk_frames(wire: str, flips: list[tuple[int, int]]) -> None:
    raw = bytearray(wire.encode("utf-8"))
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    check_decode(bytes(raw))
    check_decode(raw.decode("utf-8", "replace"))


def check_request(text: str) -> None:
    try:
        request = parse_request_plaintext(text)
    except ProtocolError as exc:
        code: ErrorCode | None = exc.code
    else:
        code = None
        assert isinstance(request, InferenceRequest)
        assert request.prompt is not None or request.messages
    assert code in (None, ErrorCode.INVALID_PAYLOAD, ErrorCode.UNSUPPORTED_ACTION)


request_objects = st.fixed_dictionaries(
    {},
    optional={
        **{k: field_values for k in REQUEST_KEYS},
        "action": st.sampled_from(["inference", "chat", "embed"]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": field_values, "content": field_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "stop": st.lists(st.text(max_size=4), max_size=10) | json_values,
    },
)


@fuzz_settings(200)
@given(st.text())
def test_fuzz_request_plaintext_text(text: str) -> None:
    # Includes lone surrogates, which a strict UTF-8 decode never yields: still a code.
    check_request(text)


@fuzz_settings(300)
@given(request_objects)
def test_fuzz_request_plaintext_objects(obj: dict[str, Any]) -> None:
    check_request(json.dumps(obj))
