"""The per-connection driver of protocol v2 (``/v2/ws``, docs/PROTOCOL_V2.md).

As thin as v1's :class:`~node.server.driver.ConnectionDriver`: binary frames go into the
sans-I/O :class:`~node.protocol.v2.ServerConnectionV2`, whose actions come back out.
The request task, the coalescing chunk sender, cancel, accounting and shutdown are the
ones v1 uses (:class:`~node.server.driver.StreamingDriver`); only sealing a piece and
ending an answer differ. The core owns every v2 secret of the connection (handshake
state, both directions' keys and chaining keys); ``run``'s ``finally`` wipes them when the
connection's scope exits, however it exits.

Deadlines: message 1 must arrive within :data:`HANDSHAKE_TIMEOUT_S` of the upgrade, and
the session record within as long again of message 1, else the connection is closed with
1008; after that, the node's idle timeout applies as in v1. A text frame is a protocol
error: before any key exists it closes with 1003, afterwards with 1008 (and the keys are
wiped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from node.crypto.errors import ErrorCode, NodeError
from node.protocol.connection import (
    CancelRequest,
    Close,
    SessionEnded,
    SessionStarted,
    StartRequest,
)
from node.protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
)
from node.protocol.v2.records import MAX_BODY
from node.protocol.v2.server import Action as ActionV2
from node.protocol.v2.server import Send, ServerConnectionV2, V2Config
from node.server.context import NodeContext
from node.server.driver import CLOSE_TIMEOUT_S, StreamingDriver, _wire_error

log = logging.getLogger("node.server")

HANDSHAKE_TIMEOUT_S: Final = 10.0
# A chunk's DATA body is {"type":"chunk","request_id":<up to 256 chars>,"text":...,
# "tokens":n}; JSON writes one byte of text as at most 6 characters (a control character
# as \u00XX), so this much text always fits in one record.
CHUNK_BODY_OVERHEAD: Final = 1024
V2_TEXT_BUDGET: Final = (MAX_BODY - CHUNK_BODY_OVERHEAD) // 6
# What the gauge counts per v2 connection holding keys: two transport keys and their
# two chaining keys (during the handshake: its ephemeral key, ck and k).
V2_KEY_BYTES: Final = 4 * 32


class ConnectionDriverV2(StreamingDriver):
    """Runs one ``/v2/ws`` connection: reader loop, request task, chunk sender."""

    protocol = "v2"

    def __init__(
        self,
        ctx: NodeContext,
        ws: WebSocketConnection,
        connection_id: int,
        remote: str | None = None,
    ) -> None:
        super().__init__(ctx, ws, connection_id, V2_TEXT_BUDGET)
        assert ctx.host_key is not None, "protocol v2 needs the host key"
        self.remote = remote  # the client's IP address (see node.server.remote)
        self.state = ServerConnectionV2(
            host_key=ctx.host_key,
            clock=ctx.clock,
            config=V2Config(
                allowed_clients=ctx.config.allowed_clients, max_errors=ctx.config.max_errors
            ),
            rng=os.urandom if ctx.rng is None else ctx.rng,
            address_limiter=ctx.address_limiter,
            remote_address=remote,
            admission=ctx.storage.admit,
            memory=ctx.session_memory,  # --max-session-bytes, shared with v1
            # a pooled key (used by this connection only, wiped by it), else made inline
            ephemeral=None if ctx.ephemeral_keys is None else ctx.ephemeral_keys.take(),
        )
        self._handshake_cpu = 0.0
        self._accepted = False  # a session was accepted (stays True after it ended)
        self._ended: list[SessionEnded] = []

    # -------------------------------------------------------------- hooks

    @property
    def streaming(self) -> bool:
        return self.state.streaming

    @property
    def established(self) -> bool:
        return self.state.session is not None

    def live_state(self) -> tuple[str, int, int, int, int]:
        keys = self.state.keys_held
        return ("v2", keys, keys * V2_KEY_BYTES, 1 if self.state.session is not None else 0, 0)

    def wipe_keys(self) -> None:
        self.state.close("shutdown")

    def _request_open(self) -> bool:
        return self.state.active is not None

    def _delivered(self) -> int:
        active = self.state.active
        return active.completion_tokens if active is not None else 0

    def _seal_piece(self, text: str, tokens: int) -> bytes | None:
        active = self.state.active
        if active is None:  # a fatal record closed the state while pieces were queued
            return None
        return self.state.chunk(active.request_id, text, tokens)

    async def _end_request(
        self, finish: str, prompt_tokens: int, delivered: int, error: NodeError | None
    ) -> None:
        active = self.state.active
        assert active is not None
        if error is not None:
            frame = self.state.fail(active.request_id, _wire_error(error))
            self.ctx.metrics.errors[error.code.value] += 1
        else:
            frame = self.state.finish(
                active.request_id, finish, prompt_tokens=prompt_tokens, completion_tokens=delivered
            )
        await self.ws.send_message(frame)

    # ------------------------------------------------------------------ main

    async def run(self) -> None:
        self._opened()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with contextlib.suppress(ConnectionClosed):
                    await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            # Every v2 secret of this connection dies with this scope, whatever ended it.
            ended = self._ended + self.state.close(self.end_reason)
            await self._closed(ended)

    async def _read_loop(self) -> None:
        handshake_deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
        idle = self.ctx.config.idle_timeout_s
        while True:
            if self.established:
                scope = trio.move_on_after(idle)
            else:
                scope = trio.move_on_at(handshake_deadline)
            with scope:
                try:
                    frame = await self.ws.get_message()
                except ConnectionClosed as exc:
                    if exc.reason is not None and exc.reason.code == CLOSE_MESSAGE_TOO_BIG:
                        self.end_reason = "frame_too_big"
                        self.close_code = CLOSE_MESSAGE_TOO_BIG
                    elif not self.closing:
                        self.end_reason = "disconnect"
                    return
            if scope.cancelled_caught:
                if not self.established:
                    self.ctx.metrics.v2_handshakes["timeout"] += 1
                    self.end_reason = "handshake_timeout"
                    await self._execute(self.state.timeout())
                    return
                if self.streaming:
                    continue
                self.end_reason = "idle_timeout"
                await self._close(CLOSE_NORMAL, "idle timeout")
                return
            first = self.state.handshake_hash is None
            if not await self._on_frame(frame):
                return
            if first and not self.established:
                # Message 1 arrived: the session record is due within the deadline from it.
                handshake_deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S

    async def _on_frame(self, frame: str | bytes) -> bool:
        """Handle one frame; False when the connection must end. A bug in handling it
        ends this connection only: keys wiped, close 1011, the node goes on."""
        try:
            return await self._handle_frame(frame)
        except (ConnectionClosed, trio.Cancelled):
            raise
        except Exception as exc:
            log.error(
                "frame handling failed",
                extra={**self._log_extra, "error_type": type(exc).__name__},
            )
            self.end_reason = "error"
            self.ctx.metrics.errors[ErrorCode.INTERNAL_ERROR.value] += 1
            self._ended += self.state.close(self.end_reason)
            await self._close(CLOSE_INTERNAL_ERROR, "internal error")
            return False

    async def _handle_frame(self, frame: str | bytes) -> bool:
        metrics = self.ctx.metrics
        if isinstance(frame, str):
            metrics.messages["v2_text"] += 1
            return await self._execute(self.state.receive_text())
        metrics.messages["v2_record"] += 1
        if self.established:
            return await self._execute(self.state.receive(frame))
        started = time.perf_counter()
        actions = self.state.receive(frame)
        self._handshake_cpu += time.perf_counter() - started
        return await self._execute(actions)

    async def _execute(self, actions: list[ActionV2]) -> bool:
        ctx = self.ctx
        metrics = ctx.metrics
        for action in actions:
            if isinstance(action, Send):
                await self.ws.send_message(action.frame)
            elif isinstance(action, SessionStarted):
                metrics.v2_handshakes["accepted"] += 1
                self._accepted = True
                metrics.v2_handshake_latency.observe(self._handshake_cpu)
                self._log_session_started(action.session)
                await ctx.accounting.session_started(action.session)
            elif isinstance(action, SessionEnded):
                await ctx.accounting.session_ended(action.session, action.reason)
            elif isinstance(action, StartRequest):
                self._start_request(action.request, action.session, action.request_id)
            elif isinstance(action, CancelRequest):
                self._cancel_request()
            elif isinstance(action, Close):
                if self.end_reason not in ("handshake_timeout",):
                    self.end_reason = "error" if action.code != CLOSE_NORMAL else "closed"
                if action.code == CLOSE_POLICY_VIOLATION and "authentication" in action.reason:
                    metrics.v2_auth_failures += 1
                elif not self._accepted and self.end_reason != "handshake_timeout":
                    # (a close after an accepted session, the client's goodbye included,
                    # ends a session; it refuses no handshake)
                    metrics.v2_handshakes["refused"] += 1
                await self._close(action.code, action.reason)
                return False
        return True

    async def _close(self, code: int, reason: str) -> None:
        """Close the WebSocket; a clean close (idle, shutdown) says goodbye in an
        authenticated CLOSE record first, so the client can tell it from a cut."""
        if code in (CLOSE_NORMAL, CLOSE_GOING_AWAY) and not self.state.closed:
            frame = self.state.goodbye(reason)
            if frame is not None:
                with trio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(ConnectionClosed):
                    await self.ws.send_message(frame)
            self._ended += self.state.close(self.end_reason)
        await super()._close(code, reason)
