"""Replay: a captured frame sent again is refused, on the node and in our client.

Node side (PROTOCOL.md sections 3.6 and 4): an ``encrypted_session_init`` is accepted once
per replay window, node-wide (same connection or a new one, whatever SEC1 spelling of the
ephemeral key); an ``encrypted_message`` is accepted once per key (its ``message_<k>``
index must grow). Client side: a chunk captured from one answer and fed into another
answer (same session, another request; or another session) is never shown as text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from coincurve import PublicKey

from node.client import ChunkAuthenticationFailed, ChunkOutOfOrder, ClientError, open_session
from node.inference.echo import EchoBackend
from tests.client._hostile import Exchange, HostileNode, memory_websocket
from tests.server._support import CancelProbe

from ._support import build_node, init_frame, memory_client, with_payload

GUARD_S = 30


# ------------------------------------------------------------------ session init


async def test_the_same_init_twice_on_one_connection_is_refused() -> None:
    node = build_node()
    frame, session = init_frame(node.host_public_key, session_id="7")
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            await client.send(frame)
            await client.expect("session_init_ack")
            [key] = node.held_keys()
            await client.send(frame)
            await client.expect_error("REPLAY_DETECTED")
            # The replay changed nothing: same key object, still live, still usable.
            assert node.held_keys() == [key]
            assert not key.wiped
            result = await client.ask(session, "still the first key")
            assert result.text == "still the first key"


async def test_the_same_init_on_a_new_connection_is_refused() -> None:
    node = build_node()
    frame, _ = init_frame(node.host_public_key, session_id="7")
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as first:
            await first.send(frame)
            await first.expect("session_init_ack")
        await node.wait_no_connections()
        async with memory_client(node) as second:
            await second.send(frame)
            await second.expect_error("REPLAY_DETECTED")
            assert node.held_keys() == []
            await second.ping()
    assert node.ctx.metrics.inits_accepted["encrypted"] == 1
    assert node.ctx.metrics.inits_refused["REPLAY_DETECTED"] == 1


def _other_spellings(eph_hex: str) -> list[str]:
    """The same x-coordinate written as the other compressed parity (the point -E, whose
    ECDH x-coordinate with the host key is the same) and both uncompressed forms."""
    point = PublicKey(bytes.fromhex(eph_hex))
    compressed = point.format(compressed=True)
    negated = bytes((compressed[0] ^ 1,)) + compressed[1:]
    return [
        negated.hex(),
        point.format(compressed=False).hex(),
        PublicKey(negated).format(compressed=False).hex(),
    ]


@pytest.mark.parametrize("with_recovery_key", [True, False])
async def test_a_replayed_init_respelled_is_still_a_replay(with_recovery_key: bool) -> None:
    """Without ``recoveryPublicKey`` nothing but the replay cache stops this one: -E opens
    the same ciphertext, and the signature then recovers some other (valid) key."""
    node = build_node()
    frame, _ = init_frame(
        node.host_public_key, session_id="7", include_recovery_key=with_recovery_key
    )
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as first:
            await first.send(frame)
            await first.expect("session_init_ack")
        for spelling in _other_spellings(frame["payload"]["ephPubHex"]):
            async with memory_client(node) as later:
                await later.send(with_payload(frame, ephPubHex=spelling))
                reply = await later.expect("error")
                assert reply["code"] in {"REPLAY_DETECTED", "INVALID_SIGNATURE"}, reply
                if not with_recovery_key:
                    assert reply["code"] == "REPLAY_DETECTED"
                assert node.held_keys() == []
    assert node.ctx.metrics.inits_accepted["encrypted"] == 1


# ------------------------------------------------------------------ encrypted messages


async def test_the_same_encrypted_message_twice_runs_once() -> None:
    probe = CancelProbe(EchoBackend())
    node = build_node(backend=probe)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="3")
            frame = session.message_frame({"prompt": "only once please"}, request_id="a")
            await client.send(frame)
            first = await client.collect(session, request_id="a")
            assert first.text == "only once please"
            await client.send(frame)
            error = await client.expect_error("REPLAY_DETECTED", request_id="a")
            assert error["session_id"] == "3"
            await client.ping()  # nothing else came: no chunk, no stream_end
    assert len(probe.calls) == 1


async def test_an_older_message_after_a_newer_one_is_refused() -> None:
    probe = CancelProbe(EchoBackend())
    node = build_node(backend=probe)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="3")
            m0 = session.message_frame({"prompt": "zero"}, index=0, request_id="m0")
            m1 = session.message_frame({"prompt": "one, never sent"}, index=1, request_id="m1")
            m5 = session.message_frame({"prompt": "five"}, index=5, request_id="m5")
            await client.send(m0)
            assert (await client.collect(session, request_id="m0")).text == "zero"
            # Skipping ahead is allowed (k >= next expected) ...
            await client.send(m5)
            assert (await client.collect(session, request_id="m5")).text == "five"
            # ... but an index below the next expected one (6) is a replay, even when the
            # frame itself was never seen before.
            await client.send(m1)
            await client.expect_error("REPLAY_DETECTED", request_id="m1")
            await client.send(m0)
            await client.expect_error("REPLAY_DETECTED", request_id="m0")
            m6 = session.message_frame({"prompt": "six"}, index=6, request_id="m6")
            await client.send(m6)
            assert (await client.collect(session, request_id="m6")).text == "six"
    assert [c.prompt for c in probe.calls] == ["zero", "five", "six"]


async def test_a_message_from_before_a_reinit_does_not_open_under_the_new_key() -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            _, old = await client.init(node.host_public_key, session_id="3")
            captured = old.message_frame({"prompt": "old"}, request_id="old")
            await client.send(captured)
            await client.collect(old, request_id="old")
            # Re-init: new key, counter back to 0, so message_0 is "new" again by index.
            _, new = await client.init(node.host_public_key, session_id="3")
            await client.send(captured)
            await client.expect_error("DECRYPTION_FAILED", request_id="old")
            assert (await client.ask(new, "new key works", request_id="n")).text == (
                "new key works"
            )


# ------------------------------------------------------------------ our client


class ChunkRecorder:
    """A hostile node's memory: chunk and response frames it sent, per request."""

    def __init__(self) -> None:
        self.frames: list[list[str]] = []


def _rewrite(frame: str, ex: Exchange) -> str:
    """A captured frame re-addressed to the current request and session (the ids travel
    in plaintext, so a network attacker can rewrite them at will)."""
    obj: dict[str, Any] = json.loads(frame)
    obj["id"] = ex.request_id
    obj["session_id"] = ex.session_id
    return json.dumps(obj)


def _replaying_script(recorder: ChunkRecorder, replay: list[tuple[int, int]]) -> Any:
    """First request: honest ("A", "B", final, response, end), recorded. Later requests:
    each ``(request, frame)`` in ``replay`` is a recorded frame sent in the position of
    the same frame of this answer, the rest honest."""

    async def script(ex: Exchange) -> None:
        honest = [ex.chunk(0, "A"), ex.chunk(1, "B"), *ex.honest_tail(2, completion=2)]
        current = len(recorder.frames)
        recorder.frames.append(honest)
        frames = list(honest)
        for source_request, position in replay:
            if current > source_request:
                frames[position] = _rewrite(recorder.frames[source_request][position], ex)
        await ex.send(*frames)

    return script


@pytest.mark.parametrize(
    ("position", "what"),
    [(0, "first chunk"), (1, "second chunk"), (2, "final chunk"), (3, "encrypted_response")],
)
async def test_our_client_refuses_a_chunk_replayed_into_the_next_request(
    position: int, what: str
) -> None:
    """Same session key, same AAD ``chunk_<i>``: only the nonce tells the frames apart."""
    recorder = ChunkRecorder()
    node = HostileNode(_replaying_script(recorder, [(0, position)]))
    caught: ClientError | None = None
    texts: list[str] = []
    with trio.fail_after(GUARD_S):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=5,
            ) as session,
        ):
            first = await session.complete("one")
            assert first.text == "AB"
            try:
                async for piece in session.stream("two"):
                    texts.append(piece)
            except ClientError as exc:
                caught = exc
            assert session.closed  # a replay breaks the session: its key is wiped
    assert isinstance(caught, ChunkOutOfOrder), (what, caught)
    assert "replay" in caught.message
    assert texts == ["A", "B"][:position]


async def test_our_client_refuses_a_chunk_replayed_from_another_session() -> None:
    """Another session has another key: the replayed chunk fails authentication."""
    recorder = ChunkRecorder()
    node = HostileNode(_replaying_script(recorder, [(0, 0)]))
    caught: ClientError | None = None
    with trio.fail_after(GUARD_S):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=5,
            ) as first,
        ):
            assert (await first.complete("one")).text == "AB"
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=6,
            ) as second,
        ):
            try:
                await second.complete("two")
            except ClientError as exc:
                caught = exc
    assert len(node.session_keys) == 2
    assert node.session_keys[0] != node.session_keys[1]
    assert isinstance(caught, ChunkAuthenticationFailed), caught


async def test_our_clients_replay_memory_is_bounded_by_reinit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_NONCES_PER_KEY remembered nonces the next request runs under a new key
    (which starts an empty set), so a long session does not grow without bound."""
    import node.client.session as client_session

    monkeypatch.setattr(client_session, "MAX_NONCES_PER_KEY", 6)
    node = HostileNode(_replaying_script(ChunkRecorder(), []))
    with trio.fail_after(GUARD_S):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=5,
            ) as session,
        ):
            # Each answer is 4 sealed frames (A, B, final chunk, encrypted_response).
            for _ in range(5):
                assert (await session.complete("x")).text == "AB"
                assert len(session._seen_nonces) <= 6 + 4
            assert session.inits == 3  # the first init, then one before requests 3 and 5
    assert len(node.session_keys) == 3
