"""Shared pieces for the client tests: an in-process node on 127.0.0.1 (port 0)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from node.config import NodeConfig
from node.crypto import HostKey
from node.inference.base import Backend, GenerationRequest, GenerationResult, ModelInfo, Piece
from node.inference.echo import EchoBackend
from node.protocol.replay import InitReplayCache
from node.server.app import NodeServer
from node.server.context import NodeContext

GUARD_S = 20  # every network test runs under trio.fail_after(GUARD_S)


@attrs.define
class LiveNode:
    url: str
    port: int
    host_key: HostKey
    ctx: NodeContext


@asynccontextmanager
async def run_node(
    backend: Backend | None = None, *, plaintext_only: bool = False, **config: Any
) -> AsyncIterator[LiveNode]:
    """The real node (NodeServer) in this Trio run, listening on an OS-chosen port.

    It serves protocol v1 only unless ``protocols`` says otherwise: these tests are about
    v1, which a default client (``protocol="auto"``) then uses after its fallback; the v2
    tests (tests/client/test_v2_*.py) ask for ``protocols=("v1", "v2")``.
    """
    config.setdefault("protocols", ("v1",))
    key = HostKey.generate()
    ctx = NodeContext(
        config=NodeConfig(port=0, **config),
        host_key=None if plaintext_only else key,
        backend=backend if backend is not None else EchoBackend(),
        replay_cache=InitReplayCache(window_s=900, clock=trio.current_time),
    )
    server = NodeServer(ctx)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, shutdown)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield LiveNode(f"http://127.0.0.1:{port}", port, key, ctx)
        finally:
            shutdown.set()


class GatedBackend:
    """Emits the given pieces, then waits until cancelled (a stream stuck mid-way).

    ``emitted`` is set once every piece was handed to the node, so a test can act
    "in the middle of a stream" without any timing.
    """

    name = "gated"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.emitted = trio.Event()
        self.cancelled = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="gated", context_window=None, owned_by="test")]

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    async def generate(self, request: GenerationRequest, emit: Any) -> GenerationResult:
        for piece in self.pieces:
            await emit(Piece(text=piece, tokens=1))
        self.emitted.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")  # pragma: no cover
