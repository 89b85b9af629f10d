"""Isolation: a connection's sessions are its own. A session id (and a valid frame for it)
from connection A does nothing on connection B, a cancel from B never touches A's stream,
and the chunks of two sessions streaming side by side never open under each other's key.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from node.crypto import aead
from node.crypto.errors import DecryptionFailed
from node.inference.echo import EchoBackend
from tests.server._support import CancelProbe, GatedBackend

from ._support import ClientSession, WsClient, build_node, memory_client

GUARD_S = 60


async def test_a_session_id_from_another_connection_is_not_found() -> None:
    probe = CancelProbe(EchoBackend())
    node = build_node(backend=probe)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as a, memory_client(node) as b:
            _, session = await a.init(node.host_public_key, session_id="11")
            frame = session.message_frame({"prompt": "for A only"}, request_id="x")
            await b.send(frame)
            error = await b.expect_error("SESSION_KEY_NOT_FOUND", request_id="x")
            assert error["session_id"] == "11"
            await b.ping()
            assert probe.calls == []
            # B's attempt consumed nothing of A's: the same frame still works on A.
            await a.send(frame)
            assert (await a.collect(session, request_id="x")).text == "for A only"


async def test_the_same_session_id_on_two_connections_uses_two_keys() -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as a, memory_client(node) as b:
            _, on_a = await a.init(node.host_public_key, session_id="11")
            _, on_b = await b.init(node.host_public_key, session_id="11")
            await b.send(on_a.message_frame({"prompt": "A's words"}, request_id="x"))
            await b.expect_error("DECRYPTION_FAILED", request_id="x")
            # B's own counter did not move: its message_0 is still accepted.
            assert (await b.ask(on_b, "B's words", request_id="y")).text == "B's words"
            assert (await a.ask(on_a, "A's words", request_id="z")).text == "A's words"


async def test_a_cancel_from_another_connection_does_not_touch_a_stream() -> None:
    gated = GatedBackend()
    node = build_node(backend=gated)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as a, memory_client(node) as b:
            _, session = await a.init(node.host_public_key, session_id="11")
            await a.send(session.message_frame({"prompt": "p"}, request_id="x"))
            await gated.streaming.wait()
            await b.send({"type": "stream_cancel", "session_id": "11", "reason": "evil"})
            await b.ping()  # B's cancel was handled (ignored) before its pong
            assert not gated.cancelled.is_set()
            gated.release.set()
            result = await a.collect(session, request_id="x")
    assert result.text == "first second"
    assert result.final_reason == "stop"


async def _stream_raw(
    client: WsClient, session: ClientSession, prompt: str, request_id: str
) -> list[dict[str, Any]]:
    """Send one prompt; return the sealed payloads (chunks and response) as they came."""
    await client.send(session.message_frame({"prompt": prompt}, request_id=request_id))
    sealed: list[dict[str, Any]] = []
    for _ in range(10_000):
        frame = await client.recv()
        assert frame.get("id") == request_id, frame
        if frame["type"] in ("encrypted_chunk", "encrypted_response"):
            sealed.append(frame["payload"])
        elif frame["type"] == "stream_end":
            return sealed
        else:
            raise AssertionError(frame)
    raise AssertionError("no stream_end")


def _opens(key: bytes, payload: dict[str, Any]) -> bool:
    try:
        aead.open(
            key,
            bytes.fromhex(payload["nonceHex"]),
            bytes.fromhex(payload["ciphertextHex"]),
            bytes.fromhex(payload["aadHex"]),
        )
    except DecryptionFailed:
        return False
    return True


async def test_concurrent_sessions_never_open_each_others_chunks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two connections stream at once (pieces 10 ms apart in virtual time, so their
    frames interleave); a third connection holds two sessions one after the other."""
    node = build_node(backend=EchoBackend(delay_s=0.01))
    words = " ".join(f"w{i}" for i in range(60))
    sealed: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, bytes] = {}
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as a, memory_client(node) as b, memory_client(node) as c:
            _, sa = await a.init(node.host_public_key, session_id="1")
            _, sb = await b.init(node.host_public_key, session_id="1")
            _, sc1 = await c.init(node.host_public_key, session_id="1")
            _, sc2 = await c.init(node.host_public_key, session_id="2")
            keys = {"a": sa.key, "b": sb.key, "c1": sc1.key, "c2": sc2.key}

            async def run(name: str, client: WsClient, session: ClientSession) -> None:
                sealed[name] = await _stream_raw(client, session, f"{name} {words}", name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "a", a, sa)
                nursery.start_soon(run, "b", b, sb)
            await run("c1", c, sc1)
            await run("c2", c, sc2)
    assert len(set(keys.values())) == 4
    for owner, payloads in sealed.items():
        assert len(payloads) >= 3
        for payload in payloads:
            opened_by = {name for name, key in keys.items() if _opens(key, payload)}
            assert opened_by == {owner}
