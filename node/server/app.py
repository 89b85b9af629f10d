"""The node's listener: one TCP port for the HTTP routes and the ``/v1/ws`` upgrade."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any

import trio
from trio_websocket import wrap_server_stream

from node import PROTOCOL_VERSION, __version__
from node.config import NodeConfig, is_loopback_host, normalize_origin
from node.crypto.encoding import decode_hex, loads_bounded
from node.crypto.errors import InvalidHexEncoding, NodeError
from node.protocol.storage import LEDGER, REPLAY_CACHE
from node.server.context import NodeContext
from node.server.driver import ConnectionDriver
from node.server.driver_v2 import ConnectionDriverV2
from node.server.ephemeral import EphemeralKeys
from node.server.http import (
    HttpError,
    HttpRequest,
    HttpResponse,
    ReplayStream,
    Router,
    new_connection,
    read_request,
    write_response,
)
from node.server.remote import parse_trusted_proxies, remote_address

log = logging.getLogger("node.server")

WS_PATH = "/v1/ws"
WS_V2_PATH = "/v2/ws"
WS_PATHS = {WS_PATH: "v1", WS_V2_PATH: "v2"}
HANDSHAKE_TIMEOUT_S = 10.0
WS_RECEIVE_BUFFER = 65536


ORIGIN_REFUSED = "this browser origin may not open a WebSocket to this node (see --allowed-origins)"
CHALLENGE_DISABLED = (
    "POST /v1/auth/challenge is turned off on this node (--no-v1-challenge); "
    "protocol v2 clients need no challenge (the v2 handshake proves the host key); "
    "protocol v1 clients must get the host key from the operator and pin it"
)


def origin_allowed(config: NodeConfig, origin: str | None) -> bool:
    """May a WebSocket upgrade carrying this ``Origin`` header go ahead?

    No header: yes. Browsers always send one on a WebSocket upgrade, other clients (the
    SDK under Node.js, ``node.client``, curl) send none, so this check stands between a
    web page in the operator's browser and the node, and no one else. With
    ``allowed_origins`` set, only those origins (or any, for ``*``); unset, none on a
    loopback address (a page on any site could otherwise reach a node on 127.0.0.1) and
    any on another address (a public node serves web apps).
    """
    if origin is None:
        return True
    allowed = config.allowed_origins
    if allowed is None:
        return not is_loopback_host(config.host)
    return "*" in allowed or normalize_origin(origin) in allowed


def parse_challenge_body(body: bytes) -> bytes:
    """The 32 bytes of ``{"challenge": "<64 hex>"}``; ValueError with a message otherwise.

    Linear in the body (at most ``MAX_BODY_BYTES``): one bounded JSON parse, one hex decode.
    """
    try:
        obj: Any = loads_bounded((body or b"null").decode("utf-8"))
    except ValueError:
        raise ValueError('body must be JSON: {"challenge": "<64 hex>"}') from None
    text = obj.get("challenge") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise ValueError("challenge must be a string of 64 hex digits")
    try:
        data = decode_hex(text, "challenge")
    except InvalidHexEncoding as exc:
        raise ValueError(exc.message) from None
    if len(data) != 32:
        raise ValueError("challenge must be exactly 32 bytes (64 hex digits)")
    return data


def build_router(ctx: NodeContext) -> Router:
    router = Router()

    async def health(_: HttpRequest) -> HttpResponse:
        # Liveness: answers at once, also while the model loads (then "ready" is false).
        ready = False if ctx.backend_loading else await ctx.backend.ready()
        storage = ctx.storage
        status = "starting" if not ready else "degraded" if storage.degraded else "ok"
        return HttpResponse.json(
            200,
            {
                "status": status,
                "ready": ready,
                "ledger": storage.state(LEDGER),
                "replay_cache": storage.state(REPLAY_CACHE),
                "backend": ctx.backend.name,
                "encryption": ctx.host_key is not None,
                "connections": len(ctx.drivers),
                "version": __version__,
            },
        )

    async def version(_: HttpRequest) -> HttpResponse:
        features = ["websocket", "streaming", "stream-cancel", "usage-receipts"]
        if ctx.host_key is not None:
            features.append("end-to-end-encryption")
        if not ctx.config.require_encryption and (
            ctx.config.allowed_clients is None or ctx.config.allow_plaintext_with_allowlist
        ):
            features.append("plaintext-deprecated")
        return HttpResponse.json(
            200,
            {
                "name": "llm-node",
                "version": __version__,
                "protocol_version": PROTOCOL_VERSION,
                "protocols": list(ctx.protocols()),
                "features": features,
            },
        )

    async def models(_: HttpRequest) -> HttpResponse:
        data = [
            {
                "id": m.id,
                "object": "model",
                "owned_by": m.owned_by,
                "context_window": m.context_window,
            }
            for m in ctx.backend.models()
        ]
        return HttpResponse.json(200, {"object": "list", "data": data})

    async def host_key(_: HttpRequest) -> HttpResponse:
        key = ctx.host_key
        if key is None:
            return HttpResponse.error(404, "this node has no host key (plaintext-only)")
        return HttpResponse.json(200, {"publicKey": key.public_key_hex, "address": key.address})

    async def challenge(request: HttpRequest) -> HttpResponse:
        key = ctx.host_key
        if key is None:
            return HttpResponse.error(404, "this node has no host key (plaintext-only)")
        if not ctx.config.v1_challenge:
            return HttpResponse.error(403, CHALLENGE_DISABLED)
        try:
            data = parse_challenge_body(request.body)
        except ValueError as exc:
            return HttpResponse.error(400, str(exc))
        signature = key.sign_challenge(data)
        return HttpResponse.json(200, {"signature": signature[:64].hex(), "recid": signature[64]})

    async def metrics(request: HttpRequest) -> HttpResponse:
        body, content_type = ctx.metrics.exposition(request.headers.get("accept"))
        return HttpResponse(200, body, content_type=content_type)

    async def ready(_: HttpRequest) -> HttpResponse:
        # Readiness: 503 while the backend loads, when it cannot serve, and from the
        # moment shutdown starts (the node drains its connections while it still answers).
        if ctx.shutting_down:
            return HttpResponse.json(503, {"ready": False, "status": "shutting_down"})
        if ctx.backend_loading:
            return HttpResponse.json(503, {"ready": False, "status": "loading"})
        if not ctx.backend_loaded:
            ctx.backend_loaded = await ctx.backend.ready()
            if not ctx.backend_loaded:
                return HttpResponse.json(503, {"ready": False, "status": "backend_not_ready"})
        try:
            ctx.storage.admit()  # --on-ledger-failure refuse with a failing ledger
        except NodeError:
            return HttpResponse.json(503, {"ready": False, "status": "storage_unavailable"})
        return HttpResponse.json(200, {"ready": True, "status": "ok"})

    async def ws_without_upgrade(request: HttpRequest) -> HttpResponse:
        refused = protocol_refused(ctx, request.path)
        if refused is not None:
            return refused
        return HttpResponse.error(
            426, "this path is the WebSocket endpoint", headers=[("upgrade", "websocket")]
        )

    router.add("GET", "/health", health)
    router.add("GET", "/v1/health", health)
    router.add("GET", "/ready", ready)
    router.add("GET", "/v1/ready", ready)
    router.add("GET", "/v1/version", version)
    router.add("GET", "/v1/models", models)
    router.add("GET", "/v1/host-key", host_key)
    router.add("POST", "/v1/auth/challenge", challenge)
    router.add("GET", "/metrics", metrics)
    router.add("GET", WS_PATH, ws_without_upgrade)
    router.add("GET", WS_V2_PATH, ws_without_upgrade)
    return router


def protocol_refused(ctx: NodeContext, path: str) -> HttpResponse | None:
    """An HTTP error when ``path`` is the endpoint of a protocol this node does not serve."""
    protocol = WS_PATHS[path]
    served = ctx.protocols()
    if protocol in served:
        return None
    if protocol == "v2" and "v2" in ctx.config.protocols:
        why = "protocol v2 needs a host key and this node has none (plaintext-only)"
    else:
        why = f"protocol {protocol} is disabled on this node (--protocols)"
    alternatives = ", ".join(f"{p} at /{p}/ws" for p in served) or "none"
    return HttpResponse.error(403, f"{why}; it serves {alternatives}")


class NodeServer:
    """Accepts connections and routes each to HTTP or to a :class:`ConnectionDriver`."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.router = build_router(ctx)
        self._pending_upgrades = 0
        self._trusted = parse_trusted_proxies(",".join(ctx.config.trusted_proxies))
        ctx.metrics.live_states = ctx.live_states
        ctx.metrics.storage = ctx.storage

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection; whatever goes wrong stays inside it."""
        try:
            await self._handle_stream(stream)
        except Exception as exc:
            log.error("connection handler failed", extra={"error_type": _leaf_types(exc)})

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        async with stream:
            conn = new_connection()
            try:
                got = await read_request(stream, conn)
            except HttpError as exc:
                self.ctx.metrics.http_requests[str(exc.response.status)] += 1
                await _quiet(write_response(stream, conn, exc.response))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if got is None:
                return
            request, raw = got
            if request.path in WS_PATHS and request.is_websocket_upgrade():
                if not origin_allowed(self.ctx.config, request.headers.get("origin")):
                    self.ctx.metrics.http_requests["403"] += 1
                    log.info("WebSocket upgrade refused: origin not allowed")
                    await _quiet(
                        write_response(stream, conn, HttpResponse.error(403, ORIGIN_REFUSED))
                    )
                    return
                refused = protocol_refused(self.ctx, request.path)
                if refused is not None:
                    self.ctx.metrics.protocol_refused[WS_PATHS[request.path]] += 1
                    self.ctx.metrics.http_requests[str(refused.status)] += 1
                    await _quiet(write_response(stream, conn, refused))
                    return
                remote = remote_address(
                    _peer(stream), request.headers.get("x-forwarded-for"), self._trusted
                )
                await self._websocket(
                    ReplayStream(raw, stream), stream, conn, WS_PATHS[request.path], remote
                )
                return
            try:
                response = await self.router.dispatch(request)
            except Exception as exc:
                log.error("HTTP handler failed", extra={"error_type": type(exc).__name__})
                response = HttpResponse.error(500, "internal error")
            self.ctx.metrics.http_requests[str(response.status)] += 1
            head = request.method == "HEAD"
            await _quiet(write_response(stream, conn, response, head=head))

    async def _websocket(
        self,
        replay: ReplayStream,
        raw_stream: trio.abc.Stream,
        conn: Any,
        protocol: str,
        remote: str | None = None,
    ) -> None:
        ctx = self.ctx
        if ctx.shutting_down:
            await _quiet(write_response(raw_stream, conn, HttpResponse.error(503, "shutting down")))
            return
        if len(ctx.drivers) + self._pending_upgrades >= ctx.config.max_connections:
            ctx.metrics.connections_refused += 1
            await _quiet(
                write_response(
                    raw_stream, conn, HttpResponse.error(503, "too many connections; retry later")
                )
            )
            return
        self._pending_upgrades += 1
        connection_id = ctx.next_connection_id
        ctx.next_connection_id += 1
        try:
            async with trio.open_nursery() as nursery:
                ws = None
                try:
                    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                        try:
                            request = await wrap_server_stream(
                                nursery,
                                replay,
                                message_queue_size=1,
                                max_message_size=ctx.config.max_frame_bytes,
                                receive_buffer_size=WS_RECEIVE_BUFFER,
                            )
                            ws = await request.accept()
                        except Exception as exc:
                            log.info(
                                "WebSocket handshake failed",
                                extra={"error_type": type(exc).__name__},
                            )
                finally:
                    self._pending_upgrades -= 1
                if ws is not None:
                    driver: ConnectionDriver | ConnectionDriverV2 = (
                        ConnectionDriverV2(ctx, ws, connection_id, remote)
                        if protocol == "v2"
                        else ConnectionDriver(ctx, ws, connection_id, remote)
                    )
                    await driver.run()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # One connection failing must never take the node down. trio-websocket's reader
            # task raises wsproto's LocalProtocolError when a peer sends a ping or an
            # oversized message while we are closing; the driver has wiped its keys by now
            # (its ``finally`` ran when the nursery cancelled it).
            log.warning(
                "WebSocket connection failed",
                extra={"conn": connection_id, "error_type": _leaf_types(exc)},
            )

    async def serve(
        self,
        shutdown: trio.Event,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
        listeners: list[trio.SocketListener] | None = None,
    ) -> None:
        """Serve until ``shutdown`` is set, then stop accepting, end streams, close 1001."""
        ctx = self.ctx
        if listeners is None:
            listeners = await open_listeners(ctx.config.host, ctx.config.port)
        # v2's pre-generated ephemeral keys: refilled while serving, wiped when it ends
        pool = ctx.ephemeral_keys
        own = pool is None and "v2" in ctx.protocols()
        if own:
            pool = ctx.ephemeral_keys = EphemeralKeys(rng=ctx.rng)
        try:
            await self._serve(shutdown, listeners, pool, task_status)
        finally:
            if pool is not None:
                pool.wipe()  # run() wipes it too; this covers a start that failed
            if own:
                ctx.ephemeral_keys = None

    async def _serve(
        self,
        shutdown: trio.Event,
        listeners: list[trio.SocketListener],
        pool: EphemeralKeys | None,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        ctx = self.ctx
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                if pool is not None:
                    acceptor.start_soon(pool.run)
                acceptor.start_soon(
                    partial(
                        trio.serve_listeners,
                        self.handle_stream,
                        listeners,
                        handler_nursery=connections,
                    )
                )
                task_status.started(listeners)
                await shutdown.wait()
                # From here /ready says 503 and upgrades get 503; the listener keeps
                # answering HTTP while the open connections drain.
                ctx.shutting_down = True
                # One scheduler pass first, as before this drain kept the listener open:
                # a chunk that is being sealed and sent right now leaves before its
                # request is cancelled (a cancel between sealing and sending would leave
                # a gap in the chunk indices the client sees).
                await trio.lowlevel.checkpoint()
                log.info("shutting down", extra={"connections": len(ctx.drivers)})
                for driver in list(ctx.drivers):
                    driver.shutdown()
                if ctx.drivers:
                    with trio.move_on_after(ctx.config.shutdown_grace_s):
                        await ctx.all_closed.wait()
                acceptor.cancel_scope.cancel()
            connections.cancel_scope.cancel()
        for key_holder in list(ctx.drivers):  # pragma: no cover - defensive
            key_holder.wipe_keys()


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """The TCP listener of a single-process node (workers get theirs from the parent).

    No ``SO_REUSEPORT``: a second node on the same port fails with "Address already in use".
    """
    sock = trio.socket.socket(
        trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET, trio.socket.SOCK_STREAM
    )
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    sock.listen(1024)
    return [trio.SocketListener(sock)]


def _peer(stream: trio.abc.Stream) -> str | None:
    """The IP address of a socket stream's peer (None for other streams)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        name = sock.getpeername()
    except OSError:
        return None
    return str(name[0]) if isinstance(name, tuple) else None


def _leaf_types(exc: BaseException) -> str:
    """The exception's type name, or the sorted type names inside an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return ",".join(sorted({_leaf_types(e) for e in exc.exceptions}))
    return type(exc).__name__


async def _quiet(awaitable: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await awaitable
