"""A backend that forwards requests to an OpenAI-compatible HTTP server.

Works with anything that serves ``POST /v1/chat/completions`` with ``stream: true`` as
server-sent events: vLLM, the llama.cpp server, ``python -m llama_cpp.server``, Ollama's
``/v1``. The request asks for ``stream_options: {"include_usage": true}``; when the
upstream still sends no usage chunk, the counts are estimated (one token per content delta,
about four characters per prompt token) and the result says ``usage_estimated=True``.

Every upstream failure (connection refused, HTTP 4xx/5xx, a stream that is not JSON, a
timeout, a stream cut short) becomes :class:`InferenceFailed` with the status and a
truncated upstream message, never with the prompt or the API key. Cancelling the caller
closes the upstream request (the HTTP connection is dropped, so the upstream stops).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from typing import Any

import httpx
import trio
from httpx_sse import SSEError, aconnect_sse

from node.crypto.encoding import loads_bounded
from node.inference.base import (
    Emit,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Piece,
    report_prompt_tokens,
    request_messages,
    validate_request,
)
from node.inference.errors import InferenceFailed, ModelNotFound

logger = logging.getLogger("node.inference")

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_TOKENS = 256
_MAX_ERROR_TEXT = 200
_MAX_ERROR_BODY = 4096
_DRAIN_AFTER_DONE_S = 1.0
_ABANDON_S = 1.0


def _api_base(url: str) -> httpx.URL:
    """``http://host:port`` or ``http://host:port/v1`` (or any ``.../v1``) -> the ``/v1`` URL."""
    base = httpx.URL(url.rstrip("/"))
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError("upstream_url must be an http:// or https:// URL")
    if not base.path.rstrip("/").endswith("/v1"):
        base = base.copy_with(path=base.path.rstrip("/") + "/v1")
    return base


def _display(url: httpx.URL) -> str:
    """The URL without user info, query or fragment (safe for logs and messages)."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


class OpenAIBackend:
    """Streams completions from an OpenAI-compatible upstream.

    Options:

    * ``upstream_url``: the server's base URL; ``/v1`` is appended unless the path already
      ends in ``/v1``.
    * ``upstream_api_key``: sent as ``Authorization: Bearer ...`` (take it from the
      environment; it is never logged).
    * ``upstream_model_map``: node model name -> upstream model name. When given, exactly
      these names are served and the first is the default. When empty, the upstream's own
      list (``GET /v1/models``) is served as is and its first model is the default.
    * ``upstream_timeout_s``: limit for connecting and for each wait on the upstream (the
      first byte, and every later chunk); a stream may run longer in total.
    * ``default_max_tokens`` / ``default_temperature``: used when a request gives none
      (temperature None leaves it to the upstream).
    * ``transport``: an httpx transport (tests).
    """

    name = "openai"

    def __init__(
        self,
        *,
        upstream_url: str,
        upstream_api_key: str | None = None,
        upstream_model_map: Mapping[str, str] | None = None,
        upstream_timeout_s: float = DEFAULT_TIMEOUT_S,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        default_temperature: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if upstream_timeout_s <= 0 or default_max_tokens < 1:
            raise ValueError("upstream_timeout_s must be > 0 and default_max_tokens >= 1")
        self._base = _api_base(upstream_url)
        self._where = _display(self._base)
        self._api_key = upstream_api_key or None
        self._model_map = dict(upstream_model_map or {})
        self._timeout_s = upstream_timeout_s
        self._default_max_tokens = default_max_tokens
        self._default_temperature = default_temperature
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(upstream_timeout_s),
            transport=transport,
            follow_redirects=False,
        )
        # Upstream model id -> context window (None when the upstream does not say).
        self._upstream_models: dict[str, int | None] | None = None

    # ----------------------------------------------------------------- interface

    def models(self) -> list[ModelInfo]:
        known = self._upstream_models or {}
        if self._model_map:
            return [
                ModelInfo(id=name, context_window=known.get(upstream), owned_by="upstream")
                for name, upstream in self._model_map.items()
            ]
        return [
            ModelInfo(id=model_id, context_window=window, owned_by="upstream")
            for model_id, window in known.items()
        ]

    async def ready(self) -> bool:
        """Probe ``GET /v1/models``; True when the upstream answers with a model list."""
        try:
            await self._refresh_models()
        except InferenceFailed as exc:
            logger.warning("upstream %s is not ready: %s", self._where, exc.message)
            return False
        missing = [u for u in self._model_map.values() if u not in (self._upstream_models or {})]
        if missing:
            logger.warning("upstream %s does not list the mapped model(s) %s", self._where, missing)
        return True

    async def aclose(self) -> None:
        await self._client.aclose()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        validate_request(request)
        upstream_model = await self._resolve_model(request.model)
        messages = request_messages(request)
        body: dict[str, Any] = {
            "model": upstream_model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens or self._default_max_tokens,
        }
        temperature = (
            request.temperature if request.temperature is not None else self._default_temperature
        )
        if temperature is not None:
            body["temperature"] = temperature
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        secrets = [m.content for m in messages]
        # The exact count comes with the stream's usage; until then, an estimate.
        report_prompt_tokens(emit, _estimate_prompt_tokens(secrets), estimated=True)

        started = time.perf_counter()
        first_at: float | None = None
        deltas = 0
        finish: str | None = None
        usage: tuple[int, int] | None = None
        done = False
        try:
            async with aconnect_sse(
                self._client, "POST", str(self._base) + "/chat/completions", json=body
            ) as source:
                if source.response.status_code >= 400:
                    raise await self._http_error(source.response, secrets)
                events = source.aiter_sse()
                try:
                    async for event in events:
                        data = event.data.strip()
                        if not data:
                            continue
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = self._parse_chunk(data, secrets)
                        usage = _usage(chunk) or usage
                        for choice in _choices(chunk):
                            content = _content(choice)
                            if content:
                                if first_at is None:
                                    first_at = time.perf_counter()
                                deltas += 1
                                await emit(Piece(text=content, tokens=1))
                            reason = choice.get("finish_reason")
                            if isinstance(reason, str) and reason:
                                finish = "length" if reason == "length" else "stop"
                    if done:
                        # Read on to the end of the body so the connection can be reused.
                        with trio.move_on_after(_DRAIN_AFTER_DONE_S):
                            async for _ in events:
                                pass
                finally:
                    await _abandon(source.response, events)
        except SSEError:  # a subclass of httpx.TransportError: first
            raise InferenceFailed(
                f"the upstream server at {self._where} did not answer with an event stream"
            ) from None
        except httpx.TimeoutException:
            raise InferenceFailed(
                f"the upstream server at {self._where} did not answer within {self._timeout_s:g} s"
            ) from None
        except httpx.ConnectError:
            raise InferenceFailed(
                f"cannot connect to the upstream server at {self._where}"
            ) from None
        except httpx.HTTPError as exc:
            raise InferenceFailed(
                f"the connection to the upstream server at {self._where} failed: "
                f"{type(exc).__name__}"
            ) from None

        if finish is None:
            if not done:
                raise InferenceFailed(
                    f"the upstream stream from {self._where} ended before the answer finished"
                )
            finish = "stop"
        elapsed = time.perf_counter() - started
        if usage is not None:
            prompt_tokens, completion_tokens = usage
            estimated = False
        else:
            prompt_tokens = _estimate_prompt_tokens(secrets)
            completion_tokens = deltas
            estimated = True
        logger.info(
            "upstream generation finished: upstream=%s finish=%s prompt_tokens=%d "
            "completion_tokens=%d estimated=%s first_token_ms=%.0f total_s=%.2f",
            self._where,
            finish,
            prompt_tokens,
            completion_tokens,
            estimated,
            (first_at - started) * 1000 if first_at is not None else -1.0,
            elapsed,
        )
        return GenerationResult(finish, prompt_tokens, completion_tokens, estimated)

    # ----------------------------------------------------------------- helpers

    async def _resolve_model(self, requested: str | None) -> str:
        if self._model_map:
            name = requested or next(iter(self._model_map))
            if name not in self._model_map:
                raise ModelNotFound(list(self._model_map))
            return self._model_map[name]
        if self._upstream_models is None:
            await self._refresh_models()
        known = list(self._upstream_models or {})
        if not known:
            raise InferenceFailed(f"the upstream server at {self._where} lists no models")
        name = requested or known[0]
        if name not in known:
            raise ModelNotFound(known)
        return name

    async def _refresh_models(self) -> None:
        try:
            response = await self._client.get(str(self._base) + "/models")
        except httpx.TimeoutException:
            raise InferenceFailed(
                f"the upstream server at {self._where} did not answer within {self._timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise InferenceFailed(
                f"cannot reach the upstream server at {self._where}: {type(exc).__name__}"
            ) from None
        if response.status_code >= 400:
            raise await self._http_error(response, [])
        try:
            entries = loads_bounded(response.text)["data"]
            models: dict[str, int | None] = {}
            for entry in entries:
                window = entry.get("max_model_len", entry.get("context_length"))
                models[str(entry["id"])] = window if isinstance(window, int) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InferenceFailed(
                f"the upstream server at {self._where} sent an unusable model list"
            ) from None
        self._upstream_models = models

    async def _http_error(self, response: httpx.Response, secrets: list[str]) -> InferenceFailed:
        raw = b""
        blocks = response.aiter_bytes()
        try:
            async for block in blocks:
                raw += block
                if len(raw) >= _MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass
        finally:
            await _abandon(response, blocks)
        detail = self._scrub(_error_text(raw[:_MAX_ERROR_BODY]), secrets)
        message = f"the upstream server at {self._where} answered HTTP {response.status_code}"
        return InferenceFailed(f"{message}: {detail}" if detail else message)

    def _parse_chunk(self, data: str, secrets: list[str]) -> dict[str, Any]:
        try:
            chunk = loads_bounded(data)
        except ValueError:
            raise InferenceFailed(
                f"the upstream server at {self._where} sent a stream event that is not JSON"
            ) from None
        if not isinstance(chunk, dict):
            raise InferenceFailed(
                f"the upstream server at {self._where} sent a stream event that is not an object"
            )
        error = chunk.get("error")
        if error is not None:
            detail = self._scrub(_error_text(json.dumps(chunk).encode()), secrets)
            raise InferenceFailed(
                f"the upstream server at {self._where} reported an error: {detail}"
            )
        return chunk

    def _scrub(self, text: str, secrets: list[str]) -> str:
        """Remove the prompt and the API key should the upstream have echoed them."""
        for secret in [*secrets, self._api_key or ""]:
            if len(secret) >= 4 and secret in text:
                text = text.replace(secret, "[redacted]")
        if len(text) > _MAX_ERROR_TEXT:
            text = text[: _MAX_ERROR_TEXT - 3] + "..."
        return text


async def _abandon(response: httpx.Response, reader: AsyncIterator[Any]) -> None:
    """Stop reading a streamed response early without leaving suspended generators behind.

    httpx and httpcore read a body through a chain of async generators; closing the response
    in the middle leaves each of them suspended, and Trio warns about every one when it is
    garbage collected. Instead, the connection's socket is closed and the outermost reader
    is resumed once: its next read fails at once, and the error unwinds and finishes every
    generator in the chain. The upstream sees the connection close (that is what stops it
    generating). Shielded and bounded, because it also runs while being cancelled.
    """
    if getattr(reader, "ag_frame", None) is None:  # finished (or not a generator): no-op
        return
    with trio.CancelScope(shield=True), trio.move_on_after(_ABANDON_S):
        network_stream = response.extensions.get("network_stream")
        if network_stream is not None:
            with suppress(Exception):
                await network_stream.aclose()
        with suppress(Exception):
            await reader.__anext__()
        aclose = getattr(reader, "aclose", None)
        if aclose is not None:
            with suppress(Exception):
                await aclose()


def _error_text(raw: bytes) -> str:
    """The human part of an upstream error body (OpenAI, FastAPI or plain text shapes).

    Structured validation errors are reduced to their ``msg`` fields because they may carry
    the offending input (the prompt) in an ``input`` field.
    """
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = loads_bounded(text)
    except ValueError:
        return " ".join(text.split())
    parts: list[str] = []
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            parts.append(error["message"])
        elif isinstance(error, str):
            parts.append(error)
        detail = body.get("detail")
        if isinstance(detail, str):
            parts.append(detail)
        elif isinstance(detail, list):
            parts.extend(
                str(item["msg"]) for item in detail if isinstance(item, dict) and "msg" in item
            )
        if not parts and isinstance(body.get("message"), str):
            parts.append(body["message"])
    return " ".join(" ".join(parts).split())


def _choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0]


def _content(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")  # some servers stream completion-style chunks
    return text if isinstance(text, str) else ""


def _usage(chunk: dict[str, Any]) -> tuple[int, int] | None:
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def _estimate_prompt_tokens(contents: list[str]) -> int:
    """About four characters per token plus a few tokens of chat template per message."""
    return sum(math.ceil(len(c) / 4) + 4 for c in contents)
