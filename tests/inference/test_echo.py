"""The deterministic echo backend."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.crypto.errors import ErrorCode
from node.inference import (
    Backend,
    ChatMessage,
    GenerationRequest,
    InferenceFailed,
    InvalidGenerationRequest,
    Piece,
    TokenLimitExceeded,
)
from node.inference.echo import EchoBackend


class Collector:
    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.times: list[float] = []

    async def __call__(self, piece: Piece) -> None:
        self.pieces.append(piece)
        self.times.append(trio.current_time())

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


def test_echo_is_a_backend() -> None:
    backend = EchoBackend()
    assert isinstance(backend, Backend)
    assert [m.id for m in backend.models()] == ["echo"]


async def test_echo_streams_word_pieces() -> None:
    out = Collector()
    result = await EchoBackend().generate(GenerationRequest(prompt="a b  c"), out)
    assert [p.text for p in out.pieces] == ["a", " b", "  c"]
    assert [p.tokens for p in out.pieces] == [1, 1, 1]
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (3, 3)
    assert result.usage_estimated is False
    assert result.total_tokens == 6


@pytest.mark.parametrize(
    "prompt", ["", "  ", "one", " lead and trail \n", "tabs\t\tand\nnewlines\r\n", "ü 🎉 日本語"]
)
async def test_echo_concatenation_is_exact(prompt: str) -> None:
    out = Collector()
    result = await EchoBackend().generate(GenerationRequest(prompt=prompt), out)
    assert out.text == prompt
    assert result.completion_tokens == len(out.pieces)


async def test_echo_respects_max_tokens() -> None:
    out = Collector()
    result = await EchoBackend().generate(GenerationRequest(prompt="a b c d", max_tokens=2), out)
    assert out.text == "a b"
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (4, 2)


async def test_echo_max_tokens_equal_to_length_is_a_natural_stop() -> None:
    out = Collector()
    result = await EchoBackend().generate(GenerationRequest(prompt="a b", max_tokens=2), out)
    assert out.text == "a b"
    assert result.finish_reason == "stop"


async def test_echo_default_max_tokens_applies_when_request_gives_none() -> None:
    out = Collector()
    backend = EchoBackend(default_max_tokens=1)
    result = await backend.generate(GenerationRequest(prompt="a b"), out)
    assert (out.text, result.finish_reason) == ("a", "length")


async def test_echo_messages_echo_the_last_user_message() -> None:
    out = Collector()
    request = GenerationRequest(
        messages=(
            ChatMessage("system", "be brief"),
            ChatMessage("user", "first question"),
            ChatMessage("assistant", "an answer"),
            ChatMessage("user", "second one"),
        )
    )
    result = await EchoBackend().generate(request, out)
    assert out.text == "second one"
    assert result.prompt_tokens == 8
    assert result.completion_tokens == 2


async def test_echo_delay_uses_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    out = Collector()
    start = trio.current_time()
    result = await EchoBackend(delay_s=1.5).generate(GenerationRequest(prompt="a b c"), out)
    assert result.completion_tokens == 3
    assert [t - start for t in out.times] == pytest.approx([1.5, 3.0, 4.5])


async def test_echo_cancellation_propagates(autojump_clock: trio.testing.MockClock) -> None:
    out = Collector()
    returned = False
    with trio.move_on_after(2.5) as scope:
        await EchoBackend(delay_s=1.0).generate(GenerationRequest(prompt="a b c d e"), out)
        returned = True
    assert scope.cancelled_caught
    assert not returned
    assert out.text == "a b"


async def test_echo_cancel_from_inside_emit_stops_at_once() -> None:
    pieces: list[str] = []
    with trio.CancelScope() as scope:

        async def emit(piece: Piece) -> None:
            pieces.append(piece.text)
            scope.cancel()
            await trio.lowlevel.checkpoint()

        await EchoBackend().generate(GenerationRequest(prompt="a b c"), emit)
    assert scope.cancelled_caught
    assert pieces == ["a"]


async def test_echo_emit_back_pressure() -> None:
    send, receive = trio.open_memory_channel[Piece](0)
    backend = EchoBackend()
    received: list[str] = []

    async def produce() -> None:
        async with send:
            await backend.generate(GenerationRequest(prompt="x y z"), send.send)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive:
            async for piece in receive:
                received.append(piece.text)
                # With a zero-size channel the producer cannot be ahead of us.
                assert send.statistics().current_buffer_used == 0
    assert received == ["x", " y", " z"]


@pytest.mark.parametrize("model", [None, "", "echo", "gpt-x", "tiny-vicuna", "模型-7b-中文"])
async def test_echo_accepts_and_ignores_any_model_name(model: str | None) -> None:
    out = Collector()
    result = await EchoBackend().generate(GenerationRequest(prompt="hi you", model=model), out)
    assert result.completion_tokens == 2
    assert out.text == "hi you"


async def test_echo_context_window() -> None:
    backend = EchoBackend(context_window=4)
    with pytest.raises(TokenLimitExceeded) as info:
        await backend.generate(GenerationRequest(prompt="a b c d"), Collector())
    assert (info.value.prompt_tokens, info.value.context_window) == (4, 4)
    assert "4 tokens" in info.value.message
    assert info.value.code is ErrorCode.TOKEN_LIMIT_EXCEEDED
    out = Collector()
    result = await backend.generate(GenerationRequest(prompt="a b c", max_tokens=100), out)
    assert (out.text, result.finish_reason) == ("a", "length")  # clamped to the room left


async def test_echo_fail_after_pieces() -> None:
    out = Collector()
    with pytest.raises(InferenceFailed) as info:
        await EchoBackend(fail_after_pieces=2).generate(GenerationRequest(prompt="a b c"), out)
    assert out.text == "a b"
    assert info.value.code is ErrorCode.INFERENCE_FAILED


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(),
        GenerationRequest(prompt="x", messages=(ChatMessage("user", "y"),)),
        GenerationRequest(prompt="x", max_tokens=0),
        GenerationRequest(prompt="x", temperature=-1.0),
        GenerationRequest(prompt="x", stop=("",)),
    ],
)
async def test_invalid_requests_are_refused(request_: GenerationRequest) -> None:
    with pytest.raises(InvalidGenerationRequest) as info:
        await EchoBackend().generate(request_, Collector())
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


async def test_echo_closed() -> None:
    backend = EchoBackend()
    assert await backend.ready()
    await backend.aclose()
    assert not await backend.ready()
    with pytest.raises(InferenceFailed):
        await backend.generate(GenerationRequest(prompt="x"), Collector())


def test_request_repr_hides_text() -> None:
    request = GenerationRequest(prompt="secret words", messages=None, stop=("hidden",))
    assert "secret" not in repr(request)
    assert "hidden" not in repr(request)
    assert "secret" not in repr(Piece("secret", 1))
    assert "secret" not in repr(ChatMessage("user", "secret"))
