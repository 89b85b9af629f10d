"""Protocol v2 end to end with the real embedded model (SmolLM2 through llama.cpp)."""

from __future__ import annotations

import pytest
import trio

from node.client import open_session
from node.crypto.hostkey import HostKey
from node.inference.llama import LlamaBackend
from tests.e2e.test_real_model import PROMPT, RecordingBackend
from tests.server._support import parse_prometheus
from tests.support.wire import SDK_HOST_KEY, running_node

pytestmark = pytest.mark.model


async def test_v2_session_with_the_embedded_model(llama_backend: LlamaBackend) -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    backend = RecordingBackend(llama_backend)
    model = llama_backend.models()[0].id
    with trio.fail_after(120):
        async with (
            running_node(host_key=host, backend=backend) as (ctx, ws_url),
            open_session(
                ws_url.replace("/v1/ws", "/v2/ws"),
                model=model,
                job_id=5,
                host_public_key=host.public_key,
                protocol="v2",
            ) as session,
        ):
            assert session.protocol == "v2"
            pieces = [p async for p in session.stream(PROMPT, max_tokens=16, temperature=0.0)]
            again = await session.stream(PROMPT, max_tokens=16, temperature=0.0).collect()
    text = "".join(pieces)
    assert text.strip()
    assert again.text == text  # greedy: the same answer twice, whole both times
    first, second = backend.results
    assert again.usage is not None
    assert again.usage.prompt_tokens == second.prompt_tokens
    assert again.usage.completion_tokens == second.completion_tokens
    assert again.finish_reason == second.finish_reason in ("stop", "length")
    assert 0 < first.completion_tokens <= 16
    # The node has shut down: every connection ended and wiped its keys.
    assert not ctx.drivers
    samples = parse_prometheus(ctx.metrics.render())
    assert samples['llm_node_noise_handshakes_total{result="accepted"}'] == 1
    assert samples["llm_node_session_keys"] == 0
    assert samples['llm_node_protocol_session_keys{protocol="v2"}'] == 0
