"""Plain HTTP on the WebSocket port: read one request head, route it, answer, close.

h11 parses and writes HTTP; we never hand-parse. A request that asks for a WebSocket
upgrade on ``/v1/ws`` is handed back to the caller together with the bytes already read,
so trio-websocket can run the handshake over a stream that replays them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT_S = 10.0
_KNOWN = frozenset(s.value for s in HTTPStatus)


@attrs.define
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )


@attrs.define
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = attrs.field(factory=list)

    @classmethod
    def json(cls, status: int, obj: Any, **kw: Any) -> HttpResponse:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode(), **kw)

    @classmethod
    def error(cls, status: int, message: str, **kw: Any) -> HttpResponse:
        return cls.json(status, {"error": message, "status": status}, **kw)


class HttpError(Exception):
    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


class ReplayStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` from ``receive_some``, then reads ``inner``."""

    def __init__(self, prefix: bytes, inner: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return bytes(data)
        return await self._inner.receive_some(max_bytes)

    async def send_eof(self) -> None:  # pragma: no cover - not used by trio-websocket
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


def new_connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)


async def read_request(
    stream: trio.abc.Stream, conn: h11.Connection, *, max_body_bytes: int = MAX_BODY_BYTES
) -> tuple[HttpRequest, bytes] | None:
    """Read one request. Returns (request, raw bytes read) or None if the peer left.

    Raises :class:`HttpError` for malformed or oversized requests (a body over
    ``max_body_bytes`` gets 413).
    """
    raw = bytearray()
    request: h11.Request | None = None
    body = bytearray()
    with trio.move_on_after(READ_TIMEOUT_S) as scope:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise HttpError(HttpResponse.error(status, "malformed HTTP request")) from None
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(65536))
                if not data:
                    return None
                raw += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                if headers.get("upgrade", "").lower() == "websocket":
                    # The handshake belongs to trio-websocket: stop at the head.
                    break
                length = int(headers.get("content-length", "0") or 0)
                if length > max_body_bytes:
                    raise HttpError(HttpResponse.error(413, "request body too large"))
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise HttpError(HttpResponse.error(413, "request body too large"))
                continue
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.ConnectionClosed):
                return None
    if scope.cancelled_caught or request is None:
        raise HttpError(HttpResponse.error(408, "request timed out"))
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
    path = request.target.decode("latin-1").split("?", 1)[0]
    return HttpRequest(request.method.decode(), path, headers, bytes(body)), bytes(raw)


async def write_response(
    stream: trio.abc.Stream, conn: h11.Connection, response: HttpResponse, *, head: bool = False
) -> None:
    """Write ``response`` (then the caller closes the stream: one request per connection).

    ``head``: the request was HEAD, so the headers go out without the body (h11 refuses one).
    """
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
        *response.headers,
    ]
    try:
        reason = HTTPStatus(response.status).phrase.encode() if response.status in _KNOWN else b""
        data = (
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            or b""
        )
        if response.body and not head:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # the request was too broken for h11 to answer; just close
    await stream.send_all(data)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    async def dispatch(self, request: HttpRequest) -> HttpResponse:
        methods = self._routes.get(request.path)
        if methods is None:
            return HttpResponse.error(404, f"no route for {request.path[:100]}")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")  # HEAD is GET without the body
        if handler is None:
            allow = ", ".join(sorted(methods))
            return HttpResponse.error(
                405, f"method {request.method} not allowed", headers=[("allow", allow)]
            )
        return await handler(request)
