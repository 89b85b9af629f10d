"""Sans-I/O readers for one response: frames in, text pieces and the end out.

A reader is fed the parsed frames of one request, in arrival order, and either returns an
event (:class:`TextPiece`, :class:`ResponseEnd`, or ``None`` for a frame that carries no
text) or raises. It is stricter than the SDK (``sdk/node_to_client_dev.json``'s
``tolerance_examples`` show what the SDK lets through):

* every frame must carry this request's ``id`` and this session's ``session_id``;
* chunk ``i`` must carry AAD ``chunk_<i>`` and ``payload.index == i`` for the next ``i``;
* every chunk and the ``encrypted_response`` must decrypt under the session key (a failed
  tag is an error, never a skipped token), and text comes only from frames that did;
* no nonce may repeat under one session key: the AAD ``chunk_<i>`` does not name the
  request, so a chunk captured from an earlier answer of the same session would otherwise
  authenticate again in the same position of a later one (the node's nonces are random);
* the stream ends with the empty final chunk, then ``encrypted_response`` (AAD
  ``encrypted_response_final``, a known finish reason), then a ``stream_end`` that agrees.

No Trio here: the session drives I/O and timeouts.
"""

from __future__ import annotations

import abc
from typing import Final, NoReturn, Protocol

import attrs

from node.client.errors import (
    ChunkAuthenticationFailed,
    ChunkOutOfOrder,
    ForeignFrame,
    InvalidFinishReason,
    MalformedFrame,
    NodeErrorResponse,
    StreamTruncated,
    UnexpectedFrame,
)
from node.client.frames import ServerFrame, StreamEndFrame
from node.crypto import aead
from node.crypto.errors import DecryptionFailed
from node.crypto.secret import SecretBytes, constant_time_equal
from node.protocol.messages import (
    EncryptedChunk,
    EncryptedResponse,
    ErrorMessage,
    StreamChunk,
)

RESPONSE_FINAL_AAD: Final = b"encrypted_response_final"
FINISH_REASONS: Final = frozenset({"stop", "length", "cancelled", "error"})


def end_reason_for(finish_reason: str) -> str:
    """The ``stream_end.reason`` that goes with a finish reason."""
    return {"cancelled": "cancelled", "error": "error"}.get(finish_reason, "complete")


@attrs.frozen
class TextPiece:
    text: str = attrs.field(repr=False)
    tokens: int


@attrs.frozen
class ResponseEnd:
    finish_reason: str
    stream_end: StreamEndFrame


ReaderEvent = TextPiece | ResponseEnd | None


class AnswerReader(Protocol):
    """What a response stream needs of a reader, whatever the protocol."""

    done: bool
    text_chunks: int
    completion_tokens: int


class ResponseReader(abc.ABC):
    """What both readers share: id checks, error frames, bookkeeping."""

    def __init__(self, *, session_id: str, request_id: str) -> None:
        self.session_id = session_id
        self.request_id = request_id
        self.completion_tokens = 0
        self.text_chunks = 0
        self.done = False

    def feed(self, frame: ServerFrame) -> ReaderEvent:
        if self.done:
            raise UnexpectedFrame("a frame arrived for a request that already ended")
        if isinstance(frame, ErrorMessage):
            self._error(frame)
        if isinstance(frame, EncryptedChunk | EncryptedResponse | StreamChunk | StreamEndFrame):
            self._check_ids(frame)
            return self._feed(frame)
        raise UnexpectedFrame(f"unexpected {_kind(frame)} frame while a response was streaming")

    @abc.abstractmethod
    def _feed(
        self, frame: EncryptedChunk | EncryptedResponse | StreamChunk | StreamEndFrame
    ) -> ReaderEvent:
        """Mode-specific handling of one response frame (encrypted or plaintext)."""

    def _check_ids(
        self, frame: EncryptedChunk | EncryptedResponse | StreamChunk | StreamEndFrame
    ) -> None:
        kind = _kind(frame)
        if frame.session_id != self.session_id:
            raise ForeignFrame(
                f"{kind} frame is for session {frame.session_id}, not {self.session_id}"
                if frame.session_id is not None
                else f"{kind} frame carries no session_id"
            )
        if frame.id != self.request_id:
            raise ForeignFrame(
                f"{kind} frame answers another request"
                if frame.id is not None
                else f"{kind} frame carries no request id"
            )

    def _error(self, frame: ErrorMessage) -> NoReturn:
        if frame.session_id is not None and frame.session_id != self.session_id:
            raise ForeignFrame(f"error frame is for session {frame.session_id}")
        if frame.id is not None and frame.id != self.request_id:
            raise ForeignFrame("error frame answers another request")
        self.done = True
        raise NodeErrorResponse(frame.code, frame.message, request_id=frame.id, extra=frame.extra)

    def _end(self, frame: StreamEndFrame, finish_reason: str) -> ResponseEnd:
        if frame.finish_reason is not None and frame.finish_reason != finish_reason:
            raise InvalidFinishReason(
                "stream_end finish_reason disagrees with the authenticated finish reason"
            )
        if frame.reason != end_reason_for(finish_reason):
            raise InvalidFinishReason(
                f"stream_end reason {frame.reason[:20]!r} does not fit finish reason "
                f"{finish_reason!r}"
            )
        self.done = True
        return ResponseEnd(finish_reason, frame)


class EncryptedResponseReader(ResponseReader):
    """Reads the encrypted answer to one ``encrypted_message``."""

    def __init__(
        self,
        key: SecretBytes,
        *,
        session_id: str,
        request_id: str,
        seen_nonces: set[bytes] | None = None,
    ) -> None:
        super().__init__(session_id=session_id, request_id=request_id)
        self._key = key
        # Nonces of every frame accepted under this key (shared by the session's readers).
        self._seen_nonces: set[bytes] = set() if seen_nonces is None else seen_nonces
        self.next_index = 0
        self.final_seen = False
        self.finish_reason: str | None = None

    def _feed(
        self, frame: EncryptedChunk | EncryptedResponse | StreamChunk | StreamEndFrame
    ) -> ReaderEvent:
        if isinstance(frame, EncryptedChunk):
            return self._chunk(frame)
        if isinstance(frame, EncryptedResponse):
            self._response(frame)
            return None
        if isinstance(frame, StreamChunk):
            raise UnexpectedFrame(
                "plaintext stream_chunk in an encrypted session (downgrade refused)"
            )
        if self.finish_reason is None:
            raise StreamTruncated(
                "stream_end arrived before the authenticated end of the stream "
                "(final chunk and encrypted_response)"
            )
        return self._end(frame, self.finish_reason)

    def _chunk(self, frame: EncryptedChunk) -> TextPiece | None:
        if self.final_seen:
            raise UnexpectedFrame("encrypted_chunk after the final chunk")
        payload = frame.payload
        expected = self.next_index
        if payload.index != expected:
            what = "duplicated or replayed" if (payload.index or 0) < expected else "out of order"
            raise ChunkOutOfOrder(
                f"chunk index {payload.index} is {what}: expected chunk {expected}"
            )
        if not constant_time_equal(payload.aad, b"chunk_%d" % expected):
            raise ChunkOutOfOrder(f"chunk {expected} does not carry the AAD chunk_{expected}")
        try:
            plaintext = aead.open(self._key, payload.nonce, payload.ciphertext, payload.aad)
        except DecryptionFailed:
            raise ChunkAuthenticationFailed(
                f"chunk {expected} failed authentication under the session key "
                "(tampered, or sealed with another key)"
            ) from None
        self._fresh(payload.nonce, f"chunk {expected}")
        self.next_index = expected + 1
        if frame.final:
            if plaintext or frame.tokens:
                raise UnexpectedFrame("the final chunk must be empty and carry 0 tokens")
            self.final_seen = True
            return None
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFrame(f"chunk {expected} is not UTF-8 text") from None
        self.completion_tokens += frame.tokens
        if not text:
            return None
        self.text_chunks += 1
        return TextPiece(text, frame.tokens)

    def _response(self, frame: EncryptedResponse) -> None:
        if not self.final_seen:
            raise UnexpectedFrame("encrypted_response before the final chunk")
        if self.finish_reason is not None:
            raise UnexpectedFrame("a second encrypted_response for the same request")
        payload = frame.payload
        if not constant_time_equal(payload.aad, RESPONSE_FINAL_AAD):
            raise MalformedFrame("encrypted_response must carry the AAD encrypted_response_final")
        try:
            plaintext = aead.open(self._key, payload.nonce, payload.ciphertext, payload.aad)
        except DecryptionFailed:
            raise ChunkAuthenticationFailed(
                "encrypted_response failed authentication under the session key"
            ) from None
        self._fresh(payload.nonce, "encrypted_response")
        reason = plaintext.decode("ascii", errors="replace")
        if reason not in FINISH_REASONS:
            raise InvalidFinishReason("encrypted_response carries an unknown finish reason")
        self.finish_reason = reason

    def _fresh(self, nonce: bytes, what: str) -> None:
        if nonce in self._seen_nonces:
            raise ChunkOutOfOrder(
                f"{what} is a replay: its nonce was already used under this session key"
            )
        self._seen_nonces.add(bytes(nonce))


class PlaintextResponseReader(ResponseReader):
    """Reads the (deprecated) plaintext answer to one ``prompt``."""

    def _feed(
        self, frame: EncryptedChunk | EncryptedResponse | StreamChunk | StreamEndFrame
    ) -> ReaderEvent:
        if isinstance(frame, StreamChunk):
            self.completion_tokens += frame.tokens
            if not frame.content:
                return None
            self.text_chunks += 1
            return TextPiece(frame.content, frame.tokens)
        if isinstance(frame, StreamEndFrame):
            reason = frame.finish_reason
            if reason is None or reason not in FINISH_REASONS:
                raise InvalidFinishReason("stream_end needs a known finish_reason")
            return self._end(frame, reason)
        raise UnexpectedFrame(f"{_kind(frame)} frame in a plaintext session")


def _kind(frame: object) -> str:
    kind = getattr(frame, "type", None)
    if isinstance(kind, str):
        return kind
    if isinstance(frame, StreamEndFrame):
        return "stream_end"
    return type(frame).__name__
