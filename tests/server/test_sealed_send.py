"""A frame the node has sealed is sent even when its request is cancelled meanwhile.

Sealing uses up the next nonce (v2) or chunk index (v1); a sealed frame that a cancel
dropped would make the peer's next record fail authentication. The chunk sender sends in
bursts, each in one shielded scope (not one scope per frame); these tests drive it with
a fake connection and MockClock.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from node.server.driver import SEALED_SEND_S, Piece, StreamingDriver


class _Ws:
    def __init__(self, *, stuck: bool = False, send_s: float = 0.0) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.stuck = stuck
        self.send_s = send_s

    async def send_message(self, frame: bytes) -> None:
        await trio.lowlevel.checkpoint()  # where a pending cancel would land
        if self.stuck:
            await trio.sleep_forever()
        if self.send_s:
            await trio.sleep(self.send_s)
        self.sent.append(frame)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


def _driver(ws: _Ws) -> Any:
    sealed: list[bytes] = []

    def seal(text: str, tokens: int) -> bytes:
        frame = f"{len(sealed)}:{text}".encode()
        sealed.append(frame)
        return frame

    fake = SimpleNamespace(
        ws=ws,
        ctx=SimpleNamespace(
            metrics=SimpleNamespace(chunks=0, tokens=0),
            config=SimpleNamespace(coalesce=False),
        ),
        _seal_piece=seal,
        _text_budget=1 << 16,
        sealed=sealed,
    )
    fake._send_burst = lambda *a: StreamingDriver._send_burst(fake, *a)
    return fake


async def _run_sender(fake: Any, receive: Any, generation: trio.CancelScope) -> None:
    await StreamingDriver._encrypting_sender(fake, receive, generation)


async def test_a_cancel_does_not_drop_a_sealed_frame() -> None:
    ws = _Ws()
    fake = _driver(ws)
    send, receive = trio.open_memory_channel[Piece](16)
    for i in range(5):
        send.send_nowait(Piece(f"p{i}", 1))
    generation = trio.CancelScope()
    with trio.CancelScope() as outer:
        outer.cancel()  # pending before the first send: lands only after the burst
        await _run_sender(fake, receive, generation)
    assert outer.cancelled_caught
    assert ws.sent == fake.sealed  # every frame sealed was sent, in order
    assert len(ws.sent) == 5
    assert fake.ctx.metrics.chunks == 5
    assert not ws.closed


async def test_a_send_that_cannot_finish_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ws = _Ws(stuck=True)
    fake = _driver(ws)
    send, receive = trio.open_memory_channel[Piece](16)
    send.send_nowait(Piece("p", 1))
    generation = trio.CancelScope()
    started = trio.current_time()
    with trio.CancelScope() as outer:
        outer.cancel()
        await _run_sender(fake, receive, generation)
    assert ws.closed
    assert ws.sent == []
    assert generation.cancel_called  # the model is stopped too
    assert SEALED_SEND_S <= trio.current_time() - started <= 2 * SEALED_SEND_S + 1


async def test_a_long_burst_of_quick_sends_is_not_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 60 sends of 1 s each: 6x SEALED_SEND_S in one burst; each send gets its own time.
    ws = _Ws(send_s=1.0)
    fake = _driver(ws)
    send, receive = trio.open_memory_channel[Piece](100)
    for i in range(60):
        send.send_nowait(Piece(f"p{i}", 1))
    send.close()
    generation = trio.CancelScope()
    await _run_sender(fake, receive, generation)
    assert len(ws.sent) == 60
    assert not ws.closed
    assert not generation.cancel_called


async def test_waiting_for_the_model_is_not_a_stuck_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ws = _Ws()
    fake = _driver(ws)
    send, receive = trio.open_memory_channel[Piece](4)
    generation = trio.CancelScope()

    async def slow_model() -> None:
        async with send:
            for i in range(3):
                await send.send(Piece(f"p{i}", 1))
                await trio.sleep(5 * SEALED_SEND_S)  # a long pause between pieces

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_model)
        await _run_sender(fake, receive, generation)
    assert len(ws.sent) == 3
    assert not ws.closed
    assert not generation.cancel_called


async def test_a_closed_connection_stops_the_model() -> None:
    class _Gone(_Ws):
        async def send_message(self, frame: bytes) -> None:
            from trio_websocket import ConnectionClosed

            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(None)

    ws = _Gone()
    fake = _driver(ws)
    send, receive = trio.open_memory_channel[Piece](4)
    send.send_nowait(Piece("p", 1))
    generation = trio.CancelScope()
    await _run_sender(fake, receive, generation)
    assert generation.cancel_called
    assert not ws.closed
