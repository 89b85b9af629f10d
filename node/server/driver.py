"""The per-connection driver: moves bytes between a WebSocket and the protocol core.

Each connection runs inside its own nursery. The :class:`ConnectionState` it drives owns
every session key of the connection, and the ``finally`` of :meth:`ConnectionDriver.run`
wipes them all when that scope exits, however it exits (disconnect, idle timeout, error
budget, shutdown, a bug). A prompt starts one inference task; the backend emits pieces
into a bounded memory channel whose receiving end is the encrypting chunk sender, which
coalesces whatever has queued up, seals it with the session key and writes one frame.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import time
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from node.crypto import aead
from node.crypto.errors import ErrorCode, NodeError
from node.inference.base import ChatMessage, GenerationRequest, GenerationResult, Piece
from node.inference.errors import InferenceFailed, TokenLimitExceeded
from node.protocol.connection import (
    Action,
    CancelRequest,
    Close,
    ConnectionState,
    HoldTimer,
    PlaintextDeprecated,
    Send,
    Session,
    SessionEnded,
    SessionStarted,
    StartRequest,
)
from node.protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    ProtocolError,
)
from node.protocol.messages import (
    Connected,
    EncryptedChunk,
    EncryptedSessionInit,
    ErrorMessage,
    InboundMessage,
    OutboundMessage,
    RequestId,
    SessionInit,
    SessionInitAck,
    StreamChunk,
    decode,
    encode,
)
from node.protocol.requests import InferenceRequest
from node.server.context import NodeContext

log = logging.getLogger("node.server")

CONNECTED_TEXT: Final = "Connected to llm-node"
CLOSE_TIMEOUT_S: Final = 5.0
SETTLE_TIMEOUT_S: Final = 10.0
SEALED_SEND_S: Final = 10.0  # a sealed frame's send may hold off a cancel this long (to 2x)


def to_generation_request(request: InferenceRequest) -> GenerationRequest:
    messages = (
        tuple(ChatMessage(role, content) for role, content in request.messages)
        if request.messages
        else None
    )
    return GenerationRequest(
        prompt=None if messages else request.prompt,
        messages=messages,
        model=request.model,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        stop=request.stop,
        seed=request.seed,
    )


# A frame's envelope (type, ids up to 256 + 79 characters, hex nonce, AAD, index) fits in
# FRAME_OVERHEAD characters; one byte of UTF-8 text becomes at most MAX_EXPANSION characters
# (a control character written as \u00XX in a plaintext chunk; hex in an encrypted one is 2).
FRAME_OVERHEAD: Final = 1024
MAX_EXPANSION: Final = 6
MIN_TEXT_BUDGET: Final = 64


def split_for_frames(text: str, tokens: int, budget: int) -> list[tuple[str, int]]:
    """Cut ``text`` at character boundaries into parts of at most ``budget`` UTF-8 bytes.

    The first part carries the token count (tokens cannot be split meaningfully).
    """
    if len(text) * 4 <= budget:  # at most 4 UTF-8 bytes per character
        return [(text, tokens)]
    data = text.encode("utf-8")
    if len(data) <= budget:
        return [(text, tokens)]
    parts: list[tuple[str, int]] = []
    start = 0  # an offset, not a shrinking copy: linear in len(text) for any budget
    while start < len(data):
        head = data[start : start + budget].decode("utf-8", "ignore")  # drops a cut character
        parts.append((head, 0))
        start += len(head.encode("utf-8"))
    parts[0] = (parts[0][0], tokens)
    return parts


class BackendEmit:
    """The backend's ``emit``: queue pieces for the chunk sender; note prompt tokens.

    A memory channel's ``send`` always passes through the scheduler; with room in the
    buffer that costs a scheduler pass per piece for nothing, so pieces are queued with
    ``send_nowait`` and only a full buffer (the client reads slower than the model
    writes) makes the backend wait: back-pressure. Backends report the prompt's token
    count as soon as they know it (``report_prompt_tokens``), so a request that is
    cancelled or fails later is still accounted for its prompt.
    """

    __slots__ = ("_channel", "prompt_estimated", "prompt_tokens")

    def __init__(self, channel: trio.MemorySendChannel[Piece]) -> None:
        self._channel = channel
        self.prompt_tokens = 0
        self.prompt_estimated = False

    @property
    def channel(self) -> trio.MemorySendChannel[Piece]:
        """The bounded channel to the chunk sender (its statistics show the queue)."""
        return self._channel

    async def __call__(self, piece: Piece) -> None:
        try:
            self._channel.send_nowait(piece)
        except trio.WouldBlock:
            await self._channel.send(piece)

    def prompt_tokens_known(self, count: int, estimated: bool = False) -> None:
        self.prompt_tokens = max(0, int(count))
        self.prompt_estimated = estimated


def _wire_error(exc: NodeError) -> NodeError:
    """Backend errors with extra fields become protocol errors carrying them."""
    if isinstance(exc, TokenLimitExceeded):
        return ProtocolError(
            exc.code,
            exc.message,
            prompt_tokens=exc.prompt_tokens,
            context_window_size=exc.context_window,
        )
    return exc


class StreamingDriver(abc.ABC):
    """What every protocol's connection driver shares.

    The connection scope (counting, key wiping in ``finally``), the request task (backend,
    accounting, cancel), the coalescing chunk sender, closing and shutdown are the same for
    every protocol; a subclass says how a piece is sealed into a frame, how an answer ends,
    and which keys it holds (:meth:`_seal_piece`, :meth:`_end_request`, :meth:`wipe_keys`).
    """

    protocol: str = "v1"

    def __init__(
        self, ctx: NodeContext, ws: WebSocketConnection, connection_id: int, text_budget: int
    ) -> None:
        self.ctx = ctx
        self.ws = ws
        self.id = connection_id
        self.remote: str | None = None  # the client's IP address (see node.server.remote)
        self.end_reason = "disconnect"
        self.closing = False
        self.close_code: int | None = None
        self._nursery: trio.Nursery | None = None
        self._request_scope: trio.CancelScope | None = None
        self._log_extra = {"conn": connection_id, "protocol": self.protocol}
        self._text_budget = text_budget

    # -------------------------------------------------------------- hooks

    @property
    @abc.abstractmethod
    def streaming(self) -> bool: ...

    @abc.abstractmethod
    def live_state(self) -> tuple[str, int, int, int, int]:
        """(protocol, keys held, key bytes held, encrypted sessions, plaintext sessions)."""
        ...

    @abc.abstractmethod
    def wipe_keys(self) -> None: ...

    @abc.abstractmethod
    def _request_open(self) -> bool:
        """Whether the request's connection state still exists (not closed underneath)."""
        ...

    @abc.abstractmethod
    def _delivered(self) -> int:
        """Completion tokens sent so far for the active request."""
        ...

    @abc.abstractmethod
    def _seal_piece(self, text: str, tokens: int) -> str | bytes | None:
        """One frame for one piece of the active request; None when the connection's
        state was closed underneath the sender (then nothing more is sent)."""
        ...

    @abc.abstractmethod
    async def _end_request(
        self, finish: str, prompt_tokens: int, delivered: int, error: NodeError | None
    ) -> None:
        """Send the closing frames of the active request."""
        ...

    async def _before_accounting(  # noqa: B027 - an optional hook, empty by default
        self, finish: str, prompt_tokens: int, delivered: int, error: NodeError | None
    ) -> None:
        """Send what of the answer's end may go before its usage is recorded (nothing,
        unless a subclass says otherwise); :meth:`_end_request` sends the rest after."""

    async def _after_request(self) -> None:
        """After an answer ended (and the node is not shutting down)."""
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ lifetime

    def _opened(self) -> None:
        ctx = self.ctx
        ctx.drivers.add(self)
        ctx.metrics.connections_total += 1
        ctx.metrics.connections_open += 1
        ctx.metrics.protocol_connections[self.protocol] += 1
        log.debug("connection opened", extra={**self._log_extra, "remote": self.remote})

    def _log_session_started(self, session: Session) -> None:
        # Who: the remote address and the client's Ethereum address (never keys or text).
        log.info(
            "session started",
            extra={
                **self._log_extra,
                "session": session.session_id,
                "encrypted": session.encrypted,
                "client": session.client_address,
                "remote": self.remote,
                "pid": os.getpid(),  # which worker, with --workers
            },
        )

    async def _closed(self, ended: list[SessionEnded]) -> None:
        """After the keys are wiped: settle the sessions, close the socket, report."""
        ctx = self.ctx
        ctx.drivers.discard(self)
        ctx.metrics.connections_open -= 1
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SETTLE_TIMEOUT_S):
                for event in ended:
                    await ctx.accounting.session_ended(event.session, event.reason)
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.ws.aclose(self.close_code or CLOSE_NORMAL)
        if ctx.shutting_down and not ctx.drivers:
            ctx.all_closed.set()
        log.debug(
            "connection closed",
            extra={**self._log_extra, "reason": self.end_reason, "code": self.close_code},
        )

    # ------------------------------------------------------------ requests

    def _start_request(
        self, request: InferenceRequest, session: Session, request_id: RequestId | None
    ) -> None:
        assert self._nursery is not None
        self._request_scope = scope = trio.CancelScope()
        self._nursery.start_soon(self._run_request, request, session, request_id, scope)

    def _cancel_request(self) -> None:
        if self._request_scope is not None:
            self._request_scope.cancel()

    async def _run_request(
        self,
        request: InferenceRequest,
        session: Session,
        request_id: RequestId | None,
        scope: trio.CancelScope,
    ) -> None:
        ctx = self.ctx
        result: GenerationResult | None = None
        error: NodeError | None = None
        accounted = False
        final_usage: GenerationResult | None = None
        send_channel, receive_channel = trio.open_memory_channel[Piece](
            ctx.config.stream_queue_size
        )
        emit = BackendEmit(send_channel)
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(self._encrypting_sender, receive_channel, scope)
                try:
                    async with send_channel:
                        # stream_cancel, shutdown and a vanished client cancel the
                        # generation only. The sender finishes the frame it is writing
                        # and what was queued before: a send cut off half-way would
                        # leave a gap in the chunk indices (or half a frame on the wire).
                        with scope:
                            result = await ctx.backend.generate(
                                to_generation_request(request), emit
                            )
                except NodeError as exc:
                    error = exc
                except Exception as exc:
                    log.error(
                        "backend failed",
                        extra={**self._log_extra, "error_type": type(exc).__name__},
                    )
                    error = InferenceFailed("the inference backend failed unexpectedly")
            self._request_scope = None
            delivered = self._delivered()
            if result is not None and error is None:
                finish = result.finish_reason
                prompt_tokens = result.prompt_tokens
                estimated = result.usage_estimated
            else:  # failed, or cancelled by stream_cancel or shutdown: what the backend
                # reported of the prompt before it stopped (0 if it never got that far)
                finish = "error" if error is not None else "cancelled"
                prompt_tokens = emit.prompt_tokens
                estimated = emit.prompt_estimated
            usage = GenerationResult(finish, prompt_tokens, delivered, estimated)
            final_usage = usage  # from here on, a cancel records this, not "cancelled"
            try:
                await self._before_accounting(finish, prompt_tokens, delivered, error)
            except ConnectionClosed:
                self.end_reason = "disconnect"
            accounted = True
            await ctx.accounting.request_finished(session, request_id, usage)
            ctx.metrics.requests[finish] += 1
            if not self._request_open():
                return  # the connection was closed underneath us
            await self._end_request(finish, prompt_tokens, delivered, error)
            if self.closing:
                await self._close(CLOSE_GOING_AWAY, "server shutdown")
            else:
                await self._after_request()
        except ConnectionClosed:
            self.end_reason = "disconnect"
        finally:
            if not accounted:
                # Cancelled by the connection ending: record what was delivered (or what
                # the request had already come to, if it ended while its last frames went).
                if final_usage is None:
                    final_usage = GenerationResult(
                        "cancelled", emit.prompt_tokens, self._delivered(), emit.prompt_estimated
                    )
                with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT_S):
                    await ctx.accounting.request_finished(session, request_id, final_usage)
                ctx.metrics.requests[final_usage.finish_reason] += 1

    async def _encrypting_sender(
        self, receive_channel: trio.MemoryReceiveChannel[Piece], scope: trio.CancelScope
    ) -> None:
        """Seal and send pieces; whatever queued up while we were sending goes as one.

        With ``config.coalesce`` off every piece is its own frame (benchmarks use this).

        Sealing uses up the next nonce (v2) or chunk index (v1): a sealed frame that a
        cancel dropped before it was sent would make the peer's next record fail
        authentication. So sending runs in bursts, each in one shielded scope: from a
        piece to the moment the channel is empty again, no cancel lands (a cancel that
        arrives meanwhile lands in the wait for the next piece, outside the shield). A
        send that cannot finish within ``SEALED_SEND_S`` (a client that stopped reading)
        closes the connection. One scope per burst, not one per frame: entering a
        shielded scope with a deadline costs about as much as sending a small frame.
        """
        async with receive_channel:
            while True:
                # Take what is queued without yielding; wait only when nothing is.
                try:
                    piece = receive_channel.receive_nowait()
                except trio.WouldBlock:
                    try:
                        piece = await receive_channel.receive()
                    except trio.EndOfChannel:
                        return
                except trio.EndOfChannel:
                    return
                with trio.CancelScope(shield=True) as guard:
                    guard.deadline = trio.current_time() + 2 * SEALED_SEND_S
                    going = await self._send_burst(piece, receive_channel, guard)
                if guard.cancelled_caught:  # a send did not finish in time
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                        await self.ws.aclose()
                    going = False
                if going is None:
                    return  # the channel was closed: the generation has ended
                if not going:
                    scope.cancel()  # nobody is listening (or cannot be): stop the model
                    return

    async def _send_burst(
        self,
        piece: Piece,
        receive_channel: trio.MemoryReceiveChannel[Piece],
        guard: trio.CancelScope,
    ) -> bool | None:
        """Send ``piece`` and what queues up meanwhile, until the channel is empty (True),
        closed (None), or the connection is gone or a frame could not be sealed (False).

        Runs inside ``guard`` (shielded); each send gets at least ``SEALED_SEND_S``: the
        deadline is pushed on to twice that whenever less than ``SEALED_SEND_S`` is left.
        """
        metrics = self.ctx.metrics
        seal = self._seal_piece
        coalesce = self.ctx.config.coalesce
        budget = self._text_budget
        while True:
            # Everything queued now leaves the channel at once, so a producer blocked
            # on a full channel wakes once per batch rather than once per frame.
            batch = [piece]
            while True:
                try:
                    batch.append(receive_channel.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if coalesce:
                text = "".join(p.text for p in batch)
                batch = [Piece(text, sum(p.tokens for p in batch))]
            for queued in batch:
                for part, part_tokens in split_for_frames(queued.text, queued.tokens, budget):
                    frame = seal(part, part_tokens)
                    if frame is None:
                        return False
                    now = trio.current_time()
                    if guard.deadline - now < SEALED_SEND_S:
                        guard.deadline = now + 2 * SEALED_SEND_S
                    try:
                        await self.ws.send_message(frame)
                    except ConnectionClosed:
                        return False
                    metrics.chunks += 1
                    metrics.tokens += part_tokens
            try:
                piece = receive_channel.receive_nowait()
            except trio.WouldBlock:
                return True
            except trio.EndOfChannel:
                return None

    # ------------------------------------------------------------- closing

    async def _close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self.ws.aclose(code, reason)

    def shutdown(self) -> None:
        """Server shutdown: end a streaming request as cancelled, then close with 1001."""
        self.closing = True
        self.end_reason = "shutdown"
        if self.streaming:
            if self._request_scope is not None:
                self._request_scope.cancel()
        elif self._nursery is not None:
            # The connection may be ending on its own at this very moment (its nursery
            # closed, its finally not yet run): then there is nothing left to close.
            with contextlib.suppress(RuntimeError):
                self._nursery.start_soon(self._close, CLOSE_GOING_AWAY, "server shutdown")


class ConnectionDriver(StreamingDriver):
    """Runs one v1 WebSocket connection: reader loop, request task, chunk sender."""

    protocol = "v1"

    def __init__(
        self,
        ctx: NodeContext,
        ws: WebSocketConnection,
        connection_id: int,
        remote: str | None = None,
    ) -> None:
        # Text per frame such that no frame exceeds what the node itself would accept.
        super().__init__(
            ctx,
            ws,
            connection_id,
            max(MIN_TEXT_BUDGET, (ctx.config.max_frame_bytes - FRAME_OVERHEAD) // MAX_EXPANSION),
        )
        self.remote = remote  # the client's IP address (see node.server.remote)
        extra = {} if ctx.rng is None else {"rng": ctx.rng}
        self.state = ConnectionState(
            host_key=ctx.host_key,
            replay_cache=ctx.replay_cache,
            clock=ctx.clock,
            config=ctx.protocol_config(),
            memory=ctx.session_memory,
            address_limiter=ctx.address_limiter,
            remote_address=remote,
            admission=ctx.storage.admit,
            **extra,
        )
        self._hold_timer_running = False
        self._stream_end: OutboundMessage | None = None

    # -------------------------------------------------------------- hooks

    @property
    def streaming(self) -> bool:
        return self.state.streaming

    def live_state(self) -> tuple[str, int, int, int, int]:
        s = self.state
        enc = sum(1 for x in s.sessions.values() if x.encrypted)
        keys = s.keys_held
        return ("v1", keys, keys * aead.KEY_SIZE, enc, len(s.sessions) - enc)

    def wipe_keys(self) -> None:
        self.state.close("shutdown")

    def _request_open(self) -> bool:
        return self.state.active is not None

    def _delivered(self) -> int:
        active = self.state.active
        return active.completion_tokens if active is not None else 0

    def _seal_piece(self, text: str, tokens: int) -> str:
        return self.state.piece_text(text, tokens)

    async def _after_request(self) -> None:
        await self._release_held()

    async def _before_accounting(
        self, finish: str, prompt_tokens: int, delivered: int, error: NodeError | None
    ) -> None:
        # The closing frames that carry no usage (the final chunk, the encrypted finish
        # reason) go at once; stream_end, which reports the usage, only once the ledger
        # has committed it. Under load many requests end in one group commit: each then
        # has one frame left to send, not three. The request stays the active one (a new
        # prompt meanwhile is REQUEST_IN_PROGRESS) until its stream_end is written.
        state = self.state
        self._stream_end = None
        if error is not None or state.active is None:
            return
        *early, self._stream_end = state.finish(
            finish, prompt_tokens=prompt_tokens, completion_tokens=delivered, hold=True
        )
        for frame in early:
            await self._send(frame)

    async def _end_request(
        self, finish: str, prompt_tokens: int, delivered: int, error: NodeError | None
    ) -> None:
        state = self.state
        if error is not None:
            actions = state.fail(
                _wire_error(error), prompt_tokens=prompt_tokens, completion_tokens=delivered
            )
            await self._execute(actions)
            return
        stream_end, self._stream_end = self._stream_end, None
        if stream_end is not None:  # built (and held) by _before_accounting
            await self._send(stream_end)
        state.release()

    # ------------------------------------------------------------------ main

    async def run(self) -> None:
        self._opened()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._send(Connected(CONNECTED_TEXT))
                    await self._read_loop()
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            # Keys die with this scope, whatever ended it.
            ended = self.state.close(self.end_reason)
            await self._closed(ended)

    async def _read_loop(self) -> None:
        idle = self.ctx.config.idle_timeout_s
        while True:
            with trio.move_on_after(idle) as idle_scope:
                try:
                    frame = await self.ws.get_message()
                except ConnectionClosed as exc:
                    if exc.reason is not None and exc.reason.code == CLOSE_MESSAGE_TOO_BIG:
                        # trio-websocket closed it for us: the client sent too much.
                        self.end_reason = "frame_too_big"
                        self.close_code = CLOSE_MESSAGE_TOO_BIG
                    elif not self.closing:  # a close we started (shutdown) keeps its reason
                        self.end_reason = "disconnect"
                    return
            if idle_scope.cancelled_caught:
                if self.state.streaming:
                    continue
                self.end_reason = "idle_timeout"
                await self._close(CLOSE_NORMAL, "idle timeout")
                return
            keep_going = await self._on_frame(frame)
            del frame  # an idle connection does not pin its last frame (up to 1 MiB)
            if not keep_going:
                return
            if self.state.sessions:
                # Keys past their TTL are wiped now, not when the client next uses them.
                expired = self.state.expire_sessions()
                if expired and not await self._execute(expired):
                    return

    async def _on_frame(self, frame: str | bytes) -> bool:
        """Handle one frame; False when the connection must end.

        A bug in handling a frame (anything but a coded NodeError, which the protocol
        core answers itself) ends this connection with ``INTERNAL_ERROR`` and close code
        1011; the node and the other connections go on, and the keys are wiped as always.
        """
        try:
            return await self._handle_frame(frame)
        except (ConnectionClosed, trio.Cancelled):
            raise
        except Exception as exc:
            await self._internal_error(exc)
            return False

    async def _internal_error(self, exc: Exception) -> None:
        log.error(
            "frame handling failed",
            extra={**self._log_extra, "error_type": type(exc).__name__},
        )
        self.end_reason = "error"
        self.ctx.metrics.errors[ErrorCode.INTERNAL_ERROR.value] += 1
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send_message(
                encode(
                    ErrorMessage(
                        ErrorCode.INTERNAL_ERROR.value,
                        "the node failed to handle this frame; the connection is closed",
                    )
                )
            )
        await self._close(CLOSE_INTERNAL_ERROR, "internal error")

    async def _handle_frame(self, frame: str | bytes) -> bool:
        state = self.state
        metrics = self.ctx.metrics
        if isinstance(frame, bytes):
            metrics.messages["binary"] += 1
            error = ProtocolError(
                ErrorCode.INVALID_MESSAGE, "binary frames are not supported; send JSON text"
            )
            return await self._execute(state.reject(error))
        try:
            message = decode(frame)
        except ProtocolError as exc:
            metrics.messages["invalid"] += 1
            return await self._execute(state.reject(exc, exc.request_id))
        kind = type(message).__name__
        metrics.messages[kind] += 1
        started = time.perf_counter()
        actions = state.receive(message)
        self._count_init(message, actions, started)
        return await self._execute(actions)

    def _count_init(self, message: InboundMessage, actions: list[Action], started: float) -> None:
        """Init metrics: accepted (with latency) or refused by code; nothing while held."""
        if not isinstance(message, EncryptedSessionInit | SessionInit):
            return
        metrics = self.ctx.metrics
        mode = "encrypted" if isinstance(message, EncryptedSessionInit) else "plaintext"
        for action in actions:
            if isinstance(action, Send):
                if isinstance(action.message, SessionInitAck):
                    metrics.inits_accepted[mode] += 1
                    if mode == "encrypted":
                        metrics.init_latency.observe(time.perf_counter() - started)
                elif isinstance(action.message, ErrorMessage):
                    metrics.inits_refused[action.message.code] += 1

    async def _release_held(self) -> None:
        """Handle, in order, the frames that waited for the request that just ended.

        Each may start the next request (whose own end releases what is still held);
        frames that arrive meanwhile queue behind them in the protocol state.
        """
        try:
            while not self.closing:
                started = time.perf_counter()
                released = self.state.release_held()
                if released is None:
                    return
                message, actions = released
                self._count_init(message, actions, started)
                if not await self._execute(actions):
                    return
        except (ConnectionClosed, trio.Cancelled):
            raise
        except Exception as exc:
            await self._internal_error(exc)

    async def _hold_timer(self, delay_s: float) -> None:
        """Refuse the held frames if the cancelled stream has not ended in time; then
        follow a newer hold that began meanwhile, until nothing is held."""
        try:
            while True:
                await trio.sleep(delay_s)
                with contextlib.suppress(ConnectionClosed):
                    await self._execute(self.state.expire_held())
                remaining = self.state.hold_remaining()
                if remaining is None:
                    return
                delay_s = remaining
        finally:
            self._hold_timer_running = False

    async def _execute(self, actions: list[Action]) -> bool:
        keep_going = True
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.message)
            elif isinstance(action, StartRequest):
                self._start_request(action.request, action.session, action.request_id)
            elif isinstance(action, CancelRequest):
                self._cancel_request()
            elif isinstance(action, Close):
                self.end_reason = "error"
                await self._close(action.code, action.reason)
                keep_going = False
            elif isinstance(action, SessionStarted):
                self._log_session_started(action.session)
                await self.ctx.accounting.session_started(action.session)
            elif isinstance(action, SessionEnded):
                await self.ctx.accounting.session_ended(action.session, action.reason)
            elif isinstance(action, HoldTimer):
                if not self._hold_timer_running:  # one timer task per connection
                    assert self._nursery is not None
                    self._hold_timer_running = True
                    self._nursery.start_soon(self._hold_timer, action.delay_s)
            elif isinstance(action, PlaintextDeprecated):
                log.warning(
                    "plaintext mode is deprecated; this client should use encrypted sessions",
                    extra=self._log_extra,
                )
        return keep_going

    # ------------------------------------------------------------- output

    async def _send(self, message: OutboundMessage) -> None:
        if isinstance(message, ErrorMessage):
            self.ctx.metrics.errors[message.code] += 1
            log.info(
                "error sent",
                extra={**self._log_extra, "code": message.code, "session": message.session_id},
            )
        elif isinstance(message, EncryptedChunk | StreamChunk):
            self.ctx.metrics.chunks += 1
        await self.ws.send_message(encode(message))
