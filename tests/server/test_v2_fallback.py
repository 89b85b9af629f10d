"""node.client ``protocol="auto"``: an HTTP refusal of the v2 upgrade falls back to v1;
a v2 handshake that fails cryptographically never does. Real sockets on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from coincurve import PrivateKey

from node.client import open_session
from node.client.errors import ClientError, DowngradeRefused
from tests.server._support import DEV_HOST_PUBLIC_HEX, RunningNode, parse_prometheus

GUARD_S = 20
HOST_PUB = bytes.fromhex(DEV_HOST_PUBLIC_HEX)
MAX_HEAD = 16384


async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    for _ in range(100_000):
        data = await source.receive_some(65536)
        if not data:
            break
        await sink.send_all(data)
    with trio.move_on_after(1):
        await sink.send_eof() if isinstance(sink, trio.SocketStream) else None


async def _proxy_one(node_port: int, refuse: bytes, client: trio.SocketStream) -> None:
    """A reverse proxy that answers 404 for one path and forwards everything else."""
    async with client:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            data = await client.receive_some(4096)
            if not data:
                return
            head += data
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        if path == refuse:
            await client.send_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
            )
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", node_port)
        async with upstream:
            await upstream.send_all(head)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, upstream, client)
                await _pipe(client, upstream)
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def v1_only_proxy(node: RunningNode) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        handler = partial(_proxy_one, node.port or 0, b"/v2/ws")
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def _count(node: RunningNode, name: str) -> float:
    return parse_prometheus(node.ctx.metrics.render()).get(name, 0.0)


async def test_auto_falls_back_to_v1_when_a_proxy_refuses_the_v2_upgrade(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(GUARD_S):
        async with v1_only_proxy(node) as url:
            with caplog.at_level("WARNING", logger="node.client"):
                async with open_session(
                    url, model="echo", job_id=3, host_public_key=HOST_PUB
                ) as session:
                    assert session.protocol == "v1"
                    assert (await session.complete("through the proxy")).text == (
                        "through the proxy"
                    )
            # pinned to v2: the same refusal is an error, never a downgrade
            with pytest.raises(DowngradeRefused, match="HTTP 404"):
                async with open_session(
                    url, model="echo", job_id=4, host_public_key=HOST_PUB, protocol="v2"
                ):
                    pass
            await node.wait_no_connections()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("HTTP 404" in w and "falling back to protocol v1" in w for w in warnings)
    [started] = node.accounting.started
    assert started.protocol == "v1"
    assert _count(node, 'llm_node_protocol_connections_total{protocol="v2"}') == 0


async def test_a_fallback_to_v1_runs_the_challenge_v2_skipped(node: RunningNode) -> None:
    """auto fetched the key for v2 without the challenge; after the fallback to v1 the
    key must be proven by the challenge before the v1 session uses it."""
    with trio.fail_after(GUARD_S):
        async with (
            v1_only_proxy(node) as url,
            open_session(url, model="echo", job_id=6) as session,
        ):
            assert session.protocol == "v1"
            assert session.host is not None
            assert session.host.verified_by_challenge
            assert not session.host.verified_by_handshake
        await node.wait_no_connections()


async def test_a_failed_v2_handshake_never_falls_back(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    impostor = PrivateKey().public_key.format()  # not the node's host key
    with trio.fail_after(GUARD_S), caplog.at_level("WARNING", logger="node.client"):
        with pytest.raises(ClientError) as caught:
            async with open_session(node.url, model="echo", job_id=5, host_public_key=impostor):
                pass
        await node.wait_no_connections()
    # the node cannot open message 1 (it was sealed to another key) and closes: an
    # error for the caller, not an HTTP refusal that would allow a fallback
    assert caught.value.code == "HOST_VERIFICATION_FAILED"
    assert not any("falling back" in r.getMessage() for r in caplog.records)
    assert not node.accounting.started
    assert _count(node, 'llm_node_protocol_connections_total{protocol="v2"}') == 1
    assert _count(node, 'llm_node_protocol_connections_total{protocol="v1"}') == 0
