"""Fixtures: in-process nodes on 127.0.0.1 (OS-chosen port) in the test's own Trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.server._support import RunningNode, build_node


class NodeFactory:
    """Starts nodes in a fixture nursery; every node is shut down gracefully at teardown."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.nodes: list[RunningNode] = []

    async def start(self, **kw: Any) -> RunningNode:
        """A listening node; keyword arguments go to :func:`build_node`."""
        node = build_node(**kw)
        listeners = await self._nursery.start(node.server.serve, node.shutdown)
        node.port = listeners[0].socket.getsockname()[1]
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        for node in self.nodes:
            node.shutdown.set()


@pytest.fixture
async def node_factory() -> AsyncIterator[NodeFactory]:
    async with trio.open_nursery() as nursery:
        factory = NodeFactory(nursery)
        yield factory
        factory.stop_all()


@pytest.fixture
async def node(node_factory: NodeFactory) -> RunningNode:
    """A node with the SDK dev host key and the echo backend."""
    return await node_factory.start()
