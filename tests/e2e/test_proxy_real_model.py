"""The ``openai`` package through ``llm-node proxy`` to a node running the embedded model."""

from __future__ import annotations

import pytest
import trio

from node.inference.llama import LlamaBackend
from tests.proxy.conftest import proxy_stack

pytestmark = pytest.mark.model


@pytest.mark.parametrize("protocol", ["v2", "v1"])
async def test_openai_client_through_the_proxy_to_the_model(
    llama_backend: LlamaBackend, protocol: str
) -> None:
    model = llama_backend.models()[0].id
    messages = [{"role": "user", "content": "Name one primary colour."}]
    with trio.fail_after(300):
        async with proxy_stack(backend=llama_backend, protocol=protocol) as stack:
            client = stack.openai_client(timeout=240.0)
            listed = await stack.call(lambda: [m.id for m in client.models.list()])
            whole = await stack.call(
                lambda: client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=12,
                    temperature=0,
                    seed=1,  # type: ignore[arg-type]
                )
            )
            chunks = await stack.call(
                lambda: list(
                    client.chat.completions.create(
                        model=model,
                        messages=messages,  # type: ignore[arg-type]
                        max_tokens=12,
                        temperature=0,
                        seed=1,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            )
            first, second = await stack.accounting.wait_for(2)
    assert listed == [model]
    text = whole.choices[0].message.content
    assert text
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        first.prompt_tokens,
        first.completion_tokens,
    )
    assert whole.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # temperature 0: the same answer, streamed
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        second.prompt_tokens,
        second.completion_tokens,
        second.total_tokens,
    )
