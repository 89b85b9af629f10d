"""Resource limits: what a client can make the node hold or spend is bounded.

Oversized frames close with 1009, error floods with 1008; a client that connects and sends
nothing (before or after the WebSocket upgrade, or stalls mid-frame) is dropped by a timer;
``--max-connections`` refuses the extra upgrade; session inits (an ECDH each) are rate
limited per connection, and the node-wide replay cache has a fixed size.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed

from node.cli import build_parser, config_from_args
from node.protocol import connection as connection_module
from tests.server._support import UPGRADE_REQUEST

from ._support import build_node, init_frame, memory_client, with_payload, ws_client

GUARD_S = 60


async def _raw_exchange(stream: trio.abc.Stream, limit: int = 100) -> bytes:
    """Read until the peer closes (at most ``limit`` reads)."""
    data = b""
    for _ in range(limit):
        chunk = await stream.receive_some()
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the node kept the connection open")


# ------------------------------------------------------------------ frame size and errors


async def test_an_oversized_frame_closes_1009_and_the_node_goes_on(node_factory: Any) -> None:
    node = await node_factory.start(max_frame_bytes=8192)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            await client.init(node.host_public_key)
            await client.send(json.dumps({"type": "ping", "pad": "x" * 9000}))
            code, frames = await client.wait_closed()
        assert code == 1009
        assert frames == []
        await node.wait_no_connections()
        async with ws_client(node) as again:
            await again.ping()


async def test_an_error_flood_closes_1008_after_the_budget(node_factory: Any) -> None:
    node = await node_factory.start(max_errors=10)
    sent = 0
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            try:
                for i in range(1_000):  # far more than the budget, without reading
                    await client.send(f"garbage {i}")
                    sent += 1
            except ConnectionClosed:
                pass
            code, frames = await client.wait_closed()
        await node.wait_no_connections()
    assert code == 1008
    assert [f["code"] for f in frames] == ["INVALID_MESSAGE"] * 10
    assert node.ctx.metrics.errors["INVALID_MESSAGE"] == 10


async def test_deep_nesting_and_huge_numbers_are_refused_cheaply(node_factory: Any) -> None:
    node = await node_factory.start(max_errors=100)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            for frame in (
                "[" * 500_000,
                '{"a":' * 100_000 + "1" + "}" * 100_000,
                '{"type":"session_init","job_id":' + "9" * 100_000 + "}",
                '{"type":"ping","id":' + "1" * 5_000 + "}",
                json.dumps({f"k{i}": i for i in range(50_000)}),
            ):
                await client.send(frame)
                await client.expect_error("INVALID_MESSAGE")
            await client.ping()


# ------------------------------------------------------------------ silent clients


async def test_a_tcp_client_that_sends_nothing_gets_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.server.handle_stream, server_stream)
            started = trio.current_time()
            answer = await _raw_exchange(client_stream)
            waited = trio.current_time() - started
        await client_stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 10.0 <= waited < 11.0


async def test_an_upgraded_client_that_sends_nothing_is_closed_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(idle_timeout_s=45.0)
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as client:
            started = trio.current_time()
            code, frames = await client.wait_closed(within_s=300)
            waited = trio.current_time() - started
        await node.wait_no_connections()
    assert code == 1000
    assert frames == []
    assert 45.0 <= waited < 46.0


async def test_a_client_that_stalls_mid_frame_is_closed_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Slowloris: the upgrade, then the first two bytes of a frame header, then nothing."""
    node = build_node(idle_timeout_s=45.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(GUARD_S * 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.server.handle_stream, server_stream)
            await client_stream.send_all(UPGRADE_REQUEST)
            head = b""
            for _ in range(100):
                head += await client_stream.receive_some()
                if b"Connected to llm-node" in head:
                    break
            assert head.startswith(b"HTTP/1.1 101 ")
            await client_stream.send_all(b"\x81\xfe")  # text frame, 16-bit length follows
            started = trio.current_time()
            rest = await client_stream.receive_some()
            waited = trio.current_time() - started
            # The node then waits a bounded time for our close reply and hangs up.
            rest += await _raw_exchange(client_stream)
        await client_stream.aclose()
    # The node's close frame: opcode 0x88, then the code 1000 (0x03e8) first in the payload.
    assert rest[0] == 0x88
    assert rest[2:4] == (1000).to_bytes(2, "big")
    assert 45.0 <= waited < 46.0
    assert node.ctx.drivers == set()


# ------------------------------------------------------------------ connections


async def test_max_connections_is_enforced(node_factory: Any) -> None:
    args = build_parser().parse_args(["serve", "--max-connections", "3"])
    assert config_from_args(args).max_connections == 3
    node = await node_factory.start(max_connections=3)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as a, ws_client(node) as b, ws_client(node) as c:
            for _ in range(3):
                with trio.fail_after(10):
                    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
                async with stream:
                    await stream.send_all(UPGRADE_REQUEST)
                    answer = await _raw_exchange(stream)
                assert answer.startswith(b"HTTP/1.1 503 ")
            for client in (a, b, c):
                await client.ping()
            assert len(node.ctx.drivers) == 3
        await node.wait_no_connections()
        async with ws_client(node) as d:
            await d.ping()
    assert node.ctx.metrics.connections_refused == 3


# ------------------------------------------------------------------ session inits


async def test_bogus_inits_beyond_the_rate_are_refused_without_ecdh(
    autojump_clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    opened = 0
    original = connection_module.open_session_init

    def counting(*args: Any) -> Any:
        nonlocal opened
        opened += 1
        return original(*args)

    monkeypatch.setattr(connection_module, "open_session_init", counting)
    node = build_node(max_errors=100, idle_timeout_s=1000.0)
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as client:
            codes = []
            for i in range(25):
                frame, _ = init_frame(node.host_public_key, session_id=str(i))
                sealed = bytes.fromhex(frame["payload"]["ciphertextHex"])
                bogus = with_payload(frame, ciphertextHex=sealed[:-1] + bytes((sealed[-1] ^ 1,)))
                await client.send(bogus)
                codes.append((await client.expect("error"))["code"])
            assert codes == ["DECRYPTION_FAILED"] * 10 + ["RATE_LIMITED"] * 15
            assert opened == 10  # refused before any ECDH
            # Even a genuine init waits for the allowance to come back (1 per second).
            frame, _ = init_frame(node.host_public_key, session_id="99")
            await client.send(frame)
            await client.expect_error("RATE_LIMITED")
            await trio.sleep(1.0)
            await client.send(frame)
            await client.expect("session_init_ack")


async def test_the_replay_cache_is_bounded_and_refuses_rather_than_forgets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each accepted init takes two entries: (ephemeral key, nonce) and its session key.
    node = build_node(replay_max_entries=6, replay_window_s=60.0)
    with trio.fail_after(GUARD_S * 10):
        for i in range(3):
            async with memory_client(node) as client:
                await client.init(node.host_public_key, session_id=str(i))
        async with memory_client(node) as client:
            await client.send(init_frame(node.host_public_key, session_id="9")[0])
            await client.expect_error("RATE_LIMITED")
        assert len(node.ctx.replay_cache) == 6
        await trio.sleep(61)  # the window passes: room again
        async with memory_client(node) as client:
            await client.init(node.host_public_key, session_id="9")
