"""OpenAIBackend against a scripted local upstream (tests/inference/fake_upstream.py)."""

from __future__ import annotations

import functools
import json
import logging
import socket

import pytest
import trio
import trio.testing

from node.crypto.errors import ErrorCode
from node.inference import ChatMessage, GenerationRequest, InferenceFailed, ModelNotFound, Piece
from node.inference.openai import OpenAIBackend
from tests.inference.fake_upstream import (
    FakeUpstream,
    Request,
    chunk,
    http_response,
    sse_event,
    sse_head,
    sse_response,
)

API_KEY = "sk-test-key-0123456789"
PROMPT = "tell me the secret plan for tomorrow"


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), fake.handle, 0
    )
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


def make_backend(upstream: FakeUpstream, **options: object) -> OpenAIBackend:
    settings: dict[str, object] = {
        "upstream_url": upstream.url,
        "upstream_api_key": API_KEY,
        "upstream_model_map": {"node-model": "up-a"},
        "upstream_timeout_s": 5.0,
    }
    settings.update(options)
    return OpenAIBackend(**settings)  # type: ignore[arg-type]


class Collector:
    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    async def __call__(self, piece: Piece) -> None:
        self.pieces.append(piece)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


async def test_stream_with_role_delta_empty_finish_and_usage(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response(
        [
            chunk(role="assistant"),
            chunk("Hello"),
            chunk(", wor"),
            chunk("ld"),
            chunk(finish="stop"),
            {"id": "x", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}},
            "[DONE]",
        ]
    )
    backend = make_backend(upstream)
    out = Collector()
    request = GenerationRequest(prompt=PROMPT, temperature=0, max_tokens=7, stop=("END",), seed=3)
    result = await backend.generate(request, out)
    await backend.aclose()

    assert [p.text for p in out.pieces] == ["Hello", ", wor", "ld"]
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (11, 3)
    assert result.usage_estimated is False

    sent = upstream.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    body = sent.json()
    assert body["model"] == "up-a"
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["stop"], body["seed"]) == (
        7,
        0,
        ["END"],
        3,
    )


async def test_missing_usage_is_estimated(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response(
        [chunk(role="assistant", content=""), chunk("a"), chunk(" b"), chunk(finish="length")]
    )  # no usage chunk and no [DONE]: the finish reason alone ends the answer
    backend = make_backend(upstream, upstream_api_key=None, default_temperature=0.5)
    out = Collector()
    messages = (ChatMessage("system", "s" * 8), ChatMessage("user", "u" * 40))
    result = await backend.generate(GenerationRequest(messages=messages), out)
    await backend.aclose()
    assert out.text == "a b"
    assert result.finish_reason == "length"
    assert result.usage_estimated is True
    assert result.completion_tokens == 2
    assert result.prompt_tokens == (2 + 4) + (10 + 4)
    sent = upstream.requests[-1]
    assert "authorization" not in sent.headers
    assert sent.json()["temperature"] == 0.5
    assert sent.json()["max_tokens"] == 256
    assert "stop" not in sent.json()
    assert "seed" not in sent.json()


async def test_done_without_finish_reason_is_a_stop(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response([chunk("x"), "[DONE]"])
    backend = make_backend(upstream)
    result = await backend.generate(GenerationRequest(prompt="p"), Collector())
    await backend.aclose()
    assert result.finish_reason == "stop"


async def test_models_and_ready(upstream: FakeUpstream) -> None:
    mapped = make_backend(upstream)
    assert [m.id for m in mapped.models()] == ["node-model"]
    assert mapped.models()[0].context_window is None
    assert await mapped.ready()
    assert mapped.models()[0].context_window == 2048
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
    await mapped.aclose()

    passthrough = make_backend(upstream, upstream_model_map=None)
    assert passthrough.models() == []
    assert await passthrough.ready()
    assert [(m.id, m.context_window) for m in passthrough.models()] == [
        ("up-a", 2048),
        ("up-b", None),
    ]
    await passthrough.aclose()


async def test_unmapped_upstream_model_is_logged(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend(upstream, upstream_model_map={"n": "not-there"})
    with caplog.at_level(logging.WARNING, logger="node.inference"):
        assert await backend.ready()
    await backend.aclose()
    assert "not-there" in caplog.text
    assert API_KEY not in caplog.text


async def test_model_resolution(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response([chunk("x", finish="stop")])
    mapped = make_backend(upstream)
    with pytest.raises(ModelNotFound) as info:
        await mapped.generate(GenerationRequest(prompt="p", model="up-a"), Collector())
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "node-model" in info.value.message
    await mapped.generate(GenerationRequest(prompt="p", model="node-model"), Collector())
    assert upstream.requests[-1].json()["model"] == "up-a"
    await mapped.aclose()

    passthrough = make_backend(upstream, upstream_model_map={})
    with pytest.raises(ModelNotFound):
        await passthrough.generate(GenerationRequest(prompt="p", model="zzz"), Collector())
    await passthrough.generate(GenerationRequest(prompt="p", model="up-b"), Collector())
    assert upstream.requests[-1].json()["model"] == "up-b"
    await passthrough.generate(GenerationRequest(prompt="p"), Collector())
    assert upstream.requests[-1].json()["model"] == "up-a"  # the first listed is the default
    await passthrough.aclose()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connection_refused() -> None:
    backend = OpenAIBackend(
        upstream_url=f"http://127.0.0.1:{closed_port()}", upstream_model_map={"m": "m"}
    )
    assert not await backend.ready()
    with pytest.raises(InferenceFailed) as info:
        await backend.generate(GenerationRequest(prompt=PROMPT), Collector())
    await backend.aclose()
    assert "cannot connect" in info.value.message
    assert info.value.code is ErrorCode.INFERENCE_FAILED


async def test_http_500_carries_status_and_upstream_message(upstream: FakeUpstream) -> None:
    async def fail(request: Request, stream: trio.SocketStream) -> None:
        body = json.dumps({"error": {"message": "model crashed: out of memory", "type": "x"}})
        await stream.send_all(http_response(500, body.encode()))

    upstream.respond = fail
    backend = make_backend(upstream)
    with pytest.raises(InferenceFailed) as info:
        await backend.generate(GenerationRequest(prompt=PROMPT), Collector())
    await backend.aclose()
    assert "HTTP 500" in info.value.message
    assert "model crashed: out of memory" in info.value.message


async def test_http_error_never_echoes_the_prompt_or_key(upstream: FakeUpstream) -> None:
    async def fail(request: Request, stream: trio.SocketStream) -> None:
        # FastAPI validation errors carry the offending input; plain text may echo anything.
        detail = [{"loc": ["body"], "msg": "bad field", "input": request.json()}]
        await stream.send_all(http_response(422, json.dumps({"detail": detail}).encode()))

    upstream.respond = fail
    backend = make_backend(upstream)
    with pytest.raises(InferenceFailed) as info:
        await backend.generate(GenerationRequest(prompt=PROMPT), Collector())
    assert "HTTP 422" in info.value.message
    assert "bad field" in info.value.message
    assert PROMPT not in info.value.message

    async def echo_text(request: Request, stream: trio.SocketStream) -> None:
        text = f"cannot handle {PROMPT} with key {API_KEY}" + "!" * 1000
        await stream.send_all(http_response(400, text.encode(), "text/plain"))

    upstream.respond = echo_text
    with pytest.raises(InferenceFailed) as info:
        await backend.generate(GenerationRequest(prompt=PROMPT), Collector())
    await backend.aclose()
    assert "HTTP 400" in info.value.message
    assert PROMPT not in info.value.message
    assert API_KEY not in info.value.message
    assert len(info.value.message) < 400


async def test_malformed_sse_json(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response([chunk("fine"), "{not json"])
    backend = make_backend(upstream)
    out = Collector()
    with pytest.raises(InferenceFailed, match="not JSON"):
        await backend.generate(GenerationRequest(prompt="p"), out)
    await backend.aclose()
    assert out.text == "fine"


async def test_error_event_inside_the_stream(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response([{"error": {"message": "upstream overloaded"}}])
    backend = make_backend(upstream)
    with pytest.raises(InferenceFailed, match="upstream overloaded"):
        await backend.generate(GenerationRequest(prompt="p"), Collector())
    await backend.aclose()


async def test_not_an_event_stream(upstream: FakeUpstream) -> None:
    async def plain(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(http_response(200, b'{"choices": []}'))

    upstream.respond = plain
    backend = make_backend(upstream)
    with pytest.raises(InferenceFailed, match="event stream"):
        await backend.generate(GenerationRequest(prompt="p"), Collector())
    await backend.aclose()


async def test_stream_cut_short(upstream: FakeUpstream) -> None:
    upstream.respond = sse_response([chunk(role="assistant"), chunk("half")])
    backend = make_backend(upstream)
    with pytest.raises(InferenceFailed, match="ended before"):
        await backend.generate(GenerationRequest(prompt="p"), Collector())
    await backend.aclose()


async def test_slow_upstream_times_out(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    async def never(request: Request, stream: trio.SocketStream) -> None:
        await trio.sleep(3600)

    upstream.respond = never
    backend = make_backend(upstream, upstream_timeout_s=0.3)
    start = trio.current_time()
    with pytest.raises(InferenceFailed, match=r"did not answer within 0\.3 s"):
        await backend.generate(GenerationRequest(prompt="p"), Collector())
    assert trio.current_time() - start == pytest.approx(0.3, abs=0.05)
    assert upstream.requests[-1].path == "/v1/chat/completions"  # it was a read timeout
    await backend.aclose()


async def test_stall_between_chunks_times_out(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    async def stall(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(sse_head() + sse_event(chunk("first")))
        await trio.sleep(3600)

    upstream.respond = stall
    backend = make_backend(upstream, upstream_timeout_s=2.0)
    out = Collector()
    with pytest.raises(InferenceFailed, match="did not answer"):
        await backend.generate(GenerationRequest(prompt="p"), out)
    assert out.text == "first"
    await backend.aclose()


async def test_cancel_closes_the_upstream_request(
    upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    disconnected = trio.Event()

    async def trickle(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(sse_head() + sse_event(chunk("one")))
        # Wait for the client to go away: EOF or a reset both count.
        try:
            with trio.move_on_after(60):
                while await stream.receive_some(1024):
                    pass
                disconnected.set()
        except trio.BrokenResourceError:
            disconnected.set()

    upstream.respond = trickle
    backend = make_backend(upstream)
    returned = False
    with trio.CancelScope() as scope:

        async def emit(piece: Piece) -> None:
            scope.cancel()

        await backend.generate(GenerationRequest(prompt="p"), emit)
        returned = True
    assert scope.cancelled_caught
    assert not returned
    with trio.fail_after(5):
        await disconnected.wait()
    await backend.aclose()


async def test_logs_hold_no_prompt_output_or_key(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.respond = sse_response([chunk("the generated answer", finish="stop"), "[DONE]"])
    backend = make_backend(upstream)
    with caplog.at_level(logging.DEBUG):
        await backend.generate(GenerationRequest(prompt=PROMPT), Collector())
    await backend.aclose()
    assert "upstream generation finished" in caplog.text
    for secret in (PROMPT, "generated answer", API_KEY):
        assert secret not in caplog.text
