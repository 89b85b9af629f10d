"""A node (in this Trio run) with the proxy in front of it, on 127.0.0.1 with OS ports.

The ``openai`` package is the client: its synchronous client runs in a worker thread
(``trio.to_thread``) while the node and the proxy run in the test's Trio loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import openai
import trio

from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.inference.base import Backend, Emit, GenerationRequest, GenerationResult
from node.inference.echo import EchoBackend
from node.inference.errors import ModelNotFound, RateLimited
from node.protocol.connection import Session
from node.proxy.link import SessionPool
from node.proxy.server import ProxyConfig, ProxyServer
from node.server.context import NoAccounting, NodeContext
from tests.support.wire import running_node

T = TypeVar("T")
MISSING_MODEL = "no-such-model"
BUSY_PROMPT = "please rate limit me"


class ProxyTestBackend(EchoBackend):
    """Echo, plus the refusals a real backend makes: an unknown model, a full queue.

    It also counts requests running at once (for the concurrency test).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.running = 0
        self.most_running = 0

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        if request.model == MISSING_MODEL:
            raise ModelNotFound(["echo"])
        last = request.messages[-1].content if request.messages else request.prompt
        if last == BUSY_PROMPT:
            raise RateLimited("too many requests are waiting for the model")
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            return await super().generate(request, emit)
        finally:
            self.running -= 1


class RecordingAccounting(NoAccounting):
    """Keeps what the node accounted for each request, and signals each one."""

    def __init__(self) -> None:
        self.finished: list[GenerationResult] = []
        self.changed = trio.Event()

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        self.finished.append(result)
        self.changed.set()
        self.changed = trio.Event()
        await trio.lowlevel.checkpoint()

    async def wait_for(self, count: int) -> list[GenerationResult]:
        while len(self.finished) < count:
            await self.changed.wait()
        return self.finished


@attrs.define
class Stack:
    node: NodeContext
    node_url: str
    backend: Backend
    accounting: RecordingAccounting
    pool: SessionPool
    server: ProxyServer
    host_key: HostKey

    @property
    def url(self) -> str:
        return self.server.url

    clients: list[openai.OpenAI] = attrs.field(factory=list)

    def openai_client(self, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
        """An ``openai`` client of the proxy; closed (with its kept-alive connections)
        when the stack ends."""
        kw.setdefault("timeout", 30.0)
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)
        self.clients.append(client)
        return client

    async def call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)


@asynccontextmanager
async def proxy_stack(
    *,
    backend: Backend | None = None,
    proxy_config: ProxyConfig | None = None,
    node_config: NodeConfig | None = None,
    max_concurrency: int = 4,
    protocol: str = "auto",
) -> AsyncIterator[Stack]:
    host_key = HostKey.generate()
    backend = backend or ProxyTestBackend()
    accounting = RecordingAccounting()
    async with running_node(
        host_key=host_key, backend=backend, accounting=accounting, config=node_config
    ) as (ctx, ws_url):
        node_url = ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
        async with SessionPool.open(
            node_url,
            protocol=protocol,
            expected_host_address=host_key.address,
            max_concurrency=max_concurrency,
        ) as pool:
            server = ProxyServer(proxy_config or ProxyConfig(listen_port=0), pool)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                stack = Stack(ctx, node_url, backend, accounting, pool, server, host_key)
                try:
                    yield stack
                finally:
                    for client in stack.clients:
                        client.close()
                    nursery.cancel_scope.cancel()
