"""Protocol v2 sessions count against ``--max-session-bytes`` like v1 sessions.

Every v2 session reserves ``session_cost`` from the node's one ``SessionMemory`` when
its session record is accepted and gives it back however it ends: the client's CLOSE
record, a fatal error, a cancelled request followed by the end of the connection, a
disconnect, the idle timeout, shutdown. When the budget is spent, the session record
is refused as v1 refuses an init: ``RATE_LIMITED``, "the node holds as much session data
as it may; retry later" (for v2 a refused session is fatal: close 1008).

Sans-I/O tests drive :class:`ServerConnectionV2` directly; the node tests run the real
driver over memory streams under trio's MockClock (no sockets, no real time).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
import trio.testing
from coincurve import PrivateKey
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from node.crypto.errors import ErrorCode
from node.crypto.hostkey import HostKey
from node.protocol.connection import SESSION_OVERHEAD_BYTES, Close, SessionMemory, session_cost
from node.protocol.v2 import ClientConnectionV2, Event
from node.protocol.v2.client import (
    Chunk,
    End,
    ErrorReceived,
    HandshakeComplete,
    SessionAccepted,
)
from node.protocol.v2.server import Send, ServerConnectionV2
from node.protocol.v2.session import SessionTerms
from tests.server._support import (
    GatedBackend,
    RunningNode,
    build_node,
    init_frame,
    memory_client,
)
from tests.server._v2 import flip_last_byte

GUARD_S: Final = 600  # virtual seconds (MockClock)
TERMS: Final = SessionTerms(job_id=7, model="echo", price_per_token=3, chain_id=84532)
COST: Final = session_cost("echo", None)
REFUSAL: Final = "the node holds as much session data as it may; retry later"
HOST: Final = HostKey.generate()


# ------------------------------------------------------------------ sans-I/O


def _frames(actions: list[Any]) -> list[bytes]:
    return [a.frame for a in actions if isinstance(a, Send)]


def open_v2(
    memory: SessionMemory, model: str = "echo"
) -> tuple[ServerConnectionV2, ClientConnectionV2, list[Event], list[Any]]:
    """Handshake and session record against a server sharing ``memory``: the client's
    events for the node's answer, and the server's actions."""
    server = ServerConnectionV2(host_key=HOST, clock=lambda: 0.0, memory=memory)
    client = ClientConnectionV2(HOST.public_key)
    (msg2,) = _frames(server.receive(client.start()))
    assert isinstance(client.receive(msg2)[0], HandshakeComplete)
    terms = SessionTerms(job_id=7, model=model, price_per_token=3, chain_id=84532)
    actions = server.receive(client.session(terms, PrivateKey()))
    events = [e for f in _frames(actions) for e in client.receive(f)]
    return server, client, events, actions


def test_a_v2_session_reserves_its_cost_and_close_releases_it() -> None:
    memory = SessionMemory(10**9)
    server, _, events, _ = open_v2(memory, model="m" * 10)
    assert isinstance(events[0], SessionAccepted)
    cost = session_cost("m" * 10, None)
    assert cost > SESSION_OVERHEAD_BYTES
    assert memory.held == cost
    assert server.session is not None
    assert server.session.cost == cost
    server.close("disconnect")
    assert memory.held == 0
    server.close("disconnect")  # a second close releases nothing twice
    assert memory.held == 0


def test_a_spent_budget_refuses_the_v2_session_like_v1() -> None:
    memory = SessionMemory(COST)
    first, _, events, _ = open_v2(memory)
    assert isinstance(events[0], SessionAccepted)
    second, _, events, actions = open_v2(memory)
    (refusal,) = events
    assert isinstance(refusal, ErrorReceived)
    assert refusal.code == ErrorCode.RATE_LIMITED.value
    assert refusal.message == REFUSAL
    assert [(c.code, c.reason) for c in actions if isinstance(c, Close)] == [(1008, REFUSAL)]
    assert second.session is None
    assert second.keys_held == 0
    assert memory.held == COST  # the refused session reserved nothing
    first.close("closed")
    assert memory.held == 0
    third, _, events, _ = open_v2(memory)  # the budget came back
    assert isinstance(events[0], SessionAccepted)
    third.close("closed")
    assert memory.held == 0


def test_v1_and_v2_share_one_budget() -> None:
    from tests.protocol._support import make_conn, make_init, sends

    memory = SessionMemory(COST)
    v2, _, events, _ = open_v2(memory)
    assert isinstance(events[0], SessionAccepted)
    v1 = make_conn()
    v1.memory = memory
    (error,) = sends(v1.receive(make_init(b"\x01" * 32, model_name="echo")))
    assert error.type == "error"
    assert error.code == ErrorCode.RATE_LIMITED
    assert error.message == REFUSAL
    v2.close("closed")
    (ack,) = sends(v1.receive(make_init(b"\x02" * 32, model_name="echo")))
    assert ack.type == "session_init_ack"
    assert memory.held == session_cost("echo", None)


def test_the_clients_close_record_and_a_fatal_record_release_it() -> None:
    memory = SessionMemory(10**9)
    server, client, _, _ = open_v2(memory)
    assert memory.held == COST
    server.receive(client.close("bye"))
    assert server.closed
    assert memory.held == 0

    server, client, _, _ = open_v2(memory)
    assert memory.held == COST
    actions = server.receive(flip_last_byte(client.ping()))  # type: ignore[arg-type]
    assert [c.code for c in actions if isinstance(c, Close)] == [1008]
    assert memory.held == 0


# ------------------------------------------------------------------ the node


@asynccontextmanager
async def v2_client(node: RunningNode) -> AsyncIterator[V2Memory]:
    """A ``/v2/ws`` connection to ``node`` over memory streams (works with MockClock)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.server.handle_stream, server_stream)
        ws = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "127.0.0.1",
            "/v2/ws",
        )
        client = V2Memory(ws, client_stream, ClientConnectionV2(node.host_public_key))
        try:
            yield client
        finally:
            client.conn.wipe()
            if not client.cut:
                with trio.move_on_after(10):
                    await ws.aclose()
            await client_stream.aclose()


class V2Memory:
    def __init__(
        self,
        ws: WebSocketConnection,
        stream: trio.testing.MemoryStream | Any,
        conn: ClientConnectionV2,
    ) -> None:
        self.ws = ws
        self.stream = stream
        self.conn = conn
        self.cut = False

    async def events(self) -> list[Event]:
        with trio.fail_after(10):
            frame = await self.ws.get_message()
        assert isinstance(frame, bytes)
        return self.conn.receive(frame)

    async def open(self) -> Event:
        await self.ws.send_message(self.conn.start())
        await self.events()
        await self.ws.send_message(self.conn.session(TERMS, PrivateKey()))
        (answer,) = await self.events()
        return answer

    async def wait_closed(self, within_s: float = 10) -> int:
        reason = None
        with trio.fail_after(within_s):
            for _ in range(100):
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    break
            else:
                raise AssertionError("the node never closed the connection")
        assert reason is not None
        return reason.code

    async def drop(self) -> None:
        """Go away without a close frame, as a cut network does."""
        self.cut = True
        await self.stream.aclose()


def held(node: RunningNode) -> int:
    return node.ctx.session_memory.held


async def run_and_end(
    node: RunningNode, end: Callable[[V2Memory], Any], *, reason: str
) -> list[int]:
    """Open one v2 session, end it with ``end``; the memory held before and after."""
    seen: list[int] = []
    with trio.fail_after(GUARD_S):
        async with v2_client(node) as client:
            assert isinstance(await client.open(), SessionAccepted)
            seen.append(held(node))
            await end(client)
        await node.wait_no_connections(within_s=GUARD_S)
    seen.append(held(node))
    assert node.accounting.ended[-1][1] == reason
    return seen


async def test_a_node_refuses_a_v2_session_past_max_session_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(max_session_bytes=COST)
    with trio.fail_after(GUARD_S):
        async with v2_client(node) as first:
            assert isinstance(await first.open(), SessionAccepted)
            assert held(node) == COST
            async with v2_client(node) as second:
                refusal = await second.open()
                assert isinstance(refusal, ErrorReceived)
                assert (refusal.code, refusal.message) == (ErrorCode.RATE_LIMITED.value, REFUSAL)
                assert await second.wait_closed() == 1008
            # a v1 init meets the same budget
            async with memory_client(node) as v1:
                frame, _ = init_frame(node.host_public_key, model_name="echo")
                await v1.send(frame)
                error = await v1.expect_error("RATE_LIMITED")
                assert error["message"] == REFUSAL
            assert held(node) == COST
        await node.wait_no_connections(within_s=GUARD_S)
        assert held(node) == 0
        async with v2_client(node) as third:  # the budget came back
            assert isinstance(await third.open(), SessionAccepted)
        await node.wait_no_connections(within_s=GUARD_S)
    assert held(node) == 0


async def test_the_clients_close_record_releases_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def goodbye(client: V2Memory) -> None:
        await client.ws.send_message(client.conn.close("done"))
        assert await client.wait_closed() == 1000

    assert await run_and_end(build_node(), goodbye, reason="closed") == [COST, 0]


async def test_a_disconnect_releases_it(autojump_clock: trio.testing.MockClock) -> None:
    async def drop(client: V2Memory) -> None:
        await client.drop()

    assert await run_and_end(build_node(), drop, reason="disconnect") == [COST, 0]


async def test_a_fatal_error_releases_it(autojump_clock: trio.testing.MockClock) -> None:
    async def tamper(client: V2Memory) -> None:
        await client.ws.send_message(flip_last_byte(client.conn.ping()))
        assert await client.wait_closed() == 1008

    assert await run_and_end(build_node(), tamper, reason="error") == [COST, 0]


async def test_the_idle_timeout_releases_it(autojump_clock: trio.testing.MockClock) -> None:
    async def wait(client: V2Memory) -> None:
        assert await client.wait_closed(within_s=120) == 1000

    node = build_node(idle_timeout_s=60.0)
    assert await run_and_end(node, wait, reason="idle_timeout") == [COST, 0]


async def test_shutdown_releases_it(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node()

    async def shut_down(client: V2Memory) -> None:
        node.only_driver().shutdown()
        assert await client.wait_closed() == 1001

    assert await run_and_end(node, shut_down, reason="shutdown") == [COST, 0]


async def test_a_cancelled_request_keeps_it_until_the_session_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = GatedBackend()
    node = build_node(backend=backend)

    async def cancel_then_drop(client: V2Memory) -> None:
        await client.ws.send_message(client.conn.request("r1", prompt="x", model="gated"))
        (chunk,) = await client.events()
        assert isinstance(chunk, Chunk)
        await client.ws.send_message(client.conn.cancel("r1"))
        (end,) = await client.events()
        assert isinstance(end, End)
        assert end.finish_reason == "cancelled"
        assert backend.cancelled.is_set()
        assert held(node) == COST  # the session goes on after a cancelled request
        await client.drop()  # ... and its connection ends while the stream was cancelled

    assert await run_and_end(node, cancel_then_drop, reason="disconnect") == [COST, 0]
