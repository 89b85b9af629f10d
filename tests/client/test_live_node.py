"""The client against the real node (NodeServer + echo backend) on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from coincurve import PrivateKey

from node.client import (
    ConnectFailed,
    HostKeyMismatch,
    NodeErrorResponse,
    SessionClosed,
    open_session,
)
from node.crypto import HostKey
from node.crypto.curve import address_of
from node.inference.echo import EchoBackend

from .conftest import GUARD_S, GatedBackend, run_node

CLIENT = PrivateKey(bytes.fromhex("c1" * 32))
OTHER_ADDRESS = "0x" + "12" * 20


async def test_encrypted_prompt_with_discovered_host_key() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            async with open_session(
                node.url, client_key=CLIENT, model="echo", job_id=11
            ) as session:
                pieces = [p async for p in session.stream("hello big wide world")]
                completion = await session.complete("and a second prompt")
                assert session.host is not None
                assert session.host.verified_by_challenge
                assert session.host.public_key == node.host_key.public_key
                assert session.host.address == node.host_key.address
                assert session.client_address == address_of(CLIENT.public_key)
                assert session.encrypted
            encrypted_inits = node.ctx.metrics.inits_accepted["encrypted"]
    # The node may coalesce pieces that queued up, so only their concatenation is fixed.
    assert "".join(pieces) == "hello big wide world"
    assert completion.text == "and a second prompt"
    assert completion.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 8
    assert completion.tokens_used == 4
    assert completion.first_token_s is not None
    assert 0 <= completion.first_token_s <= completion.elapsed_s
    assert encrypted_inits == 1


async def test_many_prompts_on_one_session_count_messages() -> None:
    prompts = ["one", "two words", "three little words", "héllo wörld 🌍", "x " * 50]
    with trio.fail_after(GUARD_S):
        async with (
            run_node() as node,
            open_session(
                node.url, host_public_key=node.host_key.public_key_hex, model="echo", job_id=3
            ) as session,
        ):
            texts = [(await session.complete(p)).text for p in prompts]
            assert session._next_message == len(prompts)
            assert session.inits == 1
    assert texts == prompts


async def test_reinit_each_prompt_uses_a_new_key_every_time() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            async with open_session(
                node.url,
                host_public_key=node.host_key.public_key,
                model="echo",
                job_id=4,
                reinit_each_prompt=True,
            ) as session:
                keys = []
                texts = []
                for prompt in ("first one", "second one", "third one"):
                    texts.append((await session.complete(prompt)).text)
                    keys.append(session._key)
                    assert session._next_message == 1
                assert session.inits == 3
                # Each re-init wiped the key it replaced.
                assert keys[0] is not None
                assert keys[0].wiped
                assert keys[0].is_all_zero()
                assert keys[1] is not None
                assert keys[1].wiped
                assert keys[2] is not None
                assert not keys[2].wiped
            inits = node.ctx.metrics.inits_accepted["encrypted"]
    assert texts == ["first one", "second one", "third one"]
    assert inits == 3
    assert keys[2].wiped  # and the last one when the session closed


async def test_plaintext_mode() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            async with open_session(node.url, model="echo", job_id=9, encrypted=False) as session:
                first = await session.complete("plain text please")
                second = await session.complete("again")
                assert session.client_address is None
                assert session.host is None
            plaintext_inits = node.ctx.metrics.inits_accepted["plaintext"]
    assert first.text == "plain text please"
    assert first.usage is not None
    assert first.usage.completion_tokens == 3
    assert second.text == "again"
    assert plaintext_inits == 1


async def test_cancel_mid_stream() -> None:
    backend = GatedBackend(["never", " ending"])
    with trio.fail_after(GUARD_S):
        async with (
            run_node(backend) as node,
            open_session(
                node.url, host_public_key=node.host_key.public_key, model="gated", job_id=5
            ) as session,
        ):
            response = session.stream("anything")
            pieces: list[str] = []
            async for piece in response:
                pieces.append(piece)
                if "".join(pieces) == "never ending":
                    await session.cancel()
            assert await session.ping() >= 0  # the session is still fine
    completion = response.completion
    assert completion is not None
    assert completion.finish_reason == "cancelled"
    assert completion.text == "never ending"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2
    assert backend.cancelled


async def test_cancel_from_another_task_before_the_first_piece() -> None:
    # The echo backend waits 30 s before each piece; the cancel stops it at once.
    with trio.fail_after(GUARD_S):
        async with (
            run_node(EchoBackend(delay_s=30)) as node,
            open_session(
                node.url, host_public_key=node.host_key.public_key, model="echo", job_id=6
            ) as session,
        ):
            response = session.stream("slow words never arrive")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(response.collect)
                await trio.testing.wait_all_tasks_blocked()
                assert response.started
                await session.cancel("user pressed stop")
            completion = response.completion
            assert await session.ping() >= 0
    assert completion is not None
    assert completion.finish_reason == "cancelled"
    assert completion.text == ""
    assert completion.first_token_s is None


async def test_abandoned_stream_is_cancelled_and_drained_before_the_next_prompt() -> None:
    backend = GatedBackend(["stuck"])
    with trio.fail_after(GUARD_S):
        async with (
            run_node(backend) as node,
            open_session(
                node.url, host_public_key=node.host_key.public_key, model="gated", job_id=7
            ) as session,
        ):
            response = session.stream("first")
            async for _ in response:
                break  # leave the loop while the node is still generating
            second = session.stream("second")
            async with trio.open_nursery() as nursery:
                # The second request first cancels and drains the first one...
                nursery.start_soon(second.collect)
                await trio.testing.wait_all_tasks_blocked()
                assert response.done
                # ...then waits on its own (gated) answer; stop it too.
                await session.cancel()
    # The abandoned stream was cancelled and read to its (authenticated) end.
    assert response.completion is not None
    assert response.completion.finish_reason == "cancelled"
    assert response.completion.text == "stuck"
    assert second.completion is not None
    assert second.completion.finish_reason == "cancelled"


async def test_pinned_host_address() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            for pin in (node.host_key.address, node.host_key.address.lower()):
                async with open_session(
                    node.url, model="echo", job_id=1, expected_host_address=pin
                ) as session:
                    assert (await session.complete("pinned")).text == "pinned"
            with pytest.raises(HostKeyMismatch) as info:
                async with open_session(
                    node.url, model="echo", job_id=1, expected_host_address=OTHER_ADDRESS
                ):
                    raise AssertionError("must not get here")  # pragma: no cover
            with pytest.raises(HostKeyMismatch):
                async with open_session(
                    node.url,
                    model="echo",
                    job_id=1,
                    host_public_key=node.host_key.public_key,
                    expected_host_address=OTHER_ADDRESS,
                ):
                    raise AssertionError("must not get here")  # pragma: no cover
            connections = node.ctx.metrics.connections_total
    assert info.value.code == "HOST_KEY_MISMATCH"
    assert node.host_key.address in info.value.message
    assert connections == 2  # the mismatches never opened a WebSocket


async def test_wrong_host_key_cannot_open_a_session() -> None:
    impostor = HostKey.generate()
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            with pytest.raises(NodeErrorResponse) as info:
                async with open_session(
                    node.url, host_public_key=impostor.public_key, model="echo", job_id=1
                ):
                    raise AssertionError("must not get here")  # pragma: no cover
    assert info.value.code == "DECRYPTION_FAILED"


async def test_node_refusal_at_init_carries_the_code() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(allowed_clients=frozenset({OTHER_ADDRESS})) as node:
            with pytest.raises(NodeErrorResponse) as info:
                async with open_session(node.url, client_key=CLIENT, model="echo", job_id=1):
                    raise AssertionError("must not get here")  # pragma: no cover
    assert info.value.code == "SESSION_AUTH_DENIED"


async def test_node_error_mid_session_then_the_session_goes_on() -> None:
    with trio.fail_after(GUARD_S):
        async with (
            run_node(EchoBackend(context_window=4)) as node,
            open_session(
                node.url, host_public_key=node.host_key.public_key, model="echo", job_id=2
            ) as session,
        ):
            with pytest.raises(NodeErrorResponse) as info:
                await session.complete("far too many words for this")
            completion = await session.complete("short")
    assert info.value.code == "TOKEN_LIMIT_EXCEEDED"
    assert info.value.extra["context_window_size"] == 4
    assert completion.text == "short"


async def test_plaintext_only_node_refuses_encryption() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(plaintext_only=True) as node:
            with pytest.raises(ConnectFailed) as info:
                async with open_session(node.url, model="echo", job_id=1):
                    raise AssertionError("must not get here")  # pragma: no cover
            async with open_session(node.url, model="echo", job_id=1, encrypted=False) as s:
                assert (await s.complete("fine")).text == "fine"
    assert info.value.code == "ENCRYPTION_NOT_SUPPORTED"


async def test_unreachable_node() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            url = node.url
        # The node is gone: nothing listens on its port any more.
        with pytest.raises(ConnectFailed):
            async with open_session(url, model="echo", job_id=1, encrypted=False):
                raise AssertionError("must not get here")  # pragma: no cover


async def test_session_key_is_wiped_and_the_session_closed_on_exit() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node() as node:
            async with open_session(
                node.url, host_public_key=node.host_key.public_key, model="echo", job_id=8
            ) as session:
                await session.complete("something")
                key = session._key
                assert key is not None
                assert not key.is_all_zero()
            assert key.wiped
            assert key.is_all_zero()
            with pytest.raises(SessionClosed):
                await session.complete("after the end")
