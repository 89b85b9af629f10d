"""The sans-I/O receive side: the frame parser and the response readers, fed with the
node -> client frames recorded in ``sdk/node_to_client_dev.json``.

Every honest example must read exactly as the SDK read it; every tolerance example that the
SDK lets through (wrong AAD, wrong key, tampered tag, foreign ids, missing ends) must be
refused here, with no text taken from the offending frame.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.client import (
    ChunkAuthenticationFailed,
    ChunkOutOfOrder,
    ClientError,
    EncryptedResponseReader,
    ForeignFrame,
    InvalidFinishReason,
    MalformedFrame,
    NodeErrorResponse,
    PlaintextResponseReader,
    UnexpectedFrame,
    parse_server_frame,
)
from node.client.frames import StreamEndFrame
from node.client.receiver import ResponseEnd, ResponseReader, TextPiece
from node.crypto import SecretBytes
from node.protocol.messages import (
    Connected,
    EncryptedChunk,
    ErrorMessage,
    Pong,
    SessionInitAck,
    StreamChunk,
)
from tests.conftest import load_vector

VECTORS = load_vector("sdk/node_to_client_dev.json")


def _reader(example: dict[str, Any]) -> EncryptedResponseReader:
    return EncryptedResponseReader(
        SecretBytes(bytes.fromhex(example["session_key_hex"])),
        session_id=example["session_id"],
        request_id=example["request_id"],
    )


def _feed_all(
    reader: ResponseReader, frames: list[dict[str, Any]]
) -> tuple[list[str], ResponseEnd | None, ClientError | None, int]:
    """Feed frames until one raises; returns (texts, end, error, index of failing frame)."""
    texts: list[str] = []
    end: ResponseEnd | None = None
    for i, item in enumerate(frames):
        try:
            event = reader.feed(parse_server_frame(json.dumps(item["frame"])))
        except ClientError as exc:
            return texts, end, exc, i
        if isinstance(event, TextPiece):
            texts.append(event.text)
        elif isinstance(event, ResponseEnd):
            end = event
    return texts, end, None, len(frames)


@pytest.mark.parametrize("example", VECTORS["examples"], ids=lambda e: e["id"])
def test_sdk_examples_read_like_the_sdk(example: dict[str, Any]) -> None:
    reader = _reader(example)
    texts, end, error, _ = _feed_all(reader, example["frames"])
    expected = example["sdk_consumer_result"]
    assert error is None
    assert end is not None
    assert "".join(texts) == expected["full_text"]
    assert end.finish_reason == expected["encrypted_response_decrypted"]
    assert reader.done
    # Each text piece is exactly one recorded chunk's plaintext.
    recorded = [
        f["expected_plaintext"]
        for f in example["frames"]
        if f["frame"]["type"] == "encrypted_chunk" and f["expected_plaintext"]
    ]
    assert texts == recorded
    usage = expected["stream_end"].get("usage")
    if usage is None:
        assert end.stream_end.usage is None
    else:
        assert end.stream_end.usage is not None
        assert end.stream_end.usage.completion_tokens == usage["completion_tokens"]


TOLERANCE: dict[str, type[ClientError] | None] = {
    "tol-aad-index-mismatch": ChunkOutOfOrder,
    "tol-wrong-key-chunk": ChunkAuthenticationFailed,
    "tol-tampered-tag": ChunkAuthenticationFailed,
    "tol-hex-case-and-0x": None,  # PROTOCOL.md section 2: either case, optional 0x
    "tol-no-stream-end": None,  # not an error by itself: the stream is simply not over
    "tol-final-only": None,
    "tol-error-midstream": NodeErrorResponse,
    "tol-bare-error": NodeErrorResponse,
    "tol-token-limit": NodeErrorResponse,
    "tol-foreign-ids": ForeignFrame,
}


def test_every_tolerance_example_is_covered() -> None:
    assert {e["id"] for e in VECTORS["tolerance_examples"]} == set(TOLERANCE)


@pytest.mark.parametrize("example", VECTORS["tolerance_examples"], ids=lambda e: e["id"])
def test_sdk_tolerances_are_refused(example: dict[str, Any]) -> None:
    reader = _reader(example)
    texts, end, error, failed_at = _feed_all(reader, example["frames"])
    expected = TOLERANCE[example["id"]]
    if expected is None:
        assert error is None
    else:
        assert type(error) is expected
        assert not reader.done or isinstance(error, NodeErrorResponse)
        # Nothing from the refused frame or after it was taken as text.
        good = [
            f["expected_plaintext"]
            for f in example["frames"][:failed_at]
            if f["frame"]["type"] == "encrypted_chunk" and f["expected_plaintext"]
        ]
        assert texts == good
    if example["id"] == "tol-hex-case-and-0x":
        assert end is not None
        assert "".join(texts) == example["sdk_consumer_result"]["full_text"]
    if example["id"] in ("tol-no-stream-end", "tol-final-only"):
        # The SDK finishes these on a grace timer; for us the stream is unfinished (the
        # session turns the closed connection or the timeout into StreamTruncated).
        assert end is None
        assert not reader.done


def test_node_error_codes_and_extra_fields_survive() -> None:
    by_id = {e["id"]: e for e in VECTORS["tolerance_examples"]}
    _, _, error, _ = _feed_all(
        _reader(by_id["tol-token-limit"]), by_id["tol-token-limit"]["frames"]
    )
    assert isinstance(error, NodeErrorResponse)
    assert error.code == "TOKEN_LIMIT_EXCEEDED"
    assert error.extra == {"prompt_tokens": 9000, "context_window_size": 8192}
    _, _, bare, _ = _feed_all(_reader(by_id["tol-bare-error"]), by_id["tol-bare-error"]["frames"])
    assert isinstance(bare, NodeErrorResponse)
    assert bare.code == "UNSPECIFIED"
    assert bare.message == "Model not loaded"


# ------------------------------------------------------------------ frame parser

GOOD_CHUNK = {
    "type": "encrypted_chunk",
    "tokens": 1,
    "payload": {"ciphertextHex": "00" * 17, "nonceHex": "11" * 24, "aadHex": "", "index": 0},
    "id": "r",
    "session_id": "1",
}


def _with(base: dict[str, Any], path: str, value: Any) -> str:
    obj = json.loads(json.dumps(base))
    target = obj
    *parents, last = path.split(".")
    for name in parents:
        target = target[name]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return json.dumps(obj)


def test_parses_every_server_frame_type() -> None:
    assert isinstance(parse_server_frame('{"type":"connected","message":"hi"}'), Connected)
    assert parse_server_frame('{"type":"pong","id":"p1"}') == Pong("p1")
    ack = parse_server_frame(
        '{"type":"session_init_ack","status":"success","session_id":"42","job_id":42,'
        '"chain_id":84532,"client_address":"0xAb","message":"m"}'
    )
    assert isinstance(ack, SessionInitAck)
    assert (ack.session_id, ack.job_id, ack.client_address) == ("42", 42, "0xAb")
    chunk = parse_server_frame(json.dumps(GOOD_CHUNK))
    assert isinstance(chunk, EncryptedChunk)
    assert chunk.payload.index == 0
    assert not chunk.final
    plain = parse_server_frame('{"type":"stream_chunk","content":"x","tokens":1,"id":"r"}')
    assert plain == StreamChunk("x", 1, "r", None)
    end = parse_server_frame(
        '{"type":"stream_end","reason":"complete","tokens_used":2,"finish_reason":"stop",'
        '"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,'
        '"context_window_size":8192},"id":"r","session_id":"1"}'
    )
    assert isinstance(end, StreamEndFrame)
    assert end.usage is not None
    assert end.usage.total_tokens == 3
    error = parse_server_frame('{"type":"error","code":"RATE_LIMITED","message":"slow"}')
    assert isinstance(error, ErrorMessage)
    assert error.code == "RATE_LIMITED"


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1,2]",
        '"chunk"',
        '{"no":"type"}',
        '{"type":"surprise"}',
        '{"type":"stream_chunk","content":NaN,"tokens":1}',
        _with(GOOD_CHUNK, "payload", KeyError),
        _with(GOOD_CHUNK, "payload", "deadbeef"),
        _with(GOOD_CHUNK, "payload.index", KeyError),
        _with(GOOD_CHUNK, "payload.index", -1),
        _with(GOOD_CHUNK, "payload.index", "0"),
        _with(GOOD_CHUNK, "payload.nonceHex", "11" * 23),
        _with(GOOD_CHUNK, "payload.nonceHex", "zz" * 24),
        _with(GOOD_CHUNK, "payload.ciphertextHex", "00" * 15),
        _with(GOOD_CHUNK, "payload.ciphertextHex", "0" * 33),
        _with(GOOD_CHUNK, "payload.aadHex", 7),
        _with(GOOD_CHUNK, "tokens", -1),
        _with(GOOD_CHUNK, "tokens", True),
        _with(GOOD_CHUNK, "final", "yes"),
        _with(GOOD_CHUNK, "id", [1]),
        _with(GOOD_CHUNK, "session_id", "abc"),
        '{"type":"stream_end","reason":"complete"}',
        '{"type":"stream_end","reason":"complete","tokens_used":1,'
        '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":5}}',
        '{"type":"session_init_ack","status":"success","session_id":"1","chain_id":"x",'
        '"message":"m"}',
        '{"type":"stream_chunk","tokens":1}',
    ],
)
def test_malformed_frames_are_refused(text: str) -> None:
    with pytest.raises(MalformedFrame):
        parse_server_frame(text)


def test_binary_frames_are_refused() -> None:
    with pytest.raises(MalformedFrame):
        parse_server_frame(b'{"type":"pong"}')


# ------------------------------------------------------------- plaintext reader


def _plain_reader() -> PlaintextResponseReader:
    return PlaintextResponseReader(session_id="1", request_id="r")


def test_plaintext_reader_reads_chunks_and_end() -> None:
    reader = _plain_reader()
    assert reader.feed(StreamChunk("hi", 1, "r", "1")) == TextPiece("hi", 1)
    event = reader.feed(StreamEndFrame("complete", 1, "stop", None, "r", "1"))
    assert isinstance(event, ResponseEnd)
    assert event.finish_reason == "stop"
    with pytest.raises(UnexpectedFrame):
        reader.feed(StreamChunk("late", 1, "r", "1"))


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (StreamChunk("x", 1, "other", "1"), ForeignFrame),
        (StreamChunk("x", 1, "r", "2"), ForeignFrame),
        (StreamChunk("x", 1, None, "1"), ForeignFrame),
        (StreamEndFrame("complete", 1, None, None, "r", "1"), InvalidFinishReason),
        (StreamEndFrame("complete", 1, "odd", None, "r", "1"), InvalidFinishReason),
        (StreamEndFrame("cancelled", 1, "stop", None, "r", "1"), InvalidFinishReason),
        (Connected("again"), UnexpectedFrame),
        (ErrorMessage("RATE_LIMITED", "slow", "r", "1"), NodeErrorResponse),
        (ErrorMessage("RATE_LIMITED", "slow", "other", "1"), ForeignFrame),
    ],
)
def test_plaintext_reader_refuses(frame: Any, error: type[ClientError]) -> None:
    with pytest.raises(error):
        _plain_reader().feed(frame)
