"""Key wipe: however a connection ends (disconnect, idle timeout, error budget, oversized
frame, server shutdown) and when a session's TTL passes or it is re-initialised, the
buffers that held its keys are all zeros afterwards. The test keeps references to the
live ``SecretBytes`` objects (the buffers themselves) and checks them after the fact.

One test goes further: every ``SecretBytes`` created while a connection is served (ECDH
secret, init key, decrypted init, session keys, decrypted prompts) is zero when it ends.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from node.client import open_session
from node.crypto.secret import SecretBytes
from tests.server._support import GatedBackend, RunningNode

from ._support import build_node, memory_client, memory_websocket, ws_client

GUARD_S = 60


def live_keys(node: RunningNode) -> list[SecretBytes]:
    keys = node.held_keys()
    assert keys
    assert not any(k.wiped or k.is_all_zero() for k in keys)
    return keys


def assert_wiped(keys: list[SecretBytes]) -> None:
    for key in keys:
        assert key.wiped
        assert key.is_all_zero()
        assert not any(key.buffer_for_tests())
        assert len(key) == 32  # zeroed in place, not replaced or truncated


async def test_disconnect_wipes_every_key_of_the_connection() -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            for sid in ("1", "2", "3"):
                await client.init(node.host_public_key, session_id=sid)
            keys = live_keys(node)
            assert len(keys) == 3
        await node.wait_no_connections()
    assert_wiped(keys)
    assert sorted(r for _, r in node.accounting.ended) == ["disconnect"] * 3


async def test_idle_timeout_wipes_keys(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node(idle_timeout_s=30.0)
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as client:
            await client.init(node.host_public_key)
            keys = live_keys(node)
            code, _ = await client.wait_closed(within_s=100)
        await node.wait_no_connections()
    assert code == 1000
    assert_wiped(keys)


async def test_ttl_expiry_wipes_the_key_while_the_connection_lives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(session_ttl_s=60.0, idle_timeout_s=1000.0)
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as client:
            _, old = await client.init(node.host_public_key, session_id="1")
            keys = live_keys(node)
            await trio.sleep(61)
            await client.ping()  # any frame lets the node sweep expired keys
            assert_wiped(keys)
            assert node.held_keys() == []
            await client.send(old.message_frame({"prompt": "late"}, request_id="l"))
            await client.expect_error("SESSION_EXPIRED", request_id="l")


async def test_reinit_wipes_the_previous_key(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            await client.init(node.host_public_key, session_id="1")
            first = live_keys(node)
            await client.init(node.host_public_key, session_id="1")
            assert_wiped(first)
            assert len(live_keys(node)) == 1


async def test_shutdown_wipes_keys(node_factory: Any) -> None:
    node = await node_factory.start()
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as idle, ws_client(node) as busy:
            await idle.init(node.host_public_key, session_id="1")
            await busy.init(node.host_public_key, session_id="2")
            keys = live_keys(node)
            assert len(keys) == 2
            node.shutdown.set()
            codes = [(await c.wait_closed())[0] for c in (idle, busy)]
        await node.wait_no_connections()
    assert codes == [1001, 1001]
    assert_wiped(keys)


async def test_shutdown_mid_stream_wipes_keys(node_factory: Any) -> None:
    gated = GatedBackend()
    node = await node_factory.start(backend=gated)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            _, session = await client.init(node.host_public_key)
            keys = live_keys(node)
            await client.send(session.message_frame({"prompt": "p"}, request_id="s"))
            await gated.streaming.wait()
            node.shutdown.set()
            result = await client.collect(session, request_id="s")
            assert result.final_reason == "cancelled"
            code, _ = await client.wait_closed()
        await node.wait_no_connections()
    assert code == 1001
    assert gated.cancelled.is_set()
    assert_wiped(keys)


@pytest.mark.parametrize(("how", "code"), [("error budget", 1008), ("oversized frame", 1009)])
async def test_closing_on_abuse_wipes_keys(node_factory: Any, how: str, code: int) -> None:
    node = await node_factory.start(max_errors=3, max_frame_bytes=4096)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            await client.init(node.host_public_key)
            keys = live_keys(node)
            if how == "error budget":
                for _ in range(3):
                    await client.send("not json")
            else:
                await client.send("x" * 10_000)
            closed, _ = await client.wait_closed()
        await node.wait_no_connections()
    assert closed == code
    assert_wiped(keys)


async def test_every_secret_buffer_made_while_serving_is_zero_afterwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = build_node()  # the host key exists before the recording starts
    created: list[SecretBytes] = []
    original_init = SecretBytes.__init__
    original_take = SecretBytes.take

    def recording_init(self: SecretBytes, data: Any) -> None:
        original_init(self, data)
        created.append(self)

    def recording_take(cls: type[SecretBytes], data: bytearray) -> SecretBytes:
        secret = original_take(data)
        created.append(secret)
        return secret

    monkeypatch.setattr(SecretBytes, "__init__", recording_init)
    monkeypatch.setattr(SecretBytes, "take", classmethod(recording_take))
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            _, s1 = await client.init(node.host_public_key, session_id="1")
            _, s2 = await client.init(node.host_public_key, session_id="2")
            assert (await client.ask(s1, "first prompt")).text == "first prompt"
            assert (await client.ask(s2, "second prompt")).text == "second prompt"
            await client.init(node.host_public_key, session_id="1")  # re-init
            during = len(created)
        await node.wait_no_connections()
    # Per init: ECDH secret, init key, decrypted init, session key; per prompt: plaintext.
    assert during >= 3 * 4 + 2
    for secret in created:
        assert secret.is_all_zero(), secret
        assert secret.wiped


async def test_our_client_wipes_its_key_when_the_session_ends() -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_public_key,
                model="echo",
                job_id=3,
            ) as session,
        ):
            assert session._key is not None
            key = session._key
            await session.reinit()
            first, key = key, session._key
            assert_wiped([first])
            assert (await session.complete("hello")).text == "hello"
        await node.wait_no_connections()
    assert key is not None
    assert_wiped([key])
