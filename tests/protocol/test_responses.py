"""The response encoder: piece()/finish()/fail() frames for both modes (PROTOCOL.md 4-6)."""

from __future__ import annotations

import json
from typing import Any

from node.crypto.errors import ErrorCode, NodeError
from node.protocol import Send, encode
from node.protocol.connection import RESPONSE_FINAL_AAD, ConnectionState
from node.protocol.messages import (
    EncryptedChunk,
    EncryptedResponse,
    ErrorMessage,
    StreamChunk,
    StreamEnd,
    Usage,
)
from tests.protocol._support import (
    CountingRng,
    frame,
    kinds,
    make_conn,
    make_init,
    message_frame,
    open_payload,
)

KEY = bytes(range(7, 39))


def encrypted_conn(rng: CountingRng | None = None) -> ConnectionState:
    conn = make_conn(rng=rng)
    conn.receive(make_init(KEY))
    return conn


def start(conn: ConnectionState, index: int, request_id: Any = "r") -> None:
    actions = conn.receive(message_frame(KEY, index, request_id=request_id))
    assert kinds(actions) == ["StartRequest"]


def wire(message: Any) -> dict[str, Any]:
    return json.loads(encode(message))  # type: ignore[no-any-return]


def test_encrypted_pieces_carry_chunk_aad_in_order_and_fresh_nonces() -> None:
    rng = CountingRng()
    conn = encrypted_conn(rng)
    start(conn, 0)
    pieces = ["Hel", "lo", " w\u00f6rld \U0001f999", ""]
    frames = [conn.piece(p, 1) for p in pieces]
    nonces = []
    for i, (piece, message) in enumerate(zip(pieces, frames, strict=True)):
        assert isinstance(message, EncryptedChunk)
        data = wire(message)
        assert data["type"] == "encrypted_chunk"
        assert data["tokens"] == 1
        assert (data["id"], data["session_id"]) == ("r", "42")
        assert "final" not in data
        assert data["payload"]["index"] == i
        aad, plain = open_payload(KEY, data["payload"])
        assert aad == b"chunk_%d" % i
        assert plain.decode("utf-8") == piece
        nonces.append(bytes.fromhex(data["payload"]["nonceHex"]))
    assert nonces == rng.outputs[-len(pieces) :]  # every nonce comes from the rng, fresh
    assert len(set(nonces)) == len(nonces)


def test_finish_stop_closes_the_encrypted_stream() -> None:
    conn = encrypted_conn()
    start(conn, 0, request_id=11)
    conn.piece("a", 1)
    conn.piece("b", 2)
    frames = conn.finish("stop", prompt_tokens=5)
    assert [type(f) for f in frames] == [EncryptedChunk, EncryptedResponse, StreamEnd]
    final, response, end = (wire(f) for f in frames)
    assert (final["tokens"], final["final"], final["payload"]["index"]) == (0, True, 2)
    assert open_payload(KEY, final["payload"]) == (b"chunk_2", b"")
    assert response["type"] == "encrypted_response"
    assert (response["id"], response["session_id"]) == (11, "42")
    assert open_payload(KEY, response["payload"]) == (RESPONSE_FINAL_AAD, b"stop")
    assert bytes.fromhex(response["payload"]["aadHex"]) == b"encrypted_response_final"
    assert end == {
        "type": "stream_end",
        "reason": "complete",
        "tokens_used": 3,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "id": 11,
        "session_id": "42",
    }
    assert not conn.streaming


def test_chunk_index_restarts_for_the_next_request() -> None:
    conn = encrypted_conn()
    start(conn, 0)
    conn.piece("x", 1)
    conn.finish("length", prompt_tokens=1)
    start(conn, 1, request_id="second")
    first = wire(conn.piece("y", 1))
    assert first["payload"]["index"] == 0
    assert first["id"] == "second"
    assert open_payload(KEY, first["payload"]) == (b"chunk_0", b"y")
    frames = conn.finish("length", prompt_tokens=1)
    assert open_payload(KEY, wire(frames[0])["payload"])[0] == b"chunk_1"
    assert open_payload(KEY, wire(frames[1])["payload"])[1] == b"length"
    assert wire(frames[2])["reason"] == "complete"


def test_finish_with_no_pieces_sends_final_chunk_0() -> None:
    conn = encrypted_conn()
    start(conn, 0)
    frames = conn.finish("stop", prompt_tokens=2)
    assert open_payload(KEY, wire(frames[0])["payload"]) == (b"chunk_0", b"")
    end = frames[2]
    assert isinstance(end, StreamEnd)
    assert end.usage == Usage(2, 0, 2)


def test_cancelled_ending() -> None:
    conn = encrypted_conn()
    start(conn, 0)
    conn.piece("partial", 4)
    conn.receive(frame({"type": "stream_cancel", "session_id": "42"}))
    frames = conn.finish("cancelled", prompt_tokens=3)
    assert open_payload(KEY, wire(frames[1])["payload"]) == (RESPONSE_FINAL_AAD, b"cancelled")
    end = frames[2]
    assert isinstance(end, StreamEnd)
    assert (end.reason, end.finish_reason, end.tokens_used) == ("cancelled", "cancelled", 4)


def test_completion_tokens_override() -> None:
    conn = encrypted_conn()
    start(conn, 0)
    conn.piece("abc", 1)
    end = conn.finish("stop", prompt_tokens=10, completion_tokens=7)[-1]
    assert isinstance(end, StreamEnd)
    assert (end.tokens_used, end.usage) == (7, Usage(10, 7, 17))


def test_fail_puts_the_error_frame_first() -> None:
    conn = encrypted_conn()
    start(conn, 0, request_id="q")
    conn.piece("so far", 2)
    actions = conn.fail(
        NodeError("backend went away", code=ErrorCode.INFERENCE_FAILED), prompt_tokens=4
    )
    assert all(isinstance(a, Send) for a in actions)
    messages = [a.message for a in actions]  # type: ignore[union-attr]
    assert [type(m) for m in messages] == [
        ErrorMessage,
        EncryptedChunk,
        EncryptedResponse,
        StreamEnd,
    ]
    error = wire(messages[0])
    assert error == {
        "type": "error",
        "code": "INFERENCE_FAILED",
        "message": "backend went away",
        "id": "q",
        "session_id": "42",
    }
    assert open_payload(KEY, wire(messages[1])["payload"]) == (b"chunk_1", b"")
    assert open_payload(KEY, wire(messages[2])["payload"])[1] == b"error"
    end = messages[3]
    assert isinstance(end, StreamEnd)
    assert (end.reason, end.finish_reason, end.tokens_used) == ("error", "error", 2)
    assert not conn.streaming


def test_a_failed_request_is_not_charged_to_the_error_budget() -> None:
    """Busy model, unknown model, prompt too long: the request was valid protocol, so a
    client retrying against a busy node is never closed with 1008 for it."""
    conn = make_conn(max_errors=1)
    conn.receive(make_init(KEY))
    start(conn, 0)
    from node.protocol import ProtocolError

    actions = conn.fail(ProtocolError(ErrorCode.TOKEN_LIMIT_EXCEEDED, "too long", prompt_tokens=9))
    assert kinds(actions) == ["Send", "Send", "Send", "Send"]
    error = wire(actions[0].message)  # type: ignore[union-attr]
    assert (error["code"], error["prompt_tokens"]) == ("TOKEN_LIMIT_EXCEEDED", 9)
    assert conn.error_count == 0


def test_plaintext_stream() -> None:
    conn = make_conn()
    conn.receive(frame({"type": "session_init", "session_id": "7", "job_id": "7"}))
    conn.receive(frame({"type": "prompt", "prompt": "hi", "session_id": "7", "id": "p"}))
    chunks = [conn.piece("Hello", 1), conn.piece(" there", 2)]
    assert chunks == [StreamChunk("Hello", 1, "p", "7"), StreamChunk(" there", 2, "p", "7")]
    assert encode(chunks[0]) == (
        '{"type":"stream_chunk","content":"Hello","tokens":1,"id":"p","session_id":"7"}'
    )
    frames = conn.finish("stop", prompt_tokens=1)
    assert frames == [StreamEnd("complete", 3, "stop", Usage(1, 3, 4), "p", "7")]


def test_plaintext_stream_without_a_session() -> None:
    conn = make_conn()
    conn.receive(frame({"type": "inference", "request": {"prompt": "hi"}}))
    assert wire(conn.piece("x", 1)) == {"type": "stream_chunk", "content": "x", "tokens": 1}
    actions = conn.fail(NodeError("oops", code=ErrorCode.INFERENCE_FAILED))
    assert [wire(a.message)["type"] for a in actions] == ["error", "stream_end"]  # type: ignore[union-attr]
    assert wire(actions[1].message)["reason"] == "error"  # type: ignore[union-attr]
