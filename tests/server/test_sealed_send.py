"""A frame the node has sealed is sent even when its request is cancelled meanwhile.

Sealing uses up the next nonce (v2) or chunk index (v1); a sealed frame that a cancel
dropped would make the peer's next record fail authentication.
"""

from __future__ import annotations

from types import SimpleNamespace

import trio

from node.server.driver import SEALED_SEND_S, StreamingDriver


class _Ws:
    def __init__(self, *, stuck: bool = False) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.stuck = stuck

    async def send_message(self, frame: bytes) -> None:
        await trio.lowlevel.checkpoint()  # where a pending cancel would land
        if self.stuck:
            await trio.sleep_forever()
        self.sent.append(frame)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


async def test_a_cancel_does_not_drop_a_sealed_frame() -> None:
    ws = _Ws()
    with trio.CancelScope() as scope:
        scope.cancel()
        sent = await StreamingDriver._send_sealed(SimpleNamespace(ws=ws), b"sealed")  # type: ignore[arg-type]
    assert sent is True
    assert ws.sent == [b"sealed"]
    assert not ws.closed


async def test_a_send_that_cannot_finish_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ws = _Ws(stuck=True)
    started = trio.current_time()
    with trio.CancelScope() as scope:
        scope.cancel()
        sent = await StreamingDriver._send_sealed(SimpleNamespace(ws=ws), b"sealed")  # type: ignore[arg-type]
    assert sent is False
    assert ws.closed
    assert ws.sent == []
    assert trio.current_time() - started >= SEALED_SEND_S
