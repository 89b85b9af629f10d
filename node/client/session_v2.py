"""The client side of protocol v2 (docs/PROTOCOL_V2.md) behind the same interface as v1.

:class:`ClientSessionV2` is a :class:`~node.client.session.ClientSession`: the same
``stream`` / ``complete`` / ``cancel`` / ``ping``, the same :class:`ResponseStream` and
:class:`Completion`, so callers use either protocol through one interface. The bytes are
made and checked by the sans-I/O :class:`~node.protocol.v2.ClientConnectionV2`; this
module moves frames and runs the timers.

What v2 adds for the caller: the node proves in band that it holds the host key (a node
without it cannot finish the handshake: :class:`HostVerificationFailed`, and after the
handshake ``session.host.verified_by_handshake`` is True; no v1 challenge is needed);
every record
is authenticated in order, so a tampered, dropped, reordered, duplicated or replayed
frame breaks the session (:class:`ChunkAuthenticationFailed`) and wipes its keys; an
answer is complete only with its END record, so a stream cut short raises
:class:`StreamTruncated`. One session per connection: keys rotate by themselves (every
1,000 records per direction), so ``reinit`` and ``reinit_each_prompt`` do nothing here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from node.client.errors import (
    ChunkAuthenticationFailed,
    ClientError,
    ForeignFrame,
    HostVerificationFailed,
    InvalidFinishReason,
    MalformedFrame,
    NodeErrorResponse,
    ProtocolViolation,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
    UnexpectedFrame,
)
from node.client.frames import StreamEndFrame
from node.client.receiver import (
    FINISH_REASONS,
    AnswerReader,
    ReaderEvent,
    ResponseEnd,
    TextPiece,
    end_reason_for,
)
from node.client.session import ClientSession, ResponseStream, _reason
from node.crypto.secret import constant_time_equal
from node.protocol.errors import CLOSE_POLICY_VIOLATION
from node.protocol.messages import Usage
from node.protocol.v2 import (
    HANDSHAKE_FAILED_REASON,
    PADDING_CHOICES,
    Chunk,
    ClientConnectionV2,
    Closed,
    End,
    ErrorReceived,
    Event,
    Pong,
    SessionAccepted,
    SessionTerms,
    V2ClientError,
)

#: The client error each fatal failure of the v2 core is reported as.
_ERRORS: Final[dict[str, type[ClientError]]] = {
    "HOST_VERIFICATION_FAILED": HostVerificationFailed,
    "CHUNK_AUTHENTICATION_FAILED": ChunkAuthenticationFailed,
    "MALFORMED_FRAME": MalformedFrame,
    "UNEXPECTED_FRAME": UnexpectedFrame,
    "STREAM_TRUNCATED": StreamTruncated,
    "SESSION_CLOSED": SessionClosed,
}
#: Request fields a v2 ``request`` record carries (v1's ``stream`` flag is implied).
_REQUEST_FIELDS: Final = (
    "prompt",
    "messages",
    "model",
    "max_tokens",
    "temperature",
    "stop",
    "seed",
)


def _handshake_refused(exc: ConnectionClosed) -> bool:
    """The node's close of a v2 connection whose message 1 it could not open (1008
    "handshake failed", docs/PROTOCOL_V2.md): sent by a node without the host key."""
    reason = exc.reason
    return (
        reason is not None
        and reason.code == CLOSE_POLICY_VIOLATION
        and reason.reason == HANDSHAKE_FAILED_REASON
    )


def client_error(exc: V2ClientError) -> ClientError:
    return _ERRORS.get(exc.code, ProtocolViolation)(exc.message)


class ResponseReaderV2:
    """Reads the records of one v2 answer: chunks, then END (or ERROR)."""

    def __init__(self, *, session_id: str, request_id: str) -> None:
        self.session_id = session_id
        self.request_id = request_id
        self.completion_tokens = 0
        self.text_chunks = 0
        self.done = False

    def feed(self, event: Event) -> ReaderEvent:
        if self.done:
            raise UnexpectedFrame("a record arrived for a request that already ended")
        if isinstance(event, ErrorReceived):
            if event.request_id is not None and event.request_id != self.request_id:
                raise ForeignFrame("an ERROR record answers another request")
            self.done = True
            raise NodeErrorResponse(event.code, event.message, request_id=event.request_id)
        if isinstance(event, Chunk):
            self._check_id(event.request_id, "chunk")
            self.completion_tokens += event.tokens
            self.text_chunks += 1
            return TextPiece(event.text, event.tokens)
        if isinstance(event, End):
            self._check_id(event.request_id, "END")
            if event.finish_reason not in FINISH_REASONS:
                raise InvalidFinishReason("the END record names an unknown finish reason")
            self.done = True
            u = event.usage
            usage = Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)
            end = StreamEndFrame(
                reason=end_reason_for(event.finish_reason),
                tokens_used=u.completion_tokens,
                finish_reason=event.finish_reason,
                usage=usage,
                id=self.request_id,
                session_id=self.session_id,
            )
            return ResponseEnd(event.finish_reason, end)
        if isinstance(event, Closed):
            raise StreamTruncated(
                "the node closed the session (CLOSE record) before the END record of the "
                "answer: the answer is incomplete"
            )
        raise UnexpectedFrame(f"unexpected {type(event).__name__} record while an answer streamed")

    def _check_id(self, request_id: str, kind: str) -> None:
        if request_id != self.request_id:
            raise ForeignFrame(f"a {kind} record answers another request")


class ClientSessionV2(ClientSession):
    """One v2 session on one ``/v2/ws`` connection. Made by ``open_session``."""

    protocol = "v2"

    def __init__(self, ws: WebSocketConnection, *, padding: int = 0, **settings: Any) -> None:
        if padding not in PADDING_CHOICES:
            raise ValueError(f"padding must be one of {', '.join(map(str, PADDING_CHOICES))}")
        super().__init__(ws, **settings)
        assert self.host is not None, "protocol v2 needs the host key"
        self.padding = padding
        self._conn = ClientConnectionV2(self.host.public_key, padding=padding, rng=self._rng)
        self._said_goodbye = False

    @property
    def handshake_hash(self) -> bytes | None:
        """The handshake hash this session's signature covers (public, not secret)."""
        return self._conn.handshake_hash

    @property
    def keys_held(self) -> int:
        """1 while this session holds key material, else 0."""
        return self._conn.keys_held

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        try:
            await self._handshake()
        except ClientError as exc:
            self._break(exc)
            raise
        except BaseException:
            self._conn.wipe()
            raise

    async def _handshake(self) -> None:
        await self._send(self._conn.start(), phase="handshake")
        await self._event(self.connect_timeout, "the node's handshake answer")
        terms = SessionTerms(
            job_id=int(self.job_id),
            model=self.model,
            price_per_token=self.price_per_token,
            chain_id=self.chain_id,
        )
        await self._send(self._conn.session(terms, self._client_key), phase="session init")
        event = await self._event(self.connect_timeout, "session_ack")
        if isinstance(event, ErrorReceived):
            # The node refused the session and closes the connection after this record.
            self._conn.wipe()
            raise NodeErrorResponse(event.code, event.message)
        if not isinstance(event, SessionAccepted):
            raise UnexpectedFrame(f"expected session_ack, got {type(event).__name__}")
        expected = self.client_key_address
        if not constant_time_equal(
            event.client_address.lower().encode(), expected.lower().encode()
        ):
            raise ProtocolViolation(
                "the node reports another client address than the key this client signed with"
            )
        self.client_address = event.client_address
        self.session_id = event.session_id
        self.inits += 1
        # Only a node holding the host key's private key completes the handshake.
        assert self.host is not None
        self.host = attrs.evolve(self.host, verified_by_handshake=True)

    async def _init(self) -> None:
        """v2 keeps one session per connection; its keys rotate by themselves."""
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        self._closed = True
        self._conn.wipe()

    def _break(self, exc: ClientError) -> None:
        super()._break(exc)
        self._conn.wipe()

    async def _goodbye(self) -> None:
        """Send the authenticated CLOSE record when the session ends cleanly."""
        if self._said_goodbye or self._broken is not None or not self._conn.keys_held:
            return
        self._said_goodbye = True
        try:
            frame = self._conn.close("client done")
        except V2ClientError:
            return
        with trio.move_on_after(self.connect_timeout):
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send_message(frame)

    # ------------------------------------------------------------ requests

    async def cancel(self, reason: str = "client cancelled") -> None:
        self._check_usable()
        active = self._active
        if active is None or not active.started or active.done or active.cancel_sent:
            return
        assert active.request_id is not None
        active.cancel_sent = True
        await self._send(self._conn.cancel(active.request_id))

    async def ping(self) -> float:
        self._check_usable()
        await self._settle()
        started = trio.current_time()
        await self._send(self._conn.ping())
        try:
            event = await self._event(self.chunk_timeout, "pong")
            if not isinstance(event, Pong):
                raise UnexpectedFrame(f"expected pong, got {type(event).__name__}")
        except ClientError as exc:
            self._break(exc)
            raise
        return trio.current_time() - started

    async def _start(self, stream: ResponseStream) -> AnswerReader:
        self._check_usable()
        if self._active is not None and self._active is not stream:
            await self._settle()
        request_id = self._new_request_id()
        fields = {k: v for k, v in stream._request.items() if k in _REQUEST_FIELDS}
        frame = self._conn.request(request_id, **fields)
        stream.request_id = request_id
        self._active = stream
        await self._send(frame, phase="request")
        stream.sent_at = trio.current_time()
        return ResponseReaderV2(session_id=self.session_id, request_id=request_id)

    async def _receive_event(
        self, reader: AnswerReader, timeout_s: float, what: str
    ) -> tuple[bool, ReaderEvent]:
        assert isinstance(reader, ResponseReaderV2)
        event = await self._event(timeout_s, what)
        if (
            isinstance(event, Chunk | End | ErrorReceived)
            and event.request_id is not None
            and event.request_id in self._stale_ids
        ):
            return False, None
        return True, reader.feed(event)

    # ------------------------------------------------------------ I/O

    async def _raw(self, timeout_s: float, what: str) -> bytes:
        with trio.move_on_after(timeout_s) as scope:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed as exc:
                if self._conn.handshake_hash is None and _handshake_refused(exc):
                    self._conn.connection_lost()
                    assert self.host is not None
                    raise HostVerificationFailed(
                        "the node closed the connection without answering the v2 handshake "
                        f"({_reason(exc)}): it could not open message 1 with host key "
                        f"{self.host.address}, so it does not hold that key (wrong "
                        "--host-pubkey or --expect-host-address, or not the node the key "
                        "belongs to)"
                    ) from None
                try:
                    self._conn.connection_lost()
                except V2ClientError:
                    raise StreamTruncated(
                        f"the connection closed before the answer's END record "
                        f"({_reason(exc)}): the answer is incomplete"
                    ) from None
                raise StreamTruncated(
                    f"the connection closed while waiting for {what} ({_reason(exc)})"
                ) from None
        if scope.cancelled_caught:
            raise StreamTimeout(f"no {what} within {timeout_s:g} s")
        if not isinstance(frame, bytes):
            raise MalformedFrame("the node sent a text frame on /v2/ws (binary only)")
        return frame

    async def _event(self, timeout_s: float, what: str) -> Event:
        """The next record, opened and checked by the core (exactly one per frame)."""
        frame = await self._raw(timeout_s, what)
        try:
            events = self._conn.receive(frame)
        except V2ClientError as exc:
            raise client_error(exc) from None
        if len(events) != 1:  # pragma: no cover - the core makes one event per frame
            raise ProtocolViolation("a v2 frame must carry exactly one record")
        return events[0]


__all__ = ["ClientSessionV2", "ResponseReaderV2", "client_error"]
