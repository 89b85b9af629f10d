"""Timers under trio's autojump MockClock: idle timeout, session TTL, replay window, init
rate limit, and cancellation on disconnect.

The node runs in the test's own Trio run (its clock is ``trio.current_time``) and each
client is wired to ``NodeServer.handle_stream`` through in-memory streams, so no real
time passes and nothing depends on the speed of this machine.
"""

from __future__ import annotations

import trio
import trio.testing

from node.inference.echo import EchoBackend
from tests.server._support import (
    CancelProbe,
    build_node,
    init_frame,
    memory_client,
)


async def test_idle_timeout_closes_with_1000_and_wipes_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(idle_timeout_s=30.0)
    with trio.fail_after(300):
        async with memory_client(node) as client:
            await client.init(node.host_public_key, session_id="1")
            await client.init(node.host_public_key, session_id="2")
            keys = node.held_keys()
            assert len(keys) == 2
            assert not any(k.is_all_zero() for k in keys)
            driver = node.only_driver()
            # Activity resets the idle timer: 25 s, ping, 25 s, ping ... still open.
            start = trio.current_time()
            for _ in range(3):
                await trio.sleep(25)
                await client.ping()
            assert trio.current_time() - start >= 75
            last_activity = trio.current_time()
            code, frames = await client.wait_closed(within_s=100)
            closed_after = trio.current_time() - last_activity
        assert code == 1000
        assert frames == []
        assert 30.0 <= closed_after < 31.0
        await node.wait_no_connections()
    assert driver.end_reason == "idle_timeout"
    assert all(k.wiped and k.is_all_zero() for k in keys)
    assert sorted(reason for _, reason in node.accounting.ended) == ["idle_timeout"] * 2


async def test_idle_timeout_does_not_cut_a_long_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 40 pieces at 1 s each: the stream outlives the 10 s idle timeout.
    node = build_node(idle_timeout_s=10.0, backend=EchoBackend(delay_s=1.0))
    words = " ".join(f"w{i}" for i in range(40))
    with trio.fail_after(300):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key)
            started = trio.current_time()
            result = await client.ask(session, words)
            assert result.text == words
            assert trio.current_time() - started >= 40
            # Once the stream is over, idleness counts again.
            code, _ = await client.wait_closed(within_s=60)
            assert code == 1000


async def test_session_ttl_expiry(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node(session_ttl_s=60.0, idle_timeout_s=1000.0)
    with trio.fail_after(300):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="7")
            (key,) = node.held_keys()
            assert (await client.ask(session, "in time")).text == "in time"
            await trio.sleep(59)
            assert (await client.ask(session, "just in time")).text == "just in time"
            await trio.sleep(1)
            await client.send(session.message_frame({"prompt": "too late"}, request_id="e"))
            error = await client.expect_error("SESSION_EXPIRED", request_id="e")
            assert error["session_id"] == "7"
            assert key.is_all_zero()
            assert node.held_keys() == []
            await client.ping()
            # A new init for the same session id starts a fresh TTL.
            _, renewed = await client.init(node.host_public_key, session_id="7")
            assert (await client.ask(renewed, "renewed")).text == "renewed"
    assert ("7", "ttl_expired") in [(s.session_id, r) for s, r in node.accounting.ended]


async def test_replayed_init_is_refused_within_the_window_then_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(replay_window_s=100.0, idle_timeout_s=1000.0)
    frame, session = init_frame(node.host_public_key, session_id="3")
    t0 = trio.current_time()
    with trio.fail_after(300):
        async with memory_client(node) as first:
            await first.send(frame)
            await first.expect("session_init_ack")
        async with memory_client(node) as second:
            await second.send(frame)
            await second.expect_error("REPLAY_DETECTED")
            await trio.sleep_until(t0 + 99)
            await second.send(frame)
            await second.expect_error("REPLAY_DETECTED")
            await second.ping()
        await trio.sleep_until(t0 + 100.5)
        async with memory_client(node) as third:
            # The window has passed: the cache forgot the pair, the init is accepted
            # and the recorded session key works again.
            await third.send(frame)
            ack = await third.expect("session_init_ack")
            assert ack["client_address"] == session.client_address
            session.next_index = 0
            assert (await third.ask(session, "again")).text == "again"


async def test_an_init_replayed_after_905_s_is_refused_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The outside review replayed a recorded init 905 s later (the old 900 s window) and
    the node ran it again. The default window is now at least the session TTL."""
    node = build_node()
    assert node.ctx.config.replay_window_s >= node.ctx.config.session_ttl_s
    frame, _ = init_frame(node.host_public_key, session_id="4")
    t0 = trio.current_time()
    with trio.fail_after(100_000):
        async with memory_client(node) as first:
            await first.send(frame)
            await first.expect("session_init_ack")
        for later in (905.0, 3600.0, node.ctx.config.session_ttl_s - 1):
            await trio.sleep_until(t0 + later)
            async with memory_client(node) as replayer:
                await replayer.send(frame)
                await replayer.expect_error("REPLAY_DETECTED")


async def test_init_rate_limit_refills_over_time(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node(idle_timeout_s=1000.0, max_errors=100)
    with trio.fail_after(300):
        async with memory_client(node) as client:
            for i in range(10):
                await client.init(node.host_public_key, session_id=str(i))
            await client.send(init_frame(node.host_public_key, session_id="10")[0])
            await client.expect_error("RATE_LIMITED")
            await trio.sleep(1.0)  # one init's worth of allowance comes back
            await client.init(node.host_public_key, session_id="11")
            await client.send(init_frame(node.host_public_key, session_id="12")[0])
            await client.expect_error("RATE_LIMITED")
            await trio.sleep(10.0)  # the burst refills, but never beyond 10
            for i in range(10):
                await client.init(node.host_public_key, session_id=str(20 + i))
            await client.send(init_frame(node.host_public_key, session_id="30")[0])
            await client.expect_error("RATE_LIMITED")
            await client.ping()


async def test_disconnect_mid_stream_cancels_the_backend_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Virtual time: the backend is cancelled at the instant of the disconnect, not at
    its next piece (a piece takes 1 s here), and the other connection is unaffected."""
    probe = CancelProbe(EchoBackend(delay_s=1.0))
    node = build_node(backend=probe)
    long_a = "alpha " + " ".join(f"a{i}" for i in range(100))
    long_b = "bravo " + " ".join(f"b{i}" for i in range(30))
    with trio.fail_after(600):
        async with memory_client(node) as b_client:
            _, b_session = await b_client.init(node.host_public_key, session_id="2")
            async with memory_client(node) as a_client:
                _, a_session = await a_client.init(node.host_public_key, session_id="1")
                (a_key,) = [
                    s.key
                    for d in node.ctx.drivers
                    for s in d.state.sessions.values()
                    if s.session_id == "1" and s.key is not None
                ]
                await a_client.send(a_session.message_frame({"prompt": long_a}))
                await b_client.send(b_session.message_frame({"prompt": long_b}))
                for _ in range(3):
                    await a_client.expect("encrypted_chunk")
                assert a_client.raw_stream is not None
                disconnected_at = trio.current_time()
                await a_client.raw_stream.aclose()  # the TCP connection just drops
                a_call = probe.call_for("alpha")
                await a_call.done.wait()
            assert a_call.outcome == "cancelled"
            assert a_call.ended_at is not None
            assert a_call.ended_at - disconnected_at < 1.0
            await node.drivers.wait_until(lambda d: len(d) == 1)
            assert a_key is not None
            assert a_key.is_all_zero()
            result = await b_client.collect(b_session)
            assert result.text == long_b
            assert result.final_reason == "stop"
            assert probe.call_for("bravo").outcome == "returned"
    cancelled = [r for _, _, r in node.accounting.finished if r.finish_reason == "cancelled"]
    assert len(cancelled) == 1
    assert 3 <= cancelled[0].completion_tokens < 10


async def test_stream_cancel_stops_the_backend(autojump_clock: trio.testing.MockClock) -> None:
    probe = CancelProbe(EchoBackend(delay_s=1.0))
    node = build_node(backend=probe)
    words = "charlie " + " ".join(f"c{i}" for i in range(100))
    with trio.fail_after(600):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="5")
            await client.send(session.message_frame({"prompt": words}, request_id="s"))
            for _ in range(2):
                await client.expect("encrypted_chunk")
            asked_at = trio.current_time()
            await client.send({"type": "stream_cancel", "session_id": "5", "reason": "enough"})
            result = await client.collect(session, request_id="s", skip_chunks=2)
            call = probe.call_for("charlie")
            assert call.outcome == "cancelled"
            assert call.ended_at is not None
            assert call.ended_at - asked_at < 1.0
            assert result.final_reason == "cancelled"
            assert result.end["reason"] == "cancelled"
            assert result.end["finish_reason"] == "cancelled"
            assert 2 <= result.end["tokens_used"] < 10
            # A second cancel with nothing in flight is ignored; the session goes on.
            await client.send({"type": "stream_cancel", "session_id": "5"})
            await client.ping()
            assert (await client.ask(session, "next one")).text == "next one"


async def test_an_http_head_that_never_ends_gets_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    answer = b""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.server.handle_stream, server_stream)
            await client_stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no end
            started = trio.current_time()
            for _ in range(100):
                data = await client_stream.receive_some()
                if not data:
                    break
                answer += data
            waited = trio.current_time() - started
        await client_stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 10.0 <= waited < 11.0
    assert node.ctx.metrics.http_requests["408"] == 1


async def test_an_unused_expired_session_key_is_wiped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(session_ttl_s=60.0, idle_timeout_s=1000.0)
    with trio.fail_after(600):
        async with memory_client(node) as client:
            await client.init(node.host_public_key, session_id="1")
            (key,) = node.held_keys()
            for _ in range(4):  # an active client that never uses the session again
                await trio.sleep(30)
                await client.ping()
            assert key.is_all_zero()
