"""The proxy's request checks, error mapping, protocol choice and guards, without sockets."""

from __future__ import annotations

import json
from typing import Any, cast

import h11
import pytest
import trio
import trio.testing

from node.client import (
    ConnectFailed,
    HostKeyMismatch,
    NodeErrorResponse,
    ProtocolViolation,
    StreamTimeout,
    StreamTruncated,
)
from node.proxy.cli import parse_listen
from node.proxy.link import ProtocolUnavailable, choose_protocol
from node.proxy.openai_api import (
    ApiError,
    ResponseShaper,
    error_from_client,
    parse_chat_request,
    parse_completion_request,
)
from node.proxy.server import ProxyConfig, ProxyServer, check_listen, is_loopback


def chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return json.dumps(body).encode()


def refused(body: bytes, *, text: bool = False) -> ApiError:
    with pytest.raises(ApiError) as caught:
        (parse_completion_request if text else parse_chat_request)(body)
    assert caught.value.status == 400
    return caught.value


def test_a_full_chat_request_is_read() -> None:
    request = parse_chat_request(
        chat(
            messages=[
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "c", "name": "bot"},
            ],
            max_completion_tokens=5,
            temperature=0.5,
            stop="x",
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            top_p=1.0,
            tools=None,
        )
    )
    assert request.messages == (("system", "rules"), ("user", "ab"), ("assistant", "c"))
    assert (request.max_tokens, request.temperature, request.stop, request.seed) == (
        5,
        0.5,
        ("x",),
        3,
    )
    assert request.stream
    assert request.include_usage


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": []}, "functions"),
        ({"n": 3}, "n"),
        ({"n": True}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "text"}}, "response_format"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"top_p": 0.9}, "top_p"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"something_new": 1}, "something_new"),
        ({"stream": True, "stream_options": {"other": True}}, "stream_options.other"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_fields_the_node_cannot_honour_are_named(fields: dict[str, Any], param: str) -> None:
    error = refused(chat(**fields))
    assert error.param == param
    assert error.code == "unsupported_parameter"
    assert error.body()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[1]", None),
        (b"\xff", None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=["x"]), "messages[0]"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content[0]",
        ),
        (chat(messages=[{"role": "user", "content": "a\x00b"}]), "messages[0].content"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="1"), "temperature"),
        (chat(stop=["a"] * 9), "stop"),
        (chat(stop=[""]), "stop"),
        (chat(stop=5), "stop"),
        (chat(seed=-1), "seed"),
        (chat(seed=2**32), "seed"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(stream=True, stream_options=[]), "stream_options"),
        (chat(user=5), "user"),
    ],
)
def test_bad_values_are_refused_with_their_field(body: bytes, param: str | None) -> None:
    error = refused(body)
    assert error.param == param
    assert "x\x00" not in error.message


def test_completion_prompt_forms() -> None:
    assert (
        parse_completion_request(json.dumps({"model": "m", "prompt": "p"}).encode()).prompt == "p"
    )
    assert (
        parse_completion_request(json.dumps({"model": "m", "prompt": ["p"]}).encode()).prompt == "p"
    )
    assert (
        refused(json.dumps({"model": "m", "prompt": ["a", "b"]}).encode(), text=True).param
        == "prompt"
    )
    assert refused(json.dumps({"model": "m"}).encode(), text=True).param == "prompt"
    assert (
        refused(json.dumps({"model": "m", "prompt": "p", "echo": True}).encode(), text=True).param
        == "echo"
    )
    assert (
        refused(json.dumps({"model": "m", "prompt": "p", "suffix": "s"}).encode(), text=True).param
        == "suffix"
    )
    request = parse_completion_request(
        json.dumps({"model": "m", "prompt": "p", "echo": False, "best_of": 1}).encode()
    )
    assert request.kind == "text"


def test_error_messages_never_quote_the_request() -> None:
    secret = "secret-prompt-text"
    for body in (chat(stop=[secret] * 9), chat(messages=[{"role": secret, "content": "x"}])):
        assert secret not in refused(body).message


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (NodeErrorResponse("RATE_LIMITED", "busy"), 429, "rate_limit_exceeded"),
        (NodeErrorResponse("MODEL_NOT_FOUND", "no"), 404, "model_not_found"),
        (NodeErrorResponse("TOKEN_LIMIT_EXCEEDED", "long"), 400, "context_length_exceeded"),
        (NodeErrorResponse("INVALID_PAYLOAD", "bad"), 400, "invalid_request"),
        (NodeErrorResponse("INFERENCE_FAILED", "broke"), 502, "node_error"),
        (NodeErrorResponse("SESSION_AUTH_DENIED", "who"), 502, "node_error"),
        (ConnectFailed("down"), 502, "node_unreachable"),
        (HostKeyMismatch("other key"), 502, "node_unreachable"),
        (ProtocolViolation("odd"), 502, "node_protocol_error"),
        (StreamTruncated("cut"), 502, "stream_truncated"),
        (StreamTimeout("slow"), 504, "node_timeout"),
    ],
)
def test_node_errors_map_to_statuses(exc: Exception, status: int, code: str) -> None:
    error = error_from_client(exc)  # type: ignore[arg-type]
    assert (error.status, error.code) == (status, code)


def test_context_length_names_the_input_field() -> None:
    exc = NodeErrorResponse("TOKEN_LIMIT_EXCEEDED", "long")
    assert error_from_client(exc, parse_chat_request(chat())).param == "messages"
    text = parse_completion_request(json.dumps({"model": "m", "prompt": "p"}).encode())
    assert error_from_client(exc, text).param == "prompt"


def test_shapes_of_answers() -> None:
    request = parse_chat_request(chat(stream=True, stream_options={"include_usage": True}))
    shaper = ResponseShaper(request)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    first = shaper.first_chunk()
    assert first is not None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final, last = shaper.final_chunks("length", usage)
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"] is None
    assert last["choices"] == []
    assert last["usage"] == usage
    assert shaper.id.startswith("chatcmpl-")
    whole = ResponseShaper(parse_chat_request(chat())).complete("t", "stop", usage)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == "t"
    text = ResponseShaper(
        parse_completion_request(json.dumps({"model": "m", "prompt": "p"}).encode())
    )
    assert text.first_chunk() is None
    assert text.piece_chunk("x")["choices"][0]["text"] == "x"
    (only,) = text.final_chunks("stop", usage)
    assert "usage" not in only


@pytest.mark.parametrize(
    ("requested", "offered", "allow_v1", "chosen"),
    [
        ("auto", ("v1", "v2"), False, "v2"),
        ("auto", ("v2",), False, "v2"),
        ("auto", ("v1",), True, "v1"),
        ("v2", ("v1", "v2"), False, "v2"),
        ("v1", ("v1", "v2"), False, "v1"),
    ],
)
def test_protocol_choice(
    requested: str, offered: tuple[str, ...], allow_v1: bool, chosen: str
) -> None:
    assert choose_protocol(requested, offered, allow_v1=allow_v1) == chosen


@pytest.mark.parametrize(
    ("requested", "offered", "match"),
    [
        ("auto", ("v1",), "--allow-v1"),
        ("v2", ("v1",), "does not offer"),
        ("v1", ("v2",), "does not offer"),
        ("auto", (), "no protocol"),
        ("v3", ("v1", "v2"), "unknown"),
    ],
)
def test_protocol_refusals(requested: str, offered: tuple[str, ...], match: str) -> None:
    with pytest.raises(ProtocolUnavailable, match=match):
        choose_protocol(requested, offered, allow_v1=False)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8090", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(Exception, match="HOST:PORT"):
            parse_listen(bad)
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("example.org")
    check_listen(ProxyConfig(listen_host="127.0.0.1"))
    check_listen(ProxyConfig(listen_host="0.0.0.0", api_key="k"))
    with pytest.raises(ValueError, match="requires --api-key"):
        check_listen(ProxyConfig(listen_host="0.0.0.0"))
    with pytest.raises(ValueError, match="requires --api-key"):
        check_listen(ProxyConfig(listen_host="192.168.1.2", api_key=""))


def test_a_wildcard_listen_accepts_ip_literals_but_no_dns_names() -> None:
    config = ProxyConfig(listen_host="0.0.0.0", listen_port=8090, api_key="k")
    server = ProxyServer(config, cast(Any, None))
    assert server._host_ok("192.168.1.5:8090")
    assert server._host_ok("[fe80::1]:8090")
    assert server._host_ok("localhost:8090")
    assert not server._host_ok("evil.example:8090")
    assert not server._host_ok("192.168.1.5:8091")
    assert not server._host_ok("192.168.1.5")
    loopback = ProxyServer(ProxyConfig(listen_port=8090), cast(Any, None))
    assert loopback._host_ok("127.0.0.1:8090")
    assert loopback._host_ok("LOCALHOST:8090")
    assert not loopback._host_ok("192.168.1.5:8090")
    assert not loopback._host_ok("")


async def _exchange_after_a_request() -> tuple[Any, trio.abc.Stream]:
    from node.proxy.server import _Exchange
    from node.server.http import new_connection

    client, server = trio.testing.memory_stream_pair()
    conn = new_connection()
    conn.receive_data(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    return _Exchange(server, conn), client


async def test_a_client_closing_after_a_complete_answer_is_no_disconnect() -> None:
    exchange, client = await _exchange_after_a_request()
    await exchange.start_stream(b"data: [DONE]\n\n", end=True)
    assert exchange.finished
    await client.aclose()
    with trio.CancelScope() as scope:
        await exchange.watch_disconnect(scope)
    assert not exchange.disconnected
    assert not scope.cancel_called


async def test_a_client_closing_mid_answer_is_a_disconnect() -> None:
    exchange, client = await _exchange_after_a_request()
    await exchange.start_stream(b"data: {}\n\n")
    await client.aclose()
    with trio.CancelScope() as scope:
        await exchange.watch_disconnect(scope)
    assert exchange.disconnected
    assert scope.cancel_called
