"""The proxy's HTTP side: OpenAI-compatible routes on h11 + Trio (HTTP/1.1, kept alive).

Every request passes three guards before it is routed, in this order:

1. ``Host`` must name the address the proxy listens on (a web page that rebinds its own
   DNS name to 127.0.0.1 still sends its own name): otherwise 403.
2. A request with an ``Origin`` header (a browser) is refused with 403 unless that origin
   was allowed explicitly.
3. With an API key, ``Authorization: Bearer <key>`` must match (constant-time): otherwise
   401. ``GET /health`` needs no key.

While an answer is produced the connection is watched: when the client goes away the
request is cancelled on the node at once. Nothing of a request's content is logged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import attrs
import h11
import trio

from node import __version__
from node.client import ClientError
from node.crypto.secret import constant_time_equal
from node.proxy.link import NodeLink, QueueFull
from node.proxy.openai_api import (
    SSE_DONE,
    ApiError,
    ProxyRequest,
    ResponseShaper,
    error_from_client,
    parse_chat_request,
    parse_completion_request,
    sse_event,
)
from node.server.http import HttpError, HttpRequest, new_connection, read_request

log = logging.getLogger("node.proxy")

MAX_BODY_BYTES: Final = 256 * 1024
KEEP_ALIVE_S: Final = 30.0  # how long a kept-alive connection may wait for its next request
_KNOWN = frozenset(s.value for s in HTTPStatus)
_LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "[::1]")


@attrs.frozen
class ProxyConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8090
    api_key: str | None = attrs.field(default=None, repr=False)
    allowed_origins: frozenset[str] = frozenset()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(config: ProxyConfig) -> None:
    """Refuse to listen off loopback without an API key (the proxy holds the client key)."""
    if not is_loopback(config.listen_host) and not config.api_key:
        raise ValueError(
            f"listening on {config.listen_host} (not loopback) requires --api-key: the proxy "
            "holds your client key and must not become an open relay"
        )


class _Disconnected(Exception):
    """The HTTP client went away while its answer was being produced."""


class ProxyServer:
    """Serves the OpenAI routes for one :class:`NodeLink`."""

    def __init__(self, config: ProxyConfig, link: NodeLink) -> None:
        self.config = config
        self.link = link
        self.port = config.listen_port
        self.requests: dict[str, int] = {}  # by HTTP status, for tests and logs
        self.disconnects = 0
        self.connections = 0
        self._routes: dict[tuple[str, str], Callable[[HttpRequest, _Exchange], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/v1/health"): self._health,
        }

    @property
    def url(self) -> str:
        host = self.config.listen_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        check_listen(self.config)
        listeners = await trio.open_tcp_listeners(
            self.config.listen_port, host=self.config.listen_host
        )
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(listeners)
        await trio.serve_listeners(self.handle_stream, listeners)

    # ------------------------------------------------------------ connections

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
            async with stream:
                await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.error("proxy connection failed", extra={"error_type": type(exc).__name__})

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection, kept alive between them (HTTP/1.1)."""
        conn = new_connection()
        while await self._exchange(stream, conn):
            conn.start_next_cycle()
            # Wait for the next request (bytes may already be buffered); an idle
            # connection is closed quietly.
            if not conn.trailing_data[0] and not conn.trailing_data[1]:
                with trio.move_on_after(KEEP_ALIVE_S):
                    data = await stream.receive_some(65536)
                    conn.receive_data(bytes(data))
                    if data:
                        continue
                return

    async def _exchange(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """One request and its response; True when the connection can take another."""
        exchange = _Exchange(stream, conn)
        try:
            got = await read_request(stream, conn, max_body_bytes=MAX_BODY_BYTES)
        except HttpError as exc:
            error = ApiError(exc.response.status, "malformed or oversized HTTP request")
            await exchange.send_error(error)
            self._count(error.status)
            return False
        if got is None:
            return False
        request, _ = got
        started = time.perf_counter()
        try:
            self._guard(request)
            handler = self._routes.get((request.method, request.path))
            if handler is None:
                if any(path == request.path for _, path in self._routes):
                    raise ApiError(405, f"method {request.method[:16]} not allowed here")
                raise ApiError(404, "no such route", code="unknown_url")
            await handler(request, exchange)
        except ApiError as error:
            await exchange.send_error(error)
        except _Disconnected:
            self.disconnects += 1
            exchange.status = 499  # nginx's "client closed request", for the log only
        except Exception as exc:
            log.error("proxy request failed", extra={"error_type": _leaf_type(exc)})
            if exchange.status == 0:
                await exchange.send_error(
                    ApiError(500, "internal proxy error", type="api_error", code="internal_error")
                )
            exchange.disconnected = True  # do not reuse a connection after a failure
        self._count(exchange.status)
        log.info(
            "%s %s %d",
            request.method[:16],
            request.path if (request.method, request.path) in self._routes else "-",
            exchange.status,
            extra={"ms": round((time.perf_counter() - started) * 1000, 1)},
        )
        return (
            not exchange.disconnected
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        )

    def _count(self, status: int) -> None:
        key = str(status)
        self.requests[key] = self.requests.get(key, 0) + 1

    # ------------------------------------------------------------ guards

    def _allowed_hosts(self) -> set[str]:
        host = self.config.listen_host
        names = {f"[{host}]" if ":" in host else host}
        if is_loopback(host) or host in ("0.0.0.0", "::"):  # noqa: S104 - compared, not bound
            names.update(_LOOPBACK_NAMES)
        return {f"{name}:{self.port}" for name in names}

    def _host_ok(self, value: str) -> bool:
        value = value.strip().lower()
        if value in self._allowed_hosts():
            return True
        if self.config.listen_host in ("0.0.0.0", "::"):  # noqa: S104
            # A wildcard listen answers on every address of the machine; a DNS name
            # (what a rebinding page uses) is still refused: only IP literals pass.
            name, _, port = value.rpartition(":")
            if port != str(self.port):
                return False
            try:
                ipaddress.ip_address(name.strip("[]"))
            except ValueError:
                return False
            return True
        return False

    def _guard(self, request: HttpRequest) -> None:
        if not self._host_ok(request.headers.get("host", "")):
            raise ApiError(
                403,
                "the Host header does not name this proxy's listen address",
                type="permission_error",
                code="host_not_allowed",
            )
        origin = request.headers.get("origin")
        if origin is not None and origin.strip() not in self.config.allowed_origins:
            raise ApiError(
                403,
                "requests from web pages (an Origin header) are not allowed",
                type="permission_error",
                code="origin_not_allowed",
            )
        key = self.config.api_key
        if key is None or request.path in ("/health", "/v1/health"):
            return
        given = request.headers.get("authorization", "")
        expected = ("Bearer " + key).encode("utf-8")
        if not constant_time_equal(given.encode("latin-1"), expected):
            raise ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer <key>)",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    # ------------------------------------------------------------ routes

    async def _health(self, _: HttpRequest, exchange: _Exchange) -> None:
        await exchange.send_json(
            200,
            {
                "status": "ok",
                "ready": True,
                "node": self.link.url,
                "protocol": self.link.protocol,
                "host_address": self.link.host.address,
                "version": __version__,
            },
        )

    async def _models(self, _: HttpRequest, exchange: _Exchange) -> None:
        try:
            models = await self.link.models()
        except ClientError as exc:
            raise error_from_client(exc) from None
        data = [
            {"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by} for m in models
        ]
        await exchange.send_json(200, {"object": "list", "data": data})

    async def _chat(self, request: HttpRequest, exchange: _Exchange) -> None:
        await self._answer(parse_chat_request(request.body), exchange)

    async def _completions(self, request: HttpRequest, exchange: _Exchange) -> None:
        await self._answer(parse_completion_request(request.body), exchange)

    async def _answer(self, request: ProxyRequest, exchange: _Exchange) -> None:
        failure: ApiError | _Disconnected | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exchange.watch_disconnect, nursery.cancel_scope)
            try:
                await self._produce(request, exchange)
            except (ApiError, _Disconnected) as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if exchange.disconnected:
            raise _Disconnected
        if failure is not None:
            raise failure

    async def _produce(self, request: ProxyRequest, exchange: _Exchange) -> None:
        shaper = ResponseShaper(request)
        try:
            async with self.link.request(request) as answer:
                if not request.stream:
                    pieces = [piece async for piece in answer]
                    assert answer.finish_reason is not None
                    assert answer.usage is not None
                    body = shaper.complete("".join(pieces), answer.finish_reason, answer.usage)
                    await exchange.send_json(200, body)
                    return
                async for piece in answer:
                    event = sse_event(shaper.piece_chunk(piece))
                    if exchange.streaming:
                        await exchange.send_event(event)
                    else:
                        await exchange.start_stream(_opening(shaper) + event)
                assert answer.finish_reason is not None
                assert answer.usage is not None
                tail = b"".join(
                    sse_event(c) for c in shaper.final_chunks(answer.finish_reason, answer.usage)
                )
                if exchange.streaming:
                    await exchange.send_event(tail + SSE_DONE, end=True)
                else:
                    await exchange.start_stream(_opening(shaper) + tail + SSE_DONE, end=True)
        except QueueFull as exc:
            raise ApiError(
                429, f"the proxy is busy: {exc}", type="rate_limit_error", code="proxy_queue_full"
            ) from None
        except ClientError as exc:
            error = error_from_client(exc, request)
            if not exchange.streaming:
                raise error from None
            # Part of the answer is out: end the stream with an error event, never [DONE].
            await exchange.send_event(sse_event(error.body()), end=True)
            exchange.status = error.status


def _leaf_type(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return type(exc).__name__


def _opening(shaper: ResponseShaper) -> bytes:
    first = shaper.first_chunk()
    return b"" if first is None else sse_event(first)


class _Exchange:
    """One HTTP exchange: writes the response (whole or as server-sent events)."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.status = 0
        self.streaming = False
        self.disconnected = False
        self.finished = False

    async def watch_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the client closes its side (or the socket breaks)."""
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                # A kept-alive client may send its next request as soon as it has the
                # end of this answer: keep the bytes for the next cycle.
                self.conn.receive_data(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.conn.receive_data(b"")  # the client closed its side
        if not self.finished:
            self.disconnected = True
            scope.cancel()

    async def _write(self, *events: Any) -> None:
        try:
            data = b"".join(self.conn.send(e) or b"" for e in events)
        except h11.LocalProtocolError:
            return  # the request was too broken for h11 to answer; the caller closes
        if any(isinstance(e, h11.EndOfMessage) for e in events):
            self.finished = True  # a close seen from now on is not a disconnect
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnected = True
            raise _Disconnected from None

    def _head(self, status: int, content_type: str, extra: list[tuple[str, str]]) -> h11.Response:
        self.status = status
        reason = HTTPStatus(status).phrase.encode() if status in _KNOWN else b""
        headers = [
            ("content-type", content_type),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            *extra,
        ]
        return h11.Response(status_code=status, headers=headers, reason=reason)

    async def send_json(self, status: int, obj: Any) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps(obj, separators=(",", ":")).encode()
        head = self._head(status, "application/json", [("content-length", str(len(body)))])
        await self._write(head, h11.Data(data=body), h11.EndOfMessage())

    async def send_error(self, error: ApiError) -> None:
        await self.send_json(error.status, error.body())

    async def start_stream(self, data: bytes, *, end: bool = False) -> None:
        self.streaming = True
        head = self._head(200, "text/event-stream; charset=utf-8", [])
        await self._write(head, h11.Data(data=data), *((h11.EndOfMessage(),) if end else ()))

    async def send_event(self, data: bytes, *, end: bool = False) -> None:
        await self._write(h11.Data(data=data), *((h11.EndOfMessage(),) if end else ()))
