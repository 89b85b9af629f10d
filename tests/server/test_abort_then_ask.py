"""Abort, then ask again: the SDK's stop-and-retry sequence through the real driver.

When a user stops an answer the SDK sends ``stream_cancel`` and, without waiting for
``stream_end``, a new ``encrypted_session_init`` (with a fresh session key) and the next
prompt. The node holds those frames until the cancelled stream has ended, then handles
them in order: the client sees the cancelled answer's end, the ack, and the new answer,
and no error.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from node.inference.base import Backend, Emit, GenerationRequest, GenerationResult, ModelInfo
from node.inference.echo import EchoBackend
from node.protocol.connection import (
    HOLD_TIMEOUT_S,
    MAX_HELD_FRAMES,
    ConnectionState,
    ProtocolConfig,
)
from node.server.context import NodeContext
from tests.server._support import (
    ClientSession,
    WsClient,
    build_node,
    init_frame,
    memory_client,
    ws_client,
)
from tests.server.conftest import NodeFactory

ROUNDS = 100
WORDS = " ".join(f"w{i}" for i in range(200))


class SlowStop:
    """A backend that needs ``stop_s`` to stop after a cancel, as a model thread finishing
    its current token does: the cancelled stream is still ending when the SDK's next
    frames arrive."""

    def __init__(self, inner: Backend, stop_s: float, *later_stops_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.stops = [stop_s, *later_stops_s]  # per generation; the last one repeats

    def models(self) -> list[ModelInfo]:
        return self.inner.models()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        try:
            return await self.inner.generate(request, emit)
        except trio.Cancelled:
            stop_s = self.stops.pop(0) if len(self.stops) > 1 else self.stops[0]
            with trio.CancelScope(shield=True):
                await trio.sleep(stop_s)
            raise


def count_releases(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts frames the driver handled after holding them."""
    released = [0]
    original = ConnectionState.release_held

    def counting(self: ConnectionState) -> Any:
        result = original(self)
        if result is not None:
            released[0] += 1
        return result

    monkeypatch.setattr(ConnectionState, "release_held", counting)
    return released


def lift_init_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    original = NodeContext.protocol_config

    def generous(self: NodeContext) -> ProtocolConfig:
        return attrs.evolve(original(self), init_burst=ROUNDS + 1)

    monkeypatch.setattr(NodeContext, "protocol_config", generous)


async def sdk_abort_and_ask(
    c: WsClient, host: bytes, old: ClientSession, old_id: str, new_id: str
) -> tuple[ClientSession, dict[str, Any]]:
    """The SDK's burst, then what the client must see: the cancelled answer's end, the
    ack of the new init, and the first chunk of the new answer. Returns the new session
    and the cancelled answer's stream_end."""
    init, new = init_frame(host, session_id=old.session_id, client_key=old.client_key)
    for frame in (
        {"type": "stream_cancel", "session_id": old.session_id},
        init,
        new.message_frame({"prompt": WORDS}, request_id=new_id),
    ):
        await c.send(frame)
    cancelled = await c.collect(old, request_id=old_id, skip_chunks=1)
    assert cancelled.errors == []
    assert cancelled.other == []
    assert cancelled.final_reason == "cancelled"
    ack = await c.expect("session_init_ack")
    assert ack["session_id"] == old.session_id
    assert ack["client_address"] == new.client_address
    first = await c.expect("encrypted_chunk")
    assert first["id"] == new_id
    assert first["payload"]["index"] == 0
    return new, cancelled.end


async def test_sdk_abort_then_ask_100_times_over_a_socket(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = count_releases(monkeypatch)
    # The SDK re-inits before every prompt. A person stops and asks again at most about
    # once a second, which the per-connection init allowance (a burst of 10, refilled at
    # one per second) serves; this test goes 50 times faster, so it lifts the allowance,
    # and the node-wide one of its network address (a burst of 60, 5 per second) too.
    lift_init_allowance(monkeypatch)
    node = await node_factory.start(
        backend=SlowStop(EchoBackend(delay_s=0.005), stop_s=0.01), address_init_burst=0
    )
    answers = 0
    with trio.fail_after(120):
        async with ws_client(node) as c:
            _, session = await c.init(node.host_public_key, session_id="7")
            await c.send(session.message_frame({"prompt": WORDS}, request_id="r0"))
            assert (await c.expect("encrypted_chunk"))["id"] == "r0"
            for i in range(1, ROUNDS + 1):
                session, end = await sdk_abort_and_ask(
                    c, node.host_public_key, session, f"r{i - 1}", f"r{i}"
                )
                assert end["reason"] == "cancelled"
                answers += 1
            # The last answer runs to its end.
            last = await c.collect(session, request_id=f"r{ROUNDS}", skip_chunks=1)
            assert last.errors == []
            assert last.final_reason == "stop"
            assert WORDS.endswith(last.text)
            await c.ping()
    assert answers == ROUNDS
    assert sum(node.ctx.metrics.errors.values()) == 0
    assert node.ctx.metrics.inits_accepted["encrypted"] == ROUNDS + 1
    assert node.ctx.metrics.requests["cancelled"] == ROUNDS
    # The frames really waited (the init and the prompt of most rounds).
    assert released[0] > 0


async def test_held_frames_wait_for_the_stream_end_and_pings_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(backend=SlowStop(EchoBackend(delay_s=1.0), stop_s=5.0))
    with trio.fail_after(600):
        async with memory_client(node) as c:
            _, session = await c.init(node.host_public_key, session_id="3")
            await c.send(session.message_frame({"prompt": WORDS}, request_id="a"))
            await c.expect("encrypted_chunk")
            init, new = init_frame(node.host_public_key, session_id="3")
            cancelled_at = trio.current_time()
            await c.send({"type": "stream_cancel", "session_id": "3"})
            await c.send(init)
            await c.send(new.message_frame({"prompt": "again"}, request_id="b"))
            await c.send({"type": "ping", "id": "p"})
            # The ping is answered at once, before the stopping stream's end.
            assert await c.recv() == {"type": "pong", "id": "p"}
            assert trio.current_time() - cancelled_at < 5.0
            cancelled = await c.collect(session, request_id="a", skip_chunks=1)
            assert trio.current_time() - cancelled_at >= 5.0
            assert cancelled.errors == cancelled.other == []
            assert cancelled.end["reason"] == "cancelled"
            await c.expect("session_init_ack")
            answer = await c.collect(new, request_id="b")
            assert answer.text == "again"
            assert answer.errors == []
    metrics = node.ctx.metrics
    assert metrics.inits_accepted["encrypted"] == 2  # the held init counted once
    assert sum(metrics.inits_refused.values()) == 0
    assert sum(metrics.errors.values()) == 0


async def test_a_stream_that_does_not_end_in_time_refuses_the_held_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stop_s = 60.0
    node = build_node(backend=SlowStop(EchoBackend(delay_s=1.0), stop_s=stop_s))
    with trio.fail_after(600):
        async with memory_client(node) as c:
            _, session = await c.init(node.host_public_key, session_id="3")
            await c.send(session.message_frame({"prompt": WORDS}, request_id="a"))
            await c.expect("encrypted_chunk")
            init, new = init_frame(node.host_public_key, session_id="3", request_id="i")
            cancelled_at = trio.current_time()
            await c.send({"type": "stream_cancel", "session_id": "3"})
            await c.send(init)
            await c.send(new.message_frame({"prompt": "again"}, request_id="b"))
            first = await c.expect("error", within_s=HOLD_TIMEOUT_S * 2)
            assert (first["code"], first["id"]) == ("REQUEST_IN_PROGRESS", "i")
            assert trio.current_time() - cancelled_at == pytest.approx(HOLD_TIMEOUT_S)
            assert "did not end within" in first["message"]
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="b")
            # Still the same stopping stream: a new request is refused at once.
            await c.send(init_frame(node.host_public_key, session_id="4", request_id="j")[0])
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="j")
            cancelled = await c.collect(session, request_id="a", skip_chunks=1, within_s=stop_s)
            assert trio.current_time() - cancelled_at >= stop_s
            assert cancelled.end["reason"] == "cancelled"
            # The connection goes on: the client sends its frames again.
            _, again = await c.init(node.host_public_key, session_id="3")
            assert (await c.ask(again, "after the stop")).text == "after the stop"
    assert node.ctx.metrics.errors["REQUEST_IN_PROGRESS"] == 3


async def test_a_second_hold_gets_its_own_full_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One timer per connection follows the holds: a hold that begins while the timer of
    an earlier one still runs times out 10 s after it began, not earlier or never."""
    node = build_node(backend=SlowStop(EchoBackend(delay_s=1.0), 5.0, 60.0))
    with trio.fail_after(600):
        async with memory_client(node) as c:
            _, first = await c.init(node.host_public_key, session_id="3")
            await c.send(first.message_frame({"prompt": WORDS}, request_id="a"))
            await c.expect("encrypted_chunk")
            # Round 1: the stream stops within 5 s, so the held frames go through.
            init, second = init_frame(node.host_public_key, session_id="3")
            for frame in (
                {"type": "stream_cancel"},
                init,
                second.message_frame({"prompt": WORDS}, request_id="b"),
            ):
                await c.send(frame)
            await c.collect(first, request_id="a", skip_chunks=1)
            await c.expect("session_init_ack")
            await c.expect("encrypted_chunk")
            # Round 2, still inside round 1's 10 s: this stream takes 60 s to stop.
            init, third = init_frame(node.host_public_key, session_id="3", request_id="i3")
            cancelled_at = trio.current_time()
            for frame in (
                {"type": "stream_cancel"},
                init,
                third.message_frame({"prompt": "c"}, request_id="c"),
            ):
                await c.send(frame)
            refused = await c.expect("error", within_s=HOLD_TIMEOUT_S * 2)
            assert (refused["code"], refused["id"]) == ("REQUEST_IN_PROGRESS", "i3")
            assert trio.current_time() - cancelled_at == pytest.approx(HOLD_TIMEOUT_S)
            await c.expect_error("REQUEST_IN_PROGRESS", request_id="c")
            ended = await c.collect(second, request_id="b", skip_chunks=1, within_s=120)
            assert ended.end["reason"] == "cancelled"


async def test_too_many_held_frames_are_refused_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(backend=SlowStop(EchoBackend(delay_s=1.0), stop_s=5.0), max_errors=100)
    with trio.fail_after(600):
        async with memory_client(node) as c:
            _, session = await c.init(node.host_public_key, session_id="3")
            await c.send(session.message_frame({"prompt": WORDS}, request_id="a"))
            await c.expect("encrypted_chunk")
            await c.send({"type": "stream_cancel"})
            for i in range(1, MAX_HELD_FRAMES + 2):
                await c.send(session.message_frame({"prompt": f"m{i}"}, request_id=f"m{i}"))
            # The 17th is refused at once, while the cancelled stream is still stopping.
            await c.expect_error("RATE_LIMITED", request_id=f"m{MAX_HELD_FRAMES + 1}")
            cancelled = await c.collect(session, request_id="a", skip_chunks=1)
            assert cancelled.end["reason"] == "cancelled"
            # Then the held ones in order: m1 streams, m2..m16 meet it streaming.
            answer = await c.collect(session, request_id="m1")
            assert answer.text == "m1"
            refused = [(e["code"], e["id"]) for e in answer.errors]
            assert refused == [
                ("REQUEST_IN_PROGRESS", f"m{i}") for i in range(2, MAX_HELD_FRAMES + 1)
            ]
            await c.ping()
