"""The Trio client: one WebSocket connection, one session, requests one at a time.

``open_session`` connects, waits for ``connected``, opens the session (an
``encrypted_session_init`` sealed the SDK way, or a deprecated plaintext ``session_init``)
and yields a :class:`ClientSession`. ``session.stream(prompt)`` is an async iterator of
text pieces; ``session.complete(prompt)`` collects them into a :class:`Completion`.
The receive side is the strict sans-I/O reader of :mod:`node.client.receiver`; this module
only moves frames and runs the timers. The session key lives in a :class:`SecretBytes`
that is wiped on re-init, when the session breaks, and when the context exits.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final, Self

import attrs
import trio
from coincurve import PrivateKey
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from node.client import frames
from node.client.discovery import (
    HostIdentity,
    connection_failure_cause,
    discover_host_key,
    endpoint_protocol,
    fetch_host_key,
    fetch_protocols,
    identity_from_public_key,
    websocket_url,
)
from node.client.errors import (
    ClientError,
    ConnectFailed,
    DowngradeRefused,
    ForeignFrame,
    NodeErrorResponse,
    ProtocolViolation,
    SessionBusy,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
    UnexpectedFrame,
)
from node.client.frames import ServerFrame
from node.client.receiver import (
    AnswerReader,
    EncryptedResponseReader,
    PlaintextResponseReader,
    ReaderEvent,
    ResponseEnd,
    ResponseReader,
    TextPiece,
)
from node.crypto import aead
from node.crypto.curve import SECP256K1_N, address_of
from node.crypto.secret import SecretBytes, constant_time_equal
from node.crypto.session_init import seal_session_init
from node.protocol.messages import Connected, ErrorMessage, Pong, SessionInitAck, Usage

log = logging.getLogger("node.client")

DEFAULT_CHAIN_ID: Final = 84532
DEFAULT_MAX_TOKENS: Final = 4000  # what the SDK sends when the caller gives nothing
DEFAULT_TEMPERATURE: Final = 0.7
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_FIRST_CHUNK_TIMEOUT_S: Final = 120.0
DEFAULT_CHUNK_TIMEOUT_S: Final = 60.0
MAX_FRAME_BYTES: Final = 1 << 20
_STALE_IDS_KEPT: Final = 64
# Nonces remembered per session key to refuse replayed chunks; past this many the next
# request re-inits first (a new key starts an empty set), so memory stays bounded.
MAX_NONCES_PER_KEY: Final = 16_384


@attrs.frozen
class Completion:
    """One finished answer.

    ``first_token_s``: seconds from sending the request to the first text piece (None if
    no text came); ``elapsed_s``: from sending the request to ``stream_end``.
    """

    text: str = attrs.field(repr=False)
    finish_reason: str
    usage: Usage | None
    tokens_used: int
    first_token_s: float | None
    elapsed_s: float
    request_id: str
    chunks: int

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage is not None else self.tokens_used

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the whole request time (None when no time passed)."""
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else None

    def timings(self) -> dict[str, float | None]:
        return {
            "first_token_s": self.first_token_s,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
        }

    def usage_dict(self) -> dict[str, int] | None:
        u = self.usage
        if u is None:
            return None
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }


def _decimal_text(value: int | str, name: str) -> str:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isascii() or not text.isdigit() or len(text) > 78:
        raise ValueError(f"{name} must be a non-negative decimal number")
    return str(int(text))


def _checked_text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    value.encode("utf-8")  # refuse lone surrogates here, not on the wire
    return value


def random_client_key(rng: Callable[[int], bytes] = os.urandom) -> PrivateKey:
    """A fresh secp256k1 key (an ephemeral client identity)."""
    while True:
        candidate = rng(32)
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
            return PrivateKey(candidate)


class ResponseStream:
    """The answer to one prompt, as an async iterator of authenticated text pieces.

    The request is sent on the first ``__anext__``. When the stream ends with
    ``stream_end``, :attr:`completion` holds the result. Leaving the loop early is allowed:
    the next request on the session cancels this one and reads it to its end first (or
    call :meth:`aclose`); its completion then says ``cancelled`` (or how it really ended).
    """

    def __init__(self, session: ClientSession, request: dict[str, Any]) -> None:
        self._session = session
        self._request = request
        self._reader: AnswerReader | None = None
        self._pieces: list[str] = []
        self._reading = False
        self._frames_seen = 0
        self._failed = False
        self.request_id: str | None = None
        self.cancel_sent = False
        self.completion: Completion | None = None
        self.sent_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def started(self) -> bool:
        return self._reader is not None

    @property
    def done(self) -> bool:
        return self._reader is not None and self._reader.done

    @property
    def text(self) -> str:
        """Everything yielded so far."""
        return "".join(self._pieces)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self.completion is not None or self._failed:
            raise StopAsyncIteration  # like a generator that returned or raised
        if self._reading:
            raise SessionBusy("another task is already reading this response")
        self._session._check_usable()
        self._reading = True
        try:
            if self._reader is None:
                self._reader = await self._session._start(self)
            piece = await self._next_piece()
        finally:
            self._reading = False
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def _next_piece(self) -> str | None:
        session = self._session
        reader = self._reader
        assert reader is not None
        while True:
            first = self._frames_seen == 0
            timeout = session.first_chunk_timeout if first else session.chunk_timeout
            what = "the first frame of the answer" if first else "the next frame of the answer"
            try:
                got, event = await session._receive_event(reader, timeout, what)
                if not got:
                    continue  # a late frame of an earlier, failed request
                self._frames_seen += 1
            except NodeErrorResponse as exc:
                self._failed = True
                session._request_failed(self, exc)
                raise
            except ClientError as exc:
                self._failed = True
                session._break(exc)
                raise
            if isinstance(event, TextPiece):
                if self.first_token_at is None:
                    self.first_token_at = trio.current_time()
                self._pieces.append(event.text)
                return event.text
            if isinstance(event, ResponseEnd):
                self._finish(event)
                return None

    def _finish(self, event: ResponseEnd) -> None:
        assert self.sent_at is not None
        assert self._reader is not None
        assert self.request_id is not None
        now = trio.current_time()
        end = event.stream_end
        self.completion = Completion(
            text="".join(self._pieces),
            finish_reason=event.finish_reason,
            usage=end.usage,
            tokens_used=end.tokens_used,
            first_token_s=(
                None if self.first_token_at is None else self.first_token_at - self.sent_at
            ),
            elapsed_s=now - self.sent_at,
            request_id=self.request_id,
            chunks=self._reader.text_chunks,
        )
        self._session._request_done(self)

    async def collect(self) -> Completion:
        """Read to the end and return the :class:`Completion`."""
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    async def aclose(self) -> None:
        """Stop early: cancel the request on the node and read its remaining frames."""
        if self._reader is None or self.done:
            return
        await self._session._drain(self)

    async def _drain(self) -> None:
        """Read to the end without yielding (the request was abandoned or closed)."""
        if self._reading:
            raise SessionBusy("another task is reading this response")
        self._reading = True
        try:
            while not self.done:
                await self._next_piece()
        finally:
            self._reading = False


class ClientSession:
    """One open session on one WebSocket connection. Made by :func:`open_session`.

    ``protocol`` says which wire protocol it speaks: ``"v1"`` (this class) or ``"v2"``
    (:class:`node.client.session_v2.ClientSessionV2`, the same interface).
    """

    protocol: str = "v1"

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        ws_url: str,
        host: HostIdentity | None,
        client_key: PrivateKey,
        job_id: str,
        session_id: str,
        chain_id: int,
        model: str,
        price_per_token: int,
        encrypted: bool,
        reinit_each_prompt: bool,
        connect_timeout: float,
        first_chunk_timeout: float,
        chunk_timeout: float,
        rng: Callable[[int], bytes],
    ) -> None:
        self._ws = ws
        self.ws_url = ws_url
        self.host = host
        self._client_key = client_key
        self.job_id = job_id
        self.session_id = session_id
        self.chain_id = chain_id
        self.model = model
        self.price_per_token = price_per_token
        self.encrypted = encrypted
        self.reinit_each_prompt = reinit_each_prompt
        self.connect_timeout = connect_timeout
        self.first_chunk_timeout = first_chunk_timeout
        self.chunk_timeout = chunk_timeout
        self._rng = rng
        self._key: SecretBytes | None = None
        self._next_message = 0
        self._seen_nonces: set[bytes] = set()
        self._active: ResponseStream | None = None
        self._stale_ids: collections.deque[str] = collections.deque(maxlen=_STALE_IDS_KEPT)
        self._closed = False
        self._broken: ClientError | None = None
        self.client_address: str | None = None
        self.inits = 0

    # ------------------------------------------------------------ public API

    @property
    def client_key_address(self) -> str:
        """The address of the key this client signs its session inits with."""
        return address_of(self._client_key.public_key)

    @property
    def closed(self) -> bool:
        return self._closed or self._broken is not None

    def stream(
        self,
        prompt: str | None,
        *,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        temperature: float | None = DEFAULT_TEMPERATURE,
        model: str | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> ResponseStream:
        """The answer to ``prompt`` as an async iterator of text pieces.

        ``messages`` ((role, content) pairs) replaces ``prompt`` (pass None) for chat
        models; it, ``stop`` and ``seed`` need an encrypted session (the plaintext
        ``prompt`` frame has no such fields).
        """
        if not self.encrypted and (messages is not None or stop or seed is not None):
            raise ValueError("messages, stop and seed need an encrypted session")
        request: dict[str, Any] = {}
        if messages is not None:
            if prompt is not None:
                raise TypeError("give a prompt or messages, not both")
            request["messages"] = [
                {"role": _checked_text(role, "role"), "content": _checked_text(text, "content")}
                for role, text in messages
            ]
        else:
            request["prompt"] = _checked_text(prompt, "prompt")
        request["model"] = self.model if model is None else model
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if temperature is not None:
            request["temperature"] = temperature
        if stop:
            request["stop"] = [_checked_text(s, "stop") for s in stop]
        if seed is not None:
            request["seed"] = seed
        request["stream"] = True
        return ResponseStream(self, request)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        temperature: float | None = DEFAULT_TEMPERATURE,
        model: str | None = None,
    ) -> Completion:
        """Send ``prompt`` and wait for the whole answer."""
        response = self.stream(prompt, max_tokens=max_tokens, temperature=temperature, model=model)
        return await response.collect()

    async def cancel(self, reason: str = "client cancelled") -> None:
        """Ask the node to stop the streaming request; the stream then ends ``cancelled``.

        Safe to call from another task while one reads the stream; a no-op when nothing
        is streaming.
        """
        self._check_usable()
        active = self._active
        if active is None or not active.started or active.done or active.cancel_sent:
            return
        active.cancel_sent = True
        await self._send(frames.stream_cancel_frame(session_id=self.session_id, reason=reason))

    async def reinit(self) -> None:
        """Open the session again with a fresh session key (message counter back to 0)."""
        self._check_usable()
        await self._settle()
        await self._init()

    async def ping(self) -> float:
        """A JSON ping; returns the round trip in seconds."""
        self._check_usable()
        await self._settle()
        request_id = self._new_request_id()
        started = trio.current_time()
        await self._send(frames.ping_frame(request_id))
        try:
            while True:
                frame = await self._receive(self.chunk_timeout, "pong")
                if frame is None:
                    continue
                if isinstance(frame, Pong) and frame.id == request_id:
                    return trio.current_time() - started
                raise UnexpectedFrame(f"expected pong, got {_kind(frame)}")
        except ClientError as exc:
            self._break(exc)
            raise

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        try:
            frame = await self._receive(self.connect_timeout, "the connected greeting")
        except ClientError as exc:
            self._break(exc)
            raise
        if not isinstance(frame, Connected):
            error = UnexpectedFrame(f"the node greeted with {_kind(frame)} instead of connected")
            self._break(error)
            raise error
        await self._init()

    async def _init(self) -> None:
        new_key: SecretBytes | None = None
        if self.encrypted:
            assert self.host is not None
            new_key = SecretBytes.take(bytearray(self._rng(32)))
            payload = seal_session_init(
                self.host.public_key,
                self._client_key,
                new_key,
                job_id=self.job_id,
                model_name=self.model,
                price_per_token=self.price_per_token,
                rng=self._rng,
            )
            text = frames.encrypted_session_init_frame(
                payload, session_id=self.session_id, job_id=self.job_id, chain_id=self.chain_id
            )
        else:
            text = frames.session_init_frame(
                session_id=self.session_id, job_id=self.job_id, chain_id=self.chain_id
            )
        sent = False
        try:
            await self._send(text, phase="session init")
            sent = True
            while True:
                frame = await self._receive(self.connect_timeout, "session_init_ack")
                if frame is not None:
                    break
            self._check_ack(frame)
        except BaseException as exc:
            if new_key is not None:
                new_key.wipe()
            if isinstance(exc, NodeErrorResponse):
                pass  # the node refused the init and keeps the previous key, as do we
            elif isinstance(exc, ClientError):
                self._break(exc)
            elif sent:
                # Interrupted (cancelled) after the init went out: the node may or may not
                # have switched keys, so neither key can be trusted to match any more.
                self._break(SessionClosed("a session init was interrupted"))
            raise
        if self._key is not None:
            self._key.wipe()
        self._key = new_key
        self._next_message = 0
        self._seen_nonces = set()
        self.inits += 1

    def _check_ack(self, frame: ServerFrame) -> None:
        if isinstance(frame, ErrorMessage):
            raise NodeErrorResponse(frame.code, frame.message, extra=frame.extra)
        if not isinstance(frame, SessionInitAck):
            raise UnexpectedFrame(f"expected session_init_ack, got {_kind(frame)}")
        if frame.status != "success":
            raise ProtocolViolation("the node did not acknowledge the session with success")
        if frame.session_id != self.session_id:
            raise ForeignFrame(f"session_init_ack is for session {frame.session_id}")
        if frame.job_id != int(self.job_id) or frame.chain_id != self.chain_id:
            raise ProtocolViolation("session_init_ack names another job_id or chain_id")
        if self.encrypted:
            expected = self.client_key_address
            if frame.client_address is None or not constant_time_equal(
                frame.client_address.lower().encode(), expected.lower().encode()
            ):
                raise ProtocolViolation(
                    "the node reports another client address than the key this client signed with"
                )
            self.client_address = frame.client_address
        else:
            self.client_address = None

    def _close(self) -> None:
        self._closed = True
        if self._key is not None:
            self._key.wipe()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise SessionClosed(
                f"the session broke earlier ({self._broken.code}) and cannot be used"
            ) from self._broken
        if self._closed:
            raise SessionClosed("the session was closed")

    def _break(self, exc: ClientError) -> None:
        if self._broken is None:
            self._broken = exc
        if self._key is not None:
            self._key.wipe()

    # ------------------------------------------------------------ requests

    def _new_request_id(self) -> str:
        return f"{int(time.time() * 1000)}-{self._rng(5).hex()}"

    async def _settle(self) -> None:
        """Finish an abandoned request (a loop left early) before the next one."""
        active = self._active
        if active is not None and active.started and not active.done:
            await self._drain(active)
        self._active = None

    async def _drain(self, stream: ResponseStream) -> None:
        if not stream.cancel_sent:
            await self.cancel("client abandoned the stream")
        await stream._drain()

    async def _receive_event(
        self, reader: AnswerReader, timeout_s: float, what: str
    ) -> tuple[bool, ReaderEvent]:
        """The reader's event for the next frame; (False, None) for a dropped late frame."""
        frame = await self._receive(timeout_s, what)
        if frame is None:
            return False, None
        assert isinstance(reader, ResponseReader)
        return True, reader.feed(frame)

    async def _start(self, stream: ResponseStream) -> AnswerReader:
        self._check_usable()
        if self._active is not None and self._active is not stream:
            await self._settle()
        if (
            self.encrypted
            and self._next_message > 0
            and (self.reinit_each_prompt or len(self._seen_nonces) >= MAX_NONCES_PER_KEY)
        ):
            await self._init()
        request_id = self._new_request_id()
        body = frames.dumps(stream._request).encode("utf-8")
        reader: ResponseReader
        if self.encrypted:
            key = self._key
            assert key is not None
            index = self._next_message
            aad = b"message_%d" % index
            nonce = self._rng(aead.NONCE_SIZE)
            text = frames.encrypted_message_frame(
                session_id=self.session_id,
                request_id=request_id,
                ciphertext=aead.seal(key, nonce, body, aad),
                nonce=nonce,
                aad=aad,
            )
            self._next_message = index + 1
            reader = EncryptedResponseReader(
                key,
                session_id=self.session_id,
                request_id=request_id,
                seen_nonces=self._seen_nonces,
            )
        else:
            text = frames.prompt_frame(
                session_id=self.session_id, request_id=request_id, request=stream._request
            )
            reader = PlaintextResponseReader(session_id=self.session_id, request_id=request_id)
        stream.request_id = request_id
        self._active = stream
        await self._send(text, phase="request")
        stream.sent_at = trio.current_time()
        return reader

    def _request_done(self, stream: ResponseStream) -> None:
        if self._active is stream:
            self._active = None

    def _request_failed(self, stream: ResponseStream, exc: NodeErrorResponse) -> None:
        # The node may still send the closing frames of this request; drop them later.
        if stream.request_id is not None:
            self._stale_ids.append(stream.request_id)
        if self._active is stream:
            self._active = None

    # ------------------------------------------------------------ I/O

    async def _send(self, text: str | bytes, *, phase: str = "request") -> None:
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            error: ClientError
            if phase in ("session init", "handshake"):
                error = ConnectFailed(f"the node closed the connection ({_reason(exc)})")
            else:
                error = StreamTruncated(
                    f"the node closed the connection before the {phase} was sent ({_reason(exc)})"
                )
            self._break(error)
            raise error from None

    async def _receive(self, timeout_s: float, what: str) -> ServerFrame | None:
        """The next frame, or None for a late frame of a failed request (dropped)."""
        with trio.move_on_after(timeout_s) as scope:
            try:
                raw = await self._ws.get_message()
            except ConnectionClosed as exc:
                raise StreamTruncated(
                    f"the connection closed while waiting for {what} ({_reason(exc)})"
                ) from None
        if scope.cancelled_caught:
            raise StreamTimeout(f"no {what} within {timeout_s:g} s")
        frame = frames.parse_server_frame(raw)
        frame_id = getattr(frame, "id", None)
        if frame_id is not None and frame_id in self._stale_ids:
            return None
        return frame


def _kind(frame: object) -> str:
    kind = getattr(frame, "type", None)
    return kind if isinstance(kind, str) else type(frame).__name__


def _reason(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}" + (f": {reason.reason[:100]}" if reason.reason else "")


PROTOCOL_CHOICES: Final = ("auto", "v1", "v2")


async def choose_protocol(
    url: str,
    protocol: str,
    *,
    encrypted: bool,
    websocket: WebSocketConnection | None,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """The protocol a session will speak (``auto``: v2 when the node offers it).

    ``auto`` asks ``/v1/version`` which protocols the node serves; a ``ws://`` URL that
    names an endpoint (``/v1/ws``, ``/v2/ws``) or a given ``websocket`` is taken as the
    choice of that endpoint. A fallback to v1 is logged as a warning. ``v1`` and ``v2``
    are pins: a session pinned to v2 never falls back.
    """
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOL_CHOICES)}")
    if protocol == "v2" and not encrypted:
        raise ValueError("protocol v2 is always end-to-end encrypted; plaintext needs v1")
    if protocol != "auto":
        if websocket is None:
            await _check_offered(url, protocol, timeout_s, ssl_context)
        return protocol
    if not encrypted:
        return "v1"
    named = endpoint_protocol(url)
    if named is not None:
        return named
    if websocket is not None:
        return "v1"
    try:
        offered = await fetch_protocols(url, timeout_s=timeout_s, ssl_context=ssl_context)
    except ConnectFailed as exc:
        log.warning(
            "cannot learn the node's protocols (%s); falling back to protocol v1", exc.message
        )
        return "v1"
    if "v2" in offered:
        return "v2"
    log.warning(
        "the node does not offer protocol v2; falling back to protocol v1 (no forward "
        "secrecy, no authenticated end of answer); pin protocol v2 to refuse this"
    )
    return "v1"


async def _check_offered(
    url: str, protocol: str, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> None:
    """A pinned protocol the node's ``/v1/version`` does not list is refused here, before
    any WebSocket (a node that cannot be asked is tried anyway: the upgrade decides)."""
    try:
        offered = await fetch_protocols(url, timeout_s=timeout_s, ssl_context=ssl_context)
    except ConnectFailed:
        return
    if protocol in offered:
        return
    served = ", ".join(offered) or "none"
    if protocol == "v2":
        raise DowngradeRefused(
            f"the node does not offer protocol v2 (it serves: {served}); this session is "
            "pinned to v2 and does not fall back to v1"
        )
    raise ConnectFailed(f"the node does not serve protocol {protocol} (it serves: {served})")


@asynccontextmanager
async def open_session(
    url: str,
    *,
    model: str,
    job_id: int | str,
    session_id: int | str | None = None,
    host_public_key: bytes | str | None = None,
    expected_host_address: str | None = None,
    client_key: PrivateKey | None = None,
    chain_id: int = DEFAULT_CHAIN_ID,
    price_per_token: int = 0,
    encrypted: bool = True,
    reinit_each_prompt: bool = False,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    first_chunk_timeout: float = DEFAULT_FIRST_CHUNK_TIMEOUT_S,
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT_S,
    rng: Callable[[int], bytes] = os.urandom,
    websocket: WebSocketConnection | None = None,
    protocol: str = "auto",
    padding: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ClientSession]:
    """Connect to a node and open one session on it.

    ``url`` is the node's HTTP base (``http://h:p``; the WebSocket is ``ws://h:p/v2/ws`` or
    ``ws://h:p/v1/ws``) or a ``ws://``/``wss://`` URL. ``protocol``: ``auto`` (the default)
    speaks v2 when the node offers it and falls back to v1 with a warning when it does not,
    or when the ``/v2/ws`` upgrade is refused over HTTP (a proxy that only forwards
    ``/v1/ws``), never after a failed v2 handshake; ``v1`` or ``v2`` pins one (a session
    pinned to v2 never falls back; see :func:`choose_protocol`). In encrypted mode (the
    default) the host key is ``host_public_key`` or, when that is None, fetched from
    ``/v1/host-key``: for v1 confirmed with ``/v1/auth/challenge``, for v2 proven by the
    handshake itself (no challenge: a node with ``--no-v1-challenge`` serves v2 clients);
    ``expected_host_address`` pins it (checked before any WebSocket). ``client_key`` signs
    the init (a fresh random key when None). ``padding`` (v2 only) asks that records be
    padded to a multiple of that many bytes (0, 16, ..., 256).
    ``websocket`` is an already-open connection to use instead of connecting to ``url``
    (custom transports, tests over memory streams); the caller stays responsible for closing
    it. ``ssl_context`` verifies an ``https``/``wss`` node (None: the system's trust store;
    see :func:`~node.client.discovery.tls_context` for a private CA).
    """
    job_text = _decimal_text(job_id, "job_id")
    session_text = job_text if session_id is None else _decimal_text(session_id, "session_id")
    if isinstance(chain_id, bool) or not 0 < chain_id < 2**63:
        raise ValueError("chain_id must be a positive integer")
    websocket_url(url)  # a bad URL is refused before any network traffic
    chosen = await choose_protocol(
        url,
        protocol,
        encrypted=encrypted,
        websocket=websocket,
        timeout_s=connect_timeout,
        ssl_context=ssl_context,
    )
    ws_url = websocket_url(url, chosen)
    host: HostIdentity | None = None
    if encrypted:
        if host_public_key is None:
            # v2: the handshake proves the node holds the key, so the v1 challenge (which
            # a node may turn off) is not run; the pin is still checked before connecting.
            if chosen == "v2":
                host = await fetch_host_key(
                    url,
                    expected_address=expected_host_address,
                    timeout_s=connect_timeout,
                    ssl_context=ssl_context,
                )
            else:
                host = await discover_host_key(
                    url,
                    expected_address=expected_host_address,
                    timeout_s=connect_timeout,
                    rng=rng,
                    ssl_context=ssl_context,
                )
        else:
            host = identity_from_public_key(host_public_key, expected_address=expected_host_address)
    key = client_key if client_key is not None else random_client_key(rng)
    # auto chose v2 because /v1/version listed it: if the upgrade itself is refused at
    # the HTTP level (a proxy that only forwards /v1/ws), v1 is tried. Nothing else falls
    # back: a v2 handshake that fails (wrong host key, tampering) is an error, never a
    # reason to downgrade, or an attacker could force v1 at will.
    may_fall_back = protocol == "auto" and chosen == "v2" and endpoint_protocol(url) is None
    async with AsyncExitStack() as stack:
        if websocket is not None:
            ws = websocket
        else:
            try:
                ws = await _connect(
                    stack, ws_url, connect_timeout, ssl_context, pinned=protocol == chosen
                )
            except _UpgradeRefused as exc:
                if not may_fall_back:
                    raise
                log.warning(
                    "%s; falling back to protocol v1 (no forward secrecy, no authenticated "
                    "end of answer); pin protocol v2 to refuse this",
                    exc.message,
                )
                chosen = "v1"
                ws_url = websocket_url(url, chosen)
                if host is not None and host_public_key is None and not host.verified:
                    # Fetched for v2 without the challenge: v1 needs the challenge's proof.
                    host = await discover_host_key(
                        url,
                        expected_address=expected_host_address,
                        timeout_s=connect_timeout,
                        rng=rng,
                        ssl_context=ssl_context,
                    )
                ws = await _connect(stack, ws_url, connect_timeout, ssl_context)
        settings: dict[str, Any] = {
            "ws_url": ws_url,
            "host": host,
            "client_key": key,
            "job_id": job_text,
            "session_id": session_text,
            "chain_id": chain_id,
            "model": model,
            "price_per_token": price_per_token,
            "encrypted": encrypted,
            "reinit_each_prompt": reinit_each_prompt,
            "connect_timeout": connect_timeout,
            "first_chunk_timeout": first_chunk_timeout,
            "chunk_timeout": chunk_timeout,
            "rng": rng,
        }
        session: ClientSession
        if chosen == "v2":
            from node.client.session_v2 import ClientSessionV2

            session = v2 = ClientSessionV2(ws, padding=padding, **settings)
            stack.callback(session._close)
            # Exit callbacks run last-in, first-out: the goodbye goes out while the
            # session still holds its keys, then _close wipes them.
            stack.push_async_callback(v2._goodbye)
        else:
            if padding:
                raise ValueError("padding is a protocol v2 option")
            session = ClientSession(ws, **settings)
            stack.callback(session._close)
        await session._open()
        yield session


class _UpgradeRefused(ConnectFailed):
    """The WebSocket upgrade got an HTTP answer other than 101 (same code as
    ConnectFailed; open_session tells it apart for auto's fallback)."""


async def _connect(
    stack: AsyncExitStack,
    ws_url: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
    *,
    pinned: bool = False,
) -> WebSocketConnection:
    opened: list[WebSocketConnection] = []
    # Runs after the WebSocket's own exit (exit callbacks run last-in, first-out).
    stack.push_async_callback(_close_transport, opened)
    try:
        ws: WebSocketConnection = await stack.enter_async_context(
            open_websocket_url(
                ws_url,
                ssl_context=ssl_context,
                max_message_size=MAX_FRAME_BYTES,
                connect_timeout=timeout_s,
                disconnect_timeout=timeout_s,
            )
        )
    except ConnectionRejected as exc:
        await _close_rejected(exc)
        if pinned and endpoint_protocol(ws_url) == "v2":
            raise DowngradeRefused(
                f"the node refused protocol v2 at {ws_url} (HTTP {exc.status_code}); this "
                "session is pinned to v2 and does not fall back to v1"
            ) from None
        raise _UpgradeRefused(
            f"the node refused the WebSocket upgrade at {ws_url} (HTTP {exc.status_code})"
        ) from None
    except HandshakeError as exc:
        raise ConnectFailed(f"cannot open a WebSocket to {ws_url}") from exc
    except (OSError, trio.BrokenResourceError) as exc:
        cause = connection_failure_cause(exc)
        raise ConnectFailed(f"cannot connect to {ws_url}: {cause}") from None
    opened.append(ws)
    return ws


async def _close_rejected(exc: ConnectionRejected) -> None:
    """Close the TCP stream of an upgrade the server refused.

    trio-websocket 0.12 raises ConnectionRejected from the connection's reader task and
    never closes the stream it opened, so the socket waits for the garbage collector
    (a ResourceWarning then). The connection is found in the exception's traceback.
    """
    tb = exc.__traceback__
    for _ in range(200):  # bounded walk of the frames
        if tb is None:
            return
        ws = tb.tb_frame.f_locals.get("self")
        if isinstance(ws, WebSocketConnection):
            await _close_transport([ws])
            return
        tb = tb.tb_next


async def _close_transport(opened: list[WebSocketConnection]) -> None:
    """Close the TCP stream under a WebSocket the node closed first.

    trio-websocket 0.12 leaves the client's socket open when the server starts the closing
    handshake (the client waits for the server's TCP close, then its ``aclose`` returns
    early because the WebSocket is already closed), so the socket would only be freed by
    the garbage collector. Closing a trio stream twice is harmless.
    """
    for ws in opened:
        stream = getattr(ws, "_stream", None)
        if isinstance(stream, trio.abc.AsyncResource):
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await stream.aclose()
