"""The node end to end with real inference: encrypted sessions through the WebSocket,
the embedded SmolLM2 model, and an OpenAI-compatible engine (llama_cpp.server)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from node.crypto.hostkey import HostKey
from node.inference.base import Backend, Emit, GenerationRequest, GenerationResult, ModelInfo
from node.inference.factory import create_backend
from node.inference.llama import LlamaBackend
from tests.support.wire import SDK_HOST_KEY, running_node, wire_client

pytestmark = pytest.mark.model

PROMPT = "What is the capital of France? Answer in one sentence."


class RecordingBackend:
    """Passes through to a real backend and keeps the results it returned."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.results: list[GenerationResult] = []

    def models(self) -> list[ModelInfo]:
        return self.inner.models()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # the module fixture owns the inner backend

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        result = await self.inner.generate(request, emit)
        self.results.append(result)
        return result


async def _ask(url: str, host: HostKey, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    async with wire_client(url) as client:
        ack = await client.init_encrypted(host.public_key, session_id="5", job_id=5, model="")
        assert ack["type"] == "session_init_ack"
        return await client.ask_encrypted_json(body)


async def test_encrypted_session_with_the_embedded_model(llama_backend: LlamaBackend) -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    backend = RecordingBackend(llama_backend)
    async with running_node(host_key=host, backend=backend) as (_ctx, url):
        with trio.fail_after(120):
            text, end = await _ask(
                url, host, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
            )
    assert text.strip()
    (result,) = backend.results
    assert end["usage"] == {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    assert end["finish_reason"] == result.finish_reason
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.completion_tokens <= 16


async def test_greedy_answer_is_the_same_through_the_node(llama_backend: LlamaBackend) -> None:
    """The node adds encryption, not changes: greedy text equals the backend's own."""
    pieces: list[str] = []

    async def emit(piece: Any) -> None:
        pieces.append(piece.text)

    request = GenerationRequest(prompt=PROMPT, max_tokens=12, temperature=0.0)
    await llama_backend.generate(request, emit)
    host = HostKey.parse(SDK_HOST_KEY)
    async with running_node(host_key=host, backend=RecordingBackend(llama_backend)) as (_c, url):
        with trio.fail_after(120):
            text, _ = await _ask(url, host, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert text == "".join(pieces)


async def test_openai_backend_streams_through_the_node(llama_server: str) -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    upstream = create_backend("openai", upstream_url=llama_server, upstream_timeout_s=60)
    backend = RecordingBackend(upstream)
    try:
        async with running_node(host_key=host, backend=backend) as (_ctx, url):
            with trio.fail_after(120):
                text, end = await _ask(
                    url, host, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
                )
    finally:
        await upstream.aclose()
    assert text.strip()
    (result,) = backend.results
    assert end["usage"]["completion_tokens"] == result.completion_tokens
    assert end["usage"]["prompt_tokens"] == result.prompt_tokens
    assert end["finish_reason"] in ("stop", "length")
