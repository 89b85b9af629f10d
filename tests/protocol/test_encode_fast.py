"""The direct writers for per-piece frames give exactly the converter's bytes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from node.protocol.messages import (
    ChunkPayload,
    EncryptedChunk,
    SessionInitAck,
    StreamChunk,
    encode,
    encode_generic,
)

ids = st.none() | st.text(max_size=40) | st.integers(-(2**63), 2**64 - 1)
session_ids = st.none() | st.integers(0, 2**64).map(str)


@given(
    ciphertext=st.binary(min_size=16, max_size=64),
    nonce=st.binary(min_size=24, max_size=24),
    index=st.none() | st.integers(0, 10**6),
    tokens=st.integers(0, 1000),
    request_id=ids,
    session_id=session_ids,
    final=st.booleans(),
)
def test_encrypted_chunk_fast_path_matches(
    ciphertext: bytes,
    nonce: bytes,
    index: int | None,
    tokens: int,
    request_id: str | int | None,
    session_id: str | None,
    final: bool,
) -> None:
    aad = b"chunk_%d" % (index or 0)
    frame = EncryptedChunk(
        tokens, ChunkPayload(ciphertext, nonce, aad, index), request_id, session_id, final
    )
    text = encode(frame)
    assert text == encode_generic(frame)
    assert json.loads(text)["payload"]["ciphertextHex"] == ciphertext.hex()


@given(
    session_id=st.integers(0, 2**64).map(str),
    job_id=st.none() | st.integers(0, 10**78 - 1),
    chain_id=st.integers(1, 2**63 - 1),
    message=st.text(max_size=60),
    address=st.none() | st.text(max_size=42),
    request_id=ids,
    status=st.sampled_from(["success", "ok"]),
)
def test_session_init_ack_fast_path_matches(
    session_id: str,
    job_id: int | None,
    chain_id: int,
    message: str,
    address: str | None,
    request_id: str | int | None,
    status: str,
) -> None:
    ack = SessionInitAck(session_id, job_id, chain_id, message, address, request_id, status)
    text = encode(ack)
    assert text == encode_generic(ack)
    assert text.isascii()
    assert json.loads(text)["job_id"] == job_id


@given(
    content=st.text(max_size=60),
    tokens=st.integers(0, 1000),
    request_id=ids,
    session_id=session_ids,
)
def test_stream_chunk_fast_path_matches(
    content: str, tokens: int, request_id: str | int | None, session_id: str | None
) -> None:
    frame = StreamChunk(content, tokens, request_id, session_id)
    text = encode(frame)
    assert text == encode_generic(frame)
    assert text.isascii()


@given(
    pieces=st.lists(st.tuples(st.text(max_size=30), st.integers(0, 5)), min_size=1, max_size=8),
    encrypted=st.booleans(),
    request_id=ids,
)
def test_piece_text_is_the_encoded_piece(
    pieces: list[tuple[str, int]], encrypted: bool, request_id: str | int | None
) -> None:
    """The sender's hot path writes exactly the frames piece() + encode() would."""
    import random

    from node.crypto.secret import SecretBytes
    from node.protocol.connection import ActiveRequest, ConnectionState, Session
    from node.protocol.replay import InitReplayCache

    def machine() -> ConnectionState:
        rng = random.Random(7)
        state = ConnectionState(
            host_key=None,
            replay_cache=InitReplayCache(window_s=1, clock=lambda: 0.0),
            clock=lambda: 0.0,
            rng=rng.randbytes,
        )
        key = SecretBytes(bytes(range(32))) if encrypted else None
        session = Session("9", 9, 84532, encrypted, 0.0, key=key)
        state.active = ActiveRequest(session, request_id)
        return state

    slow, fast = machine(), machine()
    for text, tokens in pieces:
        assert fast.piece_text(text, tokens) == encode(slow.piece(text, tokens))
    assert fast.active is not None
    assert slow.active is not None
    assert fast.active.completion_tokens == slow.active.completion_tokens
    assert fast.active.next_chunk == slow.active.next_chunk
