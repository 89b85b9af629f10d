"""Protocol v2 proves the host key by its handshake, so it needs no v1 challenge.

A node started with ``v1_challenge=False`` (``--no-v1-challenge``) answers 403 on
``POST /v1/auth/challenge``; v2 clients (auto or pinned) still work against it, v1 clients
fail with a message naming the flag, and a pinned address that does not match is refused
before any WebSocket. Real node, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import pytest
import trio

from node.client import (
    ConnectFailed,
    HostKeyMismatch,
    HostVerificationFailed,
    discover_host_key,
    fetch_host_key,
    open_session,
)
from node.crypto import HostKey
from tests.client.conftest import GUARD_S, run_node

V1_AND_V2 = ("v1", "v2")


@pytest.mark.parametrize("protocol", ["auto", "v2"])
async def test_v2_works_without_the_challenge(protocol: str) -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(protocols=V1_AND_V2, v1_challenge=False) as node:
            async with open_session(
                node.url,
                model="echo",
                job_id=1,
                protocol=protocol,
                expected_host_address=node.host_key.address,
            ) as session:
                assert session.protocol == "v2"
                assert session.host is not None
                assert session.host.address == node.host_key.address
                assert session.host.verified_by_handshake
                assert not session.host.verified_by_challenge
                assert session.host.verified
                completion = await session.complete("no challenge needed")
            assert completion.text == "no challenge needed"
            # The 403 route was never asked.
            assert node.ctx.metrics.http_requests.get("403", 0) == 0


async def test_a_given_key_is_marked_verified_by_the_handshake() -> None:
    with trio.fail_after(GUARD_S):
        async with (
            run_node(protocols=V1_AND_V2, v1_challenge=False) as node,
            open_session(
                node.url,
                model="echo",
                job_id=2,
                protocol="v2",
                host_public_key=node.host_key.public_key_hex,
            ) as session,
        ):
            assert session.host is not None
            assert session.host.verified_by_handshake


async def test_v1_still_needs_the_challenge_and_says_so() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(protocols=V1_AND_V2, v1_challenge=False) as node:
            with pytest.raises(ConnectFailed) as caught:
                async with open_session(node.url, model="echo", job_id=3, protocol="v1"):
                    pytest.fail("a v1 session opened without the challenge")  # pragma: no cover
            assert "--no-v1-challenge" in caught.value.message
            assert "protocol v2" in caught.value.message
            assert node.ctx.metrics.http_requests["403"] == 1  # the challenge route refused
            assert node.ctx.metrics.connections_total == 0


async def test_v1_with_the_challenge_on_is_verified_by_it() -> None:
    with trio.fail_after(GUARD_S):
        async with (
            run_node(protocols=V1_AND_V2) as node,
            open_session(node.url, model="echo", job_id=4, protocol="v1") as session,
        ):
            assert session.host is not None
            assert session.host.verified_by_challenge
            assert not session.host.verified_by_handshake


@pytest.mark.parametrize("protocol", ["auto", "v2"])
async def test_a_wrong_pin_is_refused_before_connecting(protocol: str) -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(protocols=V1_AND_V2, v1_challenge=False) as node:
            with pytest.raises(HostKeyMismatch) as caught:
                async with open_session(
                    node.url,
                    model="echo",
                    job_id=5,
                    protocol=protocol,
                    expected_host_address="0x" + "00" * 19 + "01",
                ):
                    pytest.fail("opened with a wrong pin")  # pragma: no cover
            assert node.host_key.address in caught.value.message
            assert node.ctx.metrics.connections_total == 0


async def test_a_node_without_the_key_fails_host_verification() -> None:
    """The key given is not the node's: the node cannot open message 1 and closes; the
    client reports HOST_VERIFICATION_FAILED, not a truncated stream."""
    other = HostKey.generate()
    try:
        with trio.fail_after(GUARD_S):
            async with run_node(protocols=V1_AND_V2, v1_challenge=False) as node:
                with pytest.raises(HostVerificationFailed) as caught:
                    async with open_session(
                        node.url,
                        model="echo",
                        job_id=6,
                        protocol="v2",
                        host_public_key=other.public_key_hex,
                    ):
                        pytest.fail("a handshake with the wrong key succeeded")  # pragma: no cover
                assert caught.value.code == "HOST_VERIFICATION_FAILED"
                assert "does not hold that key" in caught.value.message
                assert other.address in caught.value.message
                assert node.ctx.metrics.v2_handshakes["refused"] == 1
    finally:
        other.wipe()


async def test_fetch_host_key_does_not_verify_and_discover_needs_the_route() -> None:
    with trio.fail_after(GUARD_S):
        async with run_node(protocols=V1_AND_V2, v1_challenge=False) as node:
            fetched = await fetch_host_key(node.url, expected_address=node.host_key.address)
            assert fetched.address == node.host_key.address
            assert not fetched.verified
            with pytest.raises(HostKeyMismatch):
                await fetch_host_key(node.url, expected_address="0x" + "00" * 19 + "02")
            with pytest.raises(ConnectFailed) as caught:
                await discover_host_key(node.url)
            assert "--no-v1-challenge" in caught.value.message
