"""Overload: chunk senders coalesce more, and never stop sending (MockClock, memory streams).

The event loop's backlog is injected (``NodeContext.loop_load``), so the test decides
when the node counts as overloaded; no real time passes.
"""

from __future__ import annotations

import trio
import trio.testing

from node.crypto import aead
from node.inference.echo import EchoBackend
from node.server.driver import (
    CONGESTED_MAX_WAIT_S,
    CONGESTED_RUNNABLE,
    congestion_wait,
)
from tests.server._support import build_node, memory_client

WORDS = " ".join(f"w{i}" for i in range(40))


def test_congestion_wait_grows_with_the_backlog_and_is_capped() -> None:
    assert congestion_wait(0) == 0.0
    assert congestion_wait(CONGESTED_RUNNABLE - 1) == 0.0
    low = congestion_wait(CONGESTED_RUNNABLE)
    assert 0.0 < low < CONGESTED_MAX_WAIT_S
    assert low < congestion_wait(CONGESTED_RUNNABLE * 4) <= CONGESTED_MAX_WAIT_S
    assert congestion_wait(10**9) == CONGESTED_MAX_WAIT_S


async def _stream(load: int) -> tuple[list[int], list[float]]:
    """40 pieces, one every 10 ms (mock time): token counts and arrival times of the data
    frames; the decrypted text must be the prompt, whatever the framing."""
    node = build_node(backend=EchoBackend(delay_s=0.01))
    node.ctx.loop_load = lambda: load
    tokens: list[int] = []
    times: list[float] = []
    text = ""
    with trio.fail_after(300):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="1")
            await client.send(session.message_frame({"prompt": WORDS}, request_id="r"))
            started = trio.current_time()
            while True:
                m = await client.recv()
                if m["type"] == "encrypted_chunk" and not m.get("final"):
                    p = m["payload"]
                    text += aead.open(
                        session.key,
                        bytes.fromhex(p["nonceHex"]),
                        bytes.fromhex(p["ciphertextHex"]),
                        bytes.fromhex(p["aadHex"]),
                    ).decode()
                    tokens.append(m["tokens"])
                    times.append(trio.current_time() - started)
                elif m["type"] == "stream_end":
                    assert m["reason"] == "complete"
                    assert m["usage"]["completion_tokens"] == 40
                    break
    assert text == WORDS
    return tokens, times


async def test_without_backlog_every_piece_is_its_own_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens, _ = await _stream(load=0)
    assert tokens == [1] * 40


async def test_overloaded_senders_coalesce_but_keep_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens, times = await _stream(load=100_000)
    assert sum(tokens) == 40
    # A frame at most every CONGESTED_MAX_WAIT_S (+ one piece's 10 ms): several pieces
    # per frame, and no stream goes quiet for longer than that.
    assert len(tokens) < 40
    assert max(tokens) > 1
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert max(gaps) <= CONGESTED_MAX_WAIT_S + 0.01 + 1e-6
