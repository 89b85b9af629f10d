"""A tiny scripted HTTP/1.1 server on a Trio listener, to play an OpenAI-compatible upstream.

Each test sets ``upstream.respond`` to an async function that gets the parsed request and
the raw stream and writes whatever it likes (well-formed SSE, an HTTP error, garbage, or
nothing at all). Every response closes the connection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

MAX_REQUEST = 1 << 20


@attrs.define
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Request, trio.SocketStream], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
        assert len(data) < MAX_REQUEST
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        body += chunk
    return Request(method, path, headers, body)


def sse_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    )


def sse_event(payload: object) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunk(
    content: str | None = None, *, role: str | None = None, finish: str | None = None
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "up",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def http_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} Whatever\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def sse_response(events: list[object]) -> Responder:
    async def respond(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(sse_head() + b"".join(sse_event(e) for e in events))

    return respond


MODEL_LIST = {
    "object": "list",
    "data": [
        {"id": "up-a", "object": "model", "max_model_len": 2048},
        {"id": "up-b", "object": "model"},
    ],
}


@attrs.define
class FakeUpstream:
    port: int = 0
    requests: list[Request] = attrs.Factory(list)
    respond: Responder | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_request(stream)
            if request is None:
                return
            self.requests.append(request)
            if request.method == "GET" and request.path == "/v1/models":
                await stream.send_all(http_response(200, json.dumps(MODEL_LIST).encode()))
                return
            assert self.respond is not None, "the test did not script a response"
            await self.respond(request, stream)
