"""The real ``openai`` package, through the proxy, to a node with the echo backend."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
import trio

from node.proxy.server import ProxyConfig
from tests.proxy.conftest import BUSY_PROMPT, MISSING_MODEL, ProxyTestBackend, proxy_stack

PROMPT = "the quick brown fox jumps over the lazy dog"


BOTH = pytest.mark.parametrize("protocol", ["v2", "v1"])


def _usage(result: object) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,  # type: ignore[attr-defined]
        "completion_tokens": result.completion_tokens,  # type: ignore[attr-defined]
        "total_tokens": result.total_tokens,  # type: ignore[attr-defined]
    }


@BOTH
async def test_chat_completion_not_streamed_has_the_nodes_usage(protocol: str) -> None:
    with trio.fail_after(30):
        async with proxy_stack(protocol=protocol) as stack:
            client = stack.openai_client()
            reply = await stack.call(
                lambda: client.chat.completions.create(
                    model="echo",
                    messages=[
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": PROMPT},
                    ],
                    max_tokens=100,
                    temperature=0,
                    seed=7,
                    stop=["zzz"],
                )
            )
            (accounted,) = await stack.accounting.wait_for(1)
    assert reply.object == "chat.completion"
    assert reply.model == "echo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == PROMPT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == _usage(accounted)
    assert reply.usage.prompt_tokens == 2 + 9  # every message's words count for the echo backend


@BOTH
async def test_chat_completion_streamed_with_usage(protocol: str) -> None:
    with trio.fail_after(30):
        async with proxy_stack(protocol=protocol) as stack:
            client = stack.openai_client()

            def run() -> list[openai.types.chat.ChatCompletionChunk]:
                stream = client.chat.completions.create(
                    model="echo",
                    messages=[{"role": "user", "content": PROMPT}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return list(stream)

            chunks = await stack.call(run)
            (accounted,) = await stack.accounting.wait_for(1)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PROMPT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == _usage(accounted)
    assert all(c.usage is None for c in chunks[:-1])


async def test_streamed_without_include_usage_sends_no_usage_and_ends_with_done() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
            response = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "echo",
                    "stream": True,
                    "messages": [{"role": "user", "content": "a b"}],
                },
            )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])
    assert '"usage"' not in response.text


@BOTH
async def test_text_completions_streamed_and_not(protocol: str) -> None:
    with trio.fail_after(30):
        async with proxy_stack(protocol=protocol) as stack:
            client = stack.openai_client()
            whole = await stack.call(
                lambda: client.completions.create(model="echo", prompt=PROMPT, max_tokens=4)
            )
            pieces = await stack.call(
                lambda: list(
                    client.completions.create(
                        model="echo",
                        prompt=PROMPT,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            )
            first, second = await stack.accounting.wait_for(2)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == "the quick brown fox"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == first.completion_tokens == 4
    assert "".join(p.choices[0].text for p in pieces if p.choices) == PROMPT
    assert pieces[-1].usage is not None
    assert pieces[-1].usage.total_tokens == second.total_tokens


async def test_models_and_health() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack:
            client = stack.openai_client()
            models = await stack.call(lambda: list(client.models.list()))
            async with httpx.AsyncClient(base_url=stack.url) as http:
                health = (await http.get("/health")).json()
    assert [m.id for m in models] == ["echo"]
    assert health["status"] == "ok"
    assert health["protocol"] == "v2"  # auto picks v2: the node offers it
    assert health["host_address"] == stack.host_key.address


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_p": 0.5}, "top_p"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
    ],
)
async def test_unsupported_fields_get_400_naming_them(extra: dict[str, object], param: str) -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack:
            client = stack.openai_client()
            with pytest.raises(openai.BadRequestError) as caught:
                await stack.call(
                    lambda: client.chat.completions.create(
                        model="echo",
                        messages=[{"role": "user", "content": "hi"}],
                        **extra,  # type: ignore[arg-type]
                    )
                )
            assert stack.accounting.finished == []  # nothing reached the model
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.code == "unsupported_parameter"
    assert param in caught.value.message


async def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack:
            client = stack.openai_client()
            reply = await stack.call(
                lambda: client.chat.completions.create(
                    model="echo",
                    messages=[{"role": "user", "content": "hi"}],
                    n=1,
                    top_p=1,
                    logprobs=False,
                    presence_penalty=0,
                    user="someone",
                )
            )
    assert reply.choices[0].message.content == "hi"


@BOTH
async def test_node_errors_map_to_http_statuses(protocol: str) -> None:
    backend = ProxyTestBackend(context_window=20)
    with trio.fail_after(30):
        async with proxy_stack(backend=backend, protocol=protocol) as stack:
            client = stack.openai_client()

            def ask(content: str, model: str = "echo") -> object:
                return client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": content}]
                )

            with pytest.raises(openai.RateLimitError) as limited:
                await stack.call(lambda: ask(BUSY_PROMPT))
            with pytest.raises(openai.NotFoundError) as missing:
                await stack.call(lambda: ask("hi", MISSING_MODEL))
            with pytest.raises(openai.BadRequestError) as too_long:
                await stack.call(lambda: ask("word " * 50))
            # The refusals left the pooled session usable.
            fine = await stack.call(lambda: ask("still fine"))
            opened = stack.pool.sessions_opened
    assert limited.value.status_code == 429
    assert limited.value.code == "rate_limit_exceeded"
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"
    assert too_long.value.status_code == 400
    assert too_long.value.code == "context_length_exceeded"
    assert fine.choices[0].message.content == "still fine"  # type: ignore[attr-defined]
    assert opened == 2  # one per model name: "echo" (reused after each refusal) and the missing one


@BOTH
async def test_an_answer_that_breaks_off_ends_with_an_error_event_not_done(protocol: str) -> None:
    backend = ProxyTestBackend(fail_after_pieces=2)
    with trio.fail_after(30):
        async with proxy_stack(backend=backend, protocol=protocol) as stack:
            async with httpx.AsyncClient(base_url=stack.url) as http:
                raw = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "echo",
                        "stream": True,
                        "messages": [{"role": "user", "content": PROMPT}],
                    },
                )
            client = stack.openai_client()

            def consume() -> str:
                text = ""
                for chunk in client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": PROMPT}], stream=True
                ):
                    text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                return text

            with pytest.raises(openai.APIError) as caught:
                await stack.call(consume)
    assert raw.status_code == 200
    assert "[DONE]" not in raw.text
    events = [e for e in raw.text.split("\n\n") if e]
    assert '"delta":{"content":"the quick"}' in raw.text or '"content":"the"' in raw.text
    assert events[-1].startswith('data: {"error":')
    assert "INFERENCE_FAILED" in events[-1]
    assert "INFERENCE_FAILED" in caught.value.message


async def test_node_unreachable_or_wrong_host_key_is_502() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack:
            client = stack.openai_client()
            # The pool's pinned key is replaced by another one: the node cannot open the
            # session sealed to a key it does not hold.
            from node.client import identity_from_public_key
            from node.crypto.hostkey import HostKey

            other = HostKey.generate()
            stack.pool.host = identity_from_public_key(other.public_key_hex)
            with pytest.raises(openai.APIStatusError) as handshake:
                await stack.call(
                    lambda: client.chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": "hi"}]
                    )
                )
            stack.pool.url = "http://127.0.0.1:1"
            with pytest.raises(openai.APIStatusError) as unreachable:
                await stack.call(
                    lambda: client.chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": "hi"}]
                    )
                )
    assert handshake.value.status_code == 502
    assert unreachable.value.status_code == 502
    assert unreachable.value.code == "node_unreachable"


async def test_concurrent_requests_share_a_bounded_pool() -> None:
    backend = ProxyTestBackend(delay_s=0.005)
    results: dict[int, str] = {}
    with trio.fail_after(60):
        async with proxy_stack(backend=backend, max_concurrency=2) as stack:
            client = stack.openai_client()

            async def one(i: int) -> None:
                reply = await stack.call(
                    lambda: client.chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": f"request {i} a b c"}]
                    )
                )
                results[i] = reply.choices[0].message.content or ""

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
            opened = stack.pool.sessions_opened
    assert results == {i: f"request {i} a b c" for i in range(6)}
    assert backend.most_running <= 2
    assert 1 <= opened <= 2


@BOTH
async def test_client_disconnect_cancels_the_node_request(protocol: str) -> None:
    backend = ProxyTestBackend(delay_s=0.01)
    long_prompt = " ".join(f"w{i}" for i in range(5000))
    with trio.fail_after(30):
        async with proxy_stack(backend=backend, protocol=protocol) as stack:
            stream = await trio.open_tcp_stream("127.0.0.1", stack.server.port)
            body = (
                '{"model":"echo","stream":true,"messages":[{"role":"user","content":"'
                + long_prompt
                + '"}]}'
            ).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{stack.server.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            await stream.send_all(head + body)
            seen = b""
            while b"data: " not in seen:
                seen += await stream.receive_some(4096)
            await stream.aclose()
            (accounted,) = await stack.accounting.wait_for(1)
            await stack.pool.wait_idle(1)  # the cancelled session was read to its end
            # (the node counts the request before it sends the answer's last frame)
            cancelled = stack.node.metrics.requests["cancelled"]
            # The session went back to the pool and serves the next request.
            client = stack.openai_client()
            reply = await stack.call(
                lambda: client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "next"}]
                )
            )
            opened = stack.pool.sessions_opened
    assert b"200 OK" in seen
    assert accounted.finish_reason == "cancelled"
    assert accounted.completion_tokens < 5000
    assert cancelled == 1
    assert reply.choices[0].message.content == "next"
    assert opened == 1


async def test_api_key_is_required_when_set() -> None:
    key = "sk-test-" + "k" * 20
    config = ProxyConfig(listen_port=0, api_key=key)
    with trio.fail_after(30):
        async with proxy_stack(proxy_config=config) as stack:
            ask = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            with pytest.raises(openai.AuthenticationError) as wrong:
                await stack.call(
                    lambda: stack.openai_client(api_key=key[:-1] + "x").chat.completions.create(
                        **ask
                    )  # type: ignore[call-overload]
                )
            good = await stack.call(
                lambda: stack.openai_client(api_key=key).chat.completions.create(**ask)  # type: ignore[call-overload]
            )
            async with httpx.AsyncClient(base_url=stack.url) as http:
                bare = await http.get("/v1/models")
                health = await http.get("/health")
                basic = await http.get("/v1/models", headers={"authorization": "Basic " + key})
    assert wrong.value.status_code == 401
    assert wrong.value.code == "invalid_api_key"
    assert good.choices[0].message.content == "hi"
    assert bare.status_code == 401
    assert basic.status_code == 401
    assert health.status_code == 200


async def test_foreign_host_and_browser_origin_are_refused() -> None:
    config = ProxyConfig(listen_port=0, allowed_origins=frozenset({"http://localhost:3000"}))
    with trio.fail_after(30):
        async with proxy_stack(proxy_config=config) as stack:
            port = stack.server.port
            async with httpx.AsyncClient(base_url=stack.url) as http:
                rebinding = await http.get("/v1/models", headers={"host": f"evil.example:{port}"})
                other_port = await http.get("/v1/models", headers={"host": f"127.0.0.1:{port + 1}"})
                local = await http.get("/v1/models", headers={"host": f"localhost:{port}"})
                page = await http.get("/v1/models", headers={"origin": "https://evil.example"})
                allowed = await http.get("/v1/models", headers={"origin": "http://localhost:3000"})
            assert stack.accounting.finished == []
    assert rebinding.status_code == 403
    assert rebinding.json()["error"]["code"] == "host_not_allowed"
    assert other_port.status_code == 403
    assert local.status_code == 200
    assert page.status_code == 403
    assert page.json()["error"]["code"] == "origin_not_allowed"
    assert allowed.status_code == 200


async def test_logs_hold_no_prompts_answers_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    secret_prompt = "zebra-7c1f-secret-prompt"
    key = "sk-proxy-secret-9d2e"
    config = ProxyConfig(listen_port=0, api_key=key)
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        async with proxy_stack(proxy_config=config) as stack:
            client = stack.openai_client(api_key=key)
            await stack.call(
                lambda: client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": secret_prompt}]
                )
            )
            await stack.call(
                lambda: list(
                    client.chat.completions.create(
                        model="echo",
                        messages=[{"role": "user", "content": secret_prompt}],
                        stream=True,
                    )
                )
            )
            with pytest.raises(openai.AuthenticationError):
                await stack.call(lambda: stack.openai_client(api_key="wrong-" + key).models.list())
            client_key_hex = stack.pool._client_key.secret.hex()
    # Everything the proxy process would log: the proxy, node.client, the libraries it
    # uses (and the in-process node); not the test's own openai client (openai, httpx2).
    records = [
        r for r in caplog.records if not r.name.startswith(("openai", "httpx2", "httpcore2"))
    ]
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    assert "node.proxy" in {r.name for r in caplog.records}
    assert secret_prompt not in text
    assert key not in text
    assert client_key_hex not in text
    assert stack.host_key.address in text or "POST /v1/chat/completions 200" in text


async def test_a_fully_idle_pool_session_is_replaced_after_its_ttl() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack:
            client = stack.openai_client()
            ask = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            await stack.call(lambda: client.chat.completions.create(**ask))  # type: ignore[call-overload]
            stack.pool._idle_ttl_s = 0.0
            await stack.call(lambda: client.chat.completions.create(**ask))  # type: ignore[call-overload]
            opened = stack.pool.sessions_opened
    assert opened == 2


async def test_idle_sessions_stay_bounded_whatever_model_names_clients_send() -> None:
    with trio.fail_after(30):
        async with proxy_stack(max_concurrency=2) as stack:
            client = stack.openai_client()
            for name in ("echo", "a", "b", "c"):  # the echo backend serves any name
                reply = await stack.call(
                    lambda name=name: client.chat.completions.create(
                        model=name, messages=[{"role": "user", "content": "hi"}]
                    )
                )
                assert reply.model == name
            opened = stack.pool.sessions_opened
            idle = stack.pool.idle_sessions
    assert opened == 4  # one session per model name
    assert idle == 2  # but no more idle sessions than --max-concurrency


async def test_routes_methods_and_malformed_http() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
            missing = await http.get("/v1/embeddings")
            wrong_method = await http.get("/v1/chat/completions")
            not_json = await http.post("/v1/completions", content=b"{")
            port = stack.server.port
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"NOT HTTP\r\n\r\n")
                garbage = await stream.receive_some(4096)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:  # the head announces more than the proxy takes
                await stream.send_all(
                    f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Content-Length: {300 * 1024}\r\n\r\n".encode()
                )
                too_big = await stream.receive_some(4096)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405
    assert too_big.startswith(b"HTTP/1.1 413")
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    assert garbage.startswith(b"HTTP/1.1 400")


async def test_a_full_queue_answers_429() -> None:
    backend = ProxyTestBackend(delay_s=0.01)
    long_prompt = " ".join(f"w{i}" for i in range(2000))
    with trio.fail_after(30):
        async with proxy_stack(backend=backend, max_concurrency=1) as stack:
            stack.pool.max_queue = 0
            stream = await trio.open_tcp_stream("127.0.0.1", stack.server.port)
            body = json.dumps({"model": "echo", "stream": True, "prompt": long_prompt}).encode()
            await stream.send_all(
                (
                    f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{stack.server.port}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            seen = b""
            while b"data: " not in seen:  # the only slot is in use now
                seen += await stream.receive_some(4096)
            client = stack.openai_client()
            with pytest.raises(openai.RateLimitError) as busy:
                await stack.call(lambda: client.completions.create(model="echo", prompt="hi"))
            await stream.aclose()
            await stack.accounting.wait_for(1)
    assert busy.value.code == "proxy_queue_full"


async def test_a_node_without_v2_needs_allow_v1() -> None:
    from node.config import NodeConfig
    from node.crypto.hostkey import HostKey
    from node.proxy.link import ProtocolUnavailable, SessionPool
    from tests.support.wire import running_node

    with trio.fail_after(30):
        async with running_node(
            host_key=HostKey.generate(), config=NodeConfig(port=0, protocols=("v1",))
        ) as (_, ws_url):
            url = ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
            with pytest.raises(ProtocolUnavailable, match="--allow-v1"):
                async with SessionPool.open(url):
                    pass  # pragma: no cover - refused before
            with pytest.raises(ProtocolUnavailable, match="does not offer it"):
                async with SessionPool.open(url, protocol="v2"):
                    pass  # pragma: no cover - refused before
            async with SessionPool.open(url, allow_v1=True) as pool:
                protocol = pool.protocol
    assert protocol == "v1"


async def test_connections_are_kept_alive_between_requests() -> None:
    with trio.fail_after(30):
        async with proxy_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
            ask = {"model": "echo", "messages": [{"role": "user", "content": "a b"}]}
            texts = []
            for stream in (True, False, True):
                response = await http.post("/v1/chat/completions", json={**ask, "stream": stream})
                assert response.status_code == 200
                texts.append(response.text)
            models = await http.get("/v1/models")
            connections = stack.server.connections
    assert texts[0].endswith("data: [DONE]\n\n")
    assert '"content":"a b"' in texts[1]
    assert texts[2].endswith("data: [DONE]\n\n")
    assert models.status_code == 200
    assert connections == 1
