"""Pooled sessions the node closed or forgot meanwhile: one transparent retry, no more.

A finished session waits in the proxy's pool for the next request; the node may close
its connection meanwhile (its ``--idle-timeout``, a restart, a cut) or, in v1, forget
the session (``SESSION_EXPIRED``). A request that then fails before the node answered
anything of it is sent once more on a fresh session; the HTTP client sees a normal
answer. Never twice, never on a fresh session, never after a piece of the answer came.

The first tests run a real node on 127.0.0.1 (OS-chosen port) and close its side of the
pooled connection deterministically from the node (its own close path, or a TCP reset),
waiting until the node has let go of it. The rest wire the pool to an in-process node
through memory streams under MockClock, where the test decides exactly when the node's
side goes away.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import httpx
import pytest
import trio
import trio.testing
from coincurve import PrivateKey
from trio_websocket import WebSocketConnection, wrap_client_stream

from node.cli import build_parser
from node.client import (
    ClientError,
    ConnectFailed,
    NodeErrorResponse,
    ProtocolViolation,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
)
from node.client.discovery import identity_from_public_key
from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.inference.base import GenerationRequest, GenerationResult, ModelInfo, Piece
from node.proxy.link import DEFAULT_IDLE_TTL_S, SessionPool, stale_session_error
from node.proxy.openai_api import ProxyRequest
from node.proxy.server import ProxyConfig, ProxyServer
from tests.server._support import RunningNode, build_node

GUARD_S: Final = 30  # real seconds for the socket tests, virtual ones under MockClock
BOTH = pytest.mark.parametrize("protocol", ["v2", "v1"])
CHAT: Final = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}


# ------------------------------------------------------------------ a real node


@attrs.define(eq=False)
class Stack:
    node: RunningNode
    pool: SessionPool
    proxy: ProxyServer
    http: httpx.AsyncClient

    async def ask(self, *, stream: bool = False) -> httpx.Response:
        return await self.http.post("/v1/chat/completions", json={**CHAT, "stream": stream})

    async def close_node_side(self, how: str) -> None:
        """The node closes every connection it has (the pooled ones), and lets go."""
        drivers = list(self.node.ctx.drivers)
        assert drivers, "the pool holds no connection to the node"
        for driver in drivers:
            if how == "goodbye":
                # what the node does at its idle timeout or shutdown: a close frame (and,
                # in v2, an authenticated CLOSE record before it)
                driver.shutdown()
            else:  # a TCP reset: no close frame, no FIN
                raw = driver.ws._stream._inner  # the node's trio SocketStream
                raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await raw.aclose()
        await self.node.wait_no_connections(within_s=GUARD_S)


@asynccontextmanager
async def real_stack(protocol: str, **node_config: Any) -> AsyncIterator[Stack]:
    node = build_node(**node_config)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(node.server.serve, node.shutdown)
        node.port = listeners[0].socket.getsockname()[1]
        assert node.ctx.host_key is not None
        try:
            async with SessionPool.open(
                node.url,
                protocol=protocol,
                allow_v1=True,
                expected_host_address=node.ctx.host_key.address,
                max_concurrency=2,
            ) as pool:
                proxy = ProxyServer(ProxyConfig(listen_port=0), pool)
                await nursery.start(proxy.serve)
                async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD_S) as http:
                    yield Stack(node, pool, proxy, http)
        finally:
            node.shutdown.set()
            nursery.cancel_scope.cancel()


def sse_text(response: httpx.Response) -> tuple[str, list[str]]:
    """The streamed text and the raw event payloads of an SSE answer."""
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    text = ""
    for event in events:
        if event != "[DONE]":
            for choice in json.loads(event).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text, events


@BOTH
@pytest.mark.parametrize("how", ["goodbye", "reset"])
async def test_a_pooled_session_the_node_closed_is_replaced_transparently(
    protocol: str, how: str
) -> None:
    with trio.fail_after(GUARD_S):
        async with real_stack(protocol) as stack:
            first = await stack.ask()
            assert first.status_code == 200, first.text
            assert stack.pool.idle_sessions == 1
            await stack.close_node_side(how)

            second = await stack.ask(stream=True)
            assert second.status_code == 200, second.text
            text, events = sse_text(second)
            assert text == "one two three"
            assert events[-1] == "[DONE]"
            assert stack.pool.retries == 1
            assert stack.pool.sessions_opened == 2
            # the node ran each request once
            assert len(stack.node.accounting.finished) == 2

            third = await stack.ask()  # the fresh session went back to the pool
            assert third.status_code == 200
            assert stack.pool.sessions_opened == 2
            assert stack.pool.retries == 1


async def test_a_v1_session_the_node_forgot_is_replaced_transparently() -> None:
    """``SESSION_EXPIRED`` for a pooled v1 session: the connection is still open."""
    with trio.fail_after(GUARD_S):
        async with real_stack("v1") as stack:
            assert (await stack.ask()).status_code == 200
            (driver,) = stack.node.ctx.drivers
            driver.state.config.session_ttl_s = 0.0  # its session's TTL has passed
            second = await stack.ask()
            assert second.status_code == 200, second.text
            assert second.json()["choices"][0]["message"]["content"] == "one two three"
            assert stack.pool.retries == 1
            assert stack.pool.sessions_opened == 2
            assert len(stack.node.accounting.finished) == 2


async def test_a_request_is_retried_once_only() -> None:
    """The fresh session fails the same way: the error reaches the client, after
    exactly one retry (two sessions, not three)."""
    with trio.fail_after(GUARD_S):
        async with real_stack("v1") as stack:
            assert (await stack.ask()).status_code == 200
            stack.node.ctx.config.session_ttl_s = 0.0  # every new session too
            for driver in stack.node.ctx.drivers:
                driver.state.config.session_ttl_s = 0.0
            second = await stack.ask()
            assert second.status_code == 502
            assert "SESSION_EXPIRED" in second.json()["error"]["message"]
            assert stack.pool.retries == 1
            assert stack.pool.sessions_opened == 2
            assert len(stack.node.accounting.finished) == 1


async def test_a_fresh_session_is_never_retried() -> None:
    with trio.fail_after(GUARD_S):
        async with real_stack("v1", session_ttl_s=0.0) as stack:
            refused = await stack.ask()
            assert refused.status_code == 502
            assert "SESSION_EXPIRED" in refused.json()["error"]["message"]
            assert stack.pool.retries == 0
            assert stack.pool.sessions_opened == 1


# ------------------------------------------------------------------ memory streams


class StepBackend:
    """Emits ``"first"``; then ``" second"`` and ends, or for the prompt ``hold`` waits
    (until cancelled) after saying so."""

    name = "step"

    def __init__(self) -> None:
        self.calls = 0
        self.holding = trio.Event()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="echo", context_window=None, owned_by="tests")]

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def generate(self, request: GenerationRequest, emit: Any) -> GenerationResult:
        self.calls += 1
        await emit(Piece("first", 1))
        prompt = request.prompt or (request.messages[-1].content if request.messages else "")
        if prompt == "hold":
            self.holding.set()
            await trio.sleep_forever()
        await emit(Piece(" second", 1))
        return GenerationResult("stop", 1, 2)


class MemoryTransport:
    """Opens each pooled session's WebSocket to ``node`` over a memory stream pair; the
    node's ends are kept so a test can cut them."""

    def __init__(self, node: RunningNode, protocol: str) -> None:
        self.node = node
        self.path = f"/{protocol}/ws"
        self.node_sides: list[trio.testing.MemoryStream | Any] = []
        self.unreachable = False

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[WebSocketConnection]:
        if self.unreachable:
            raise ConnectFailed("cannot connect (the test made the node unreachable)")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.node_sides.append(server_stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.node.server.handle_stream, server_stream)
            ws = await wrap_client_stream(
                nursery,
                client_stream,  # type: ignore[arg-type]
                "127.0.0.1",
                self.path,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                await client_stream.aclose()

    async def cut(self, index: int = -1) -> None:
        """The node's side of a connection goes away (no close frame)."""
        await self.node_sides[index].aclose()


@asynccontextmanager
async def memory_pool(
    protocol: str, backend: Any, **pool_options: Any
) -> AsyncIterator[tuple[SessionPool, MemoryTransport, RunningNode]]:
    node = build_node(backend=backend)
    transport = MemoryTransport(node, protocol)
    async with trio.open_nursery() as nursery:
        pool = SessionPool(
            nursery,
            url="http://127.0.0.1:9",  # never dialled: the transport makes every connection
            protocol=protocol,
            host=identity_from_public_key(node.host_public_key),
            client_key=PrivateKey(),
            max_concurrency=2,
            open_websocket=transport,
            **pool_options,
        )
        try:
            yield pool, transport, node
        finally:
            pool.close()


def request(text: str, *, stream: bool = False) -> ProxyRequest:
    return ProxyRequest(kind="chat", model="echo", messages=(("user", text),), stream=stream)


async def answer_text(pool: SessionPool, text: str) -> str:
    async with pool.request(request(text)) as answer:
        return "".join([piece async for piece in answer])


@BOTH
async def test_retry_on_a_cut_pooled_session(
    protocol: str, autojump_clock: trio.testing.MockClock
) -> None:
    backend = StepBackend()
    with trio.fail_after(GUARD_S):
        async with memory_pool(protocol, backend) as (pool, transport, node):
            assert await answer_text(pool, "hi") == "first second"
            await transport.cut()
            await node.wait_no_connections()
            assert await answer_text(pool, "hi") == "first second"
            assert (pool.retries, pool.sessions_opened, backend.calls) == (1, 2, 2)


async def test_when_the_fresh_session_cannot_be_opened_its_error_is_the_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = StepBackend()
    with trio.fail_after(GUARD_S):
        async with memory_pool("v2", backend) as (pool, transport, node):
            assert await answer_text(pool, "hi") == "first second"
            await transport.cut()
            await node.wait_no_connections()
            transport.unreachable = True
            with pytest.raises(ConnectFailed, match="unreachable"):
                await answer_text(pool, "hi")
            assert (pool.retries, pool.sessions_opened, backend.calls) == (1, 1, 1)
            assert pool.idle_sessions == 0


@BOTH
async def test_no_retry_once_part_of_the_answer_arrived(
    protocol: str, autojump_clock: trio.testing.MockClock
) -> None:
    backend = StepBackend()
    with trio.fail_after(GUARD_S):
        async with memory_pool(protocol, backend) as (pool, transport, node):
            assert await answer_text(pool, "hi") == "first second"
            async with pool.request(request("hold")) as answer:
                assert await answer.__anext__() == "first"
                await transport.cut()  # the pooled connection breaks mid-answer
                with pytest.raises(StreamTruncated):
                    await answer.__anext__()
            assert (pool.retries, pool.sessions_opened, backend.calls) == (0, 1, 2)
            await node.wait_no_connections()


@BOTH
async def test_no_retry_after_a_piece_went_to_the_http_client(
    protocol: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Through the proxy's HTTP side: the first SSE event is out when the connection to
    the node breaks; the stream ends with an error event, never [DONE], and the request
    is not sent again."""
    backend = StepBackend()
    with trio.fail_after(GUARD_S):
        async with memory_pool(protocol, backend) as (pool, transport, _node):
            assert await answer_text(pool, "hi") == "first second"
            proxy = ProxyServer(ProxyConfig(listen_port=8090), pool)
            client, server = trio.testing.memory_stream_pair()
            body = json.dumps(
                {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
            ).encode()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.handle_stream, server)
                await client.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8090\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                received = b""
                while b'"content":"first"' not in received:
                    data = await client.receive_some(65536)
                    assert data, received
                    received += data
                await transport.cut()  # after part of the answer reached the client
                while not received.endswith(b"0\r\n\r\n"):  # the chunked body's end
                    data = await client.receive_some(65536)
                    assert data, received
                    received += data
                await client.aclose()
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"content":"first"' in received
    assert b"[DONE]" not in received
    assert b'"code":"stream_truncated"' in received
    assert (pool.retries, pool.sessions_opened, backend.calls) == (0, 1, 2)


# ------------------------------------------------------------------ idle sessions


async def test_an_idle_session_is_closed_after_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = StepBackend()
    with trio.fail_after(GUARD_S * 10):
        async with memory_pool("v2", backend, idle_ttl_s=50.0) as (pool, _, node):
            assert await answer_text(pool, "hi") == "first second"
            await trio.sleep(49.0)
            assert pool.idle_sessions == 1
            assert len(node.ctx.drivers) == 1
            assert await answer_text(pool, "hi") == "first second"  # reused: timer restarts
            await trio.sleep(49.0)
            assert pool.idle_sessions == 1
            assert pool.sessions_opened == 1
            await trio.sleep(2.0)
            assert pool.idle_sessions == 0
            # the proxy said goodbye (a CLOSE record) and the node let go
            await node.wait_no_connections()
            assert [reason for _, reason in node.accounting.ended] == ["closed"]


def test_the_default_idle_ttl_is_shorter_than_the_nodes_idle_timeout() -> None:
    serve = build_parser().parse_args(["serve"])
    assert NodeConfig().idle_timeout_s > DEFAULT_IDLE_TTL_S
    assert serve.idle_timeout > DEFAULT_IDLE_TTL_S


def test_the_session_idle_timeout_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> Any:
        return build_parser().parse_args(["proxy", "--node", "http://127.0.0.1:1", *argv])

    assert parse().session_idle_timeout == DEFAULT_IDLE_TTL_S
    assert parse("--session-idle-timeout", "20").session_idle_timeout == 20.0
    monkeypatch.setenv("LLM_NODE_PROXY_SESSION_IDLE_TIMEOUT", "12.5")
    assert parse().session_idle_timeout == 12.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse("--session-idle-timeout", bad)


@pytest.mark.parametrize(
    ("error", "stale"),
    [
        (StreamTruncated("the connection closed"), True),
        (SessionClosed("the session broke earlier"), True),
        (NodeErrorResponse("SESSION_EXPIRED", "expired"), True),
        (NodeErrorResponse("SESSION_KEY_NOT_FOUND", "unknown"), True),
        # a slow node may be working on the request: sending it again could run it twice
        (StreamTimeout("no first frame"), False),
        # refusals of the request itself, and a node that breaks the protocol
        (NodeErrorResponse("MODEL_NOT_FOUND", "no such model"), False),
        (NodeErrorResponse("RATE_LIMITED", "busy"), False),
        (NodeErrorResponse("INFERENCE_FAILED", "unwell"), False),
        (ProtocolViolation("bad frame"), False),
        (ConnectFailed("unreachable"), False),
    ],
)
def test_which_errors_say_the_session_was_gone(error: ClientError, stale: bool) -> None:
    assert stale_session_error(error) is stale


def test_the_session_idle_timeout_reaches_the_pool(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    seen: dict[str, Any] = {}

    def fake_open(url: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise ConnectFailed("stopped by the test")

    monkeypatch.setattr(SessionPool, "open", fake_open)
    argv = ["proxy", "--node", "http://127.0.0.1:1", "--session-idle-timeout", "25"]
    assert main(argv) == 1
    assert "stopped by the test" in capsys.readouterr().err
    assert seen["idle_ttl_s"] == 25.0


async def test_the_pool_refuses_a_ttl_that_is_not_positive() -> None:
    async with trio.open_nursery() as nursery:
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="idle_ttl_s"):
                SessionPool(
                    nursery,
                    url="http://127.0.0.1:9",
                    protocol="v2",
                    host=identity_from_public_key(HostKey.generate().public_key),
                    client_key=PrivateKey(),
                    max_concurrency=1,
                    idle_ttl_s=bad,
                )
