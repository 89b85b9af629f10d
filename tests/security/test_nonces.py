"""Nonces and keys: the node seals every chunk under a fresh nonce from the OS CSPRNG
(XChaCha20's 192-bit nonces make random ones safe), and distinct sessions hold distinct
keys in distinct buffers.
"""

from __future__ import annotations

import json
import os

import trio

from node.client import open_session
from node.crypto import aead
from node.crypto.hostkey import HostKey
from node.protocol import StartRequest
from node.protocol.messages import EncryptedChunk, EncryptedResponse
from node.server.driver import ConnectionDriver

from ._support import (
    DEV_HOST_KEY_HEX,
    build_node,
    init_frame,
    memory_websocket,
    protocol_state,
    receive_text,
)

HOST = HostKey.parse(DEV_HOST_KEY_HEX)
CHUNKS = 100_000
GUARD_S = 60


def test_100k_chunks_sealed_by_the_node_never_repeat_a_nonce() -> None:
    state = protocol_state(HOST)
    # The default rng is the OS CSPRNG itself, and a node's context sets no other.
    assert state._rng is os.urandom
    assert build_node().ctx.rng is None
    init, session = init_frame(HOST.public_key, session_id="1")
    receive_text(state, json.dumps(init))
    actions = receive_text(state, json.dumps(session.message_frame("go", index=0)))
    assert any(isinstance(a, StartRequest) for a in actions)
    nonces: set[bytes] = set()
    for i in range(CHUNKS):
        chunk = state.piece("x", 1)
        assert isinstance(chunk, EncryptedChunk)
        payload = chunk.payload
        assert payload.index == i
        nonces.add(payload.nonce)
        if i % 1_000 == 0:  # a sample opens under the session key and chunk_<i>
            plain = aead.open(session.key, payload.nonce, payload.ciphertext, b"chunk_%d" % i)
            assert plain == b"x"
    tail = state.finish("stop", prompt_tokens=1)
    for frame in tail:
        if isinstance(frame, EncryptedChunk | EncryptedResponse):
            nonces.add(frame.payload.nonce)
    assert len(nonces) == CHUNKS + 2
    assert all(len(n) == 24 for n in nonces)


def test_two_sessions_on_one_connection_hold_distinct_keys() -> None:
    state = protocol_state(HOST)
    for sid in ("1", "2"):
        init, _ = init_frame(HOST.public_key, session_id=sid)
        receive_text(state, json.dumps(init))
    k1, k2 = (state.sessions[s].key for s in ("1", "2"))
    assert k1 is not None
    assert k2 is not None
    assert k1.buffer_for_tests() is not k2.buffer_for_tests()
    assert not k1.equals(k2)


async def test_our_client_uses_a_fresh_random_key_per_session_and_reinit() -> None:
    """Twenty sessions through node.client, each re-initialised once: 40 distinct keys,
    each held by the node in its own buffer, each equal to the client's."""
    node = build_node()
    client_keys: list[bytes] = []
    node_keys: list[bytes] = []
    buffers: list[bytearray] = []  # kept alive, so their ids cannot be reused
    with trio.fail_after(GUARD_S):
        for job in range(20):
            async with (
                memory_websocket(node) as ws,
                open_session(
                    "ws://memory/v1/ws",
                    websocket=ws,
                    host_public_key=node.host_public_key,
                    model="echo",
                    job_id=job,
                ) as session,
            ):
                for round_ in range(2):
                    if round_:
                        await session.reinit()
                    assert session._key is not None
                    client_keys.append(session._key.reveal())
                    [held] = node.held_keys()
                    assert held.equals(session._key)
                    node_keys.append(held.reveal())
                    buffers.append(held.buffer_for_tests())
                assert (await session.complete("still works")).text == "still works"
            await node.wait_no_connections()
    assert len(set(client_keys)) == 40
    assert node_keys == client_keys
    assert len({id(b) for b in buffers}) == 40


async def test_the_driver_takes_the_os_csprng_unless_a_test_injects_one() -> None:
    node = build_node()

    class _NoSocket:
        pass

    driver = ConnectionDriver(node.ctx, _NoSocket(), 1)  # type: ignore[arg-type]
    assert driver.state._rng is os.urandom
