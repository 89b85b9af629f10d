"""The security suite reuses the server suite's fixtures: in-process nodes on 127.0.0.1
(OS-chosen port), each shut down gracefully at teardown."""

from __future__ import annotations

from tests.server.conftest import node, node_factory

__all__ = ["node", "node_factory"]
