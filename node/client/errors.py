"""The client's error hierarchy.

Every class carries a ``code``: for :class:`NodeErrorResponse` it is the wire code the node
sent (PROTOCOL.md section 6); for errors the client detects itself it is a client-side code
that names the failure (``STREAM_TRUNCATED``, ``CHUNK_AUTHENTICATION_FAILED``, ...).
Messages never contain key material or decrypted text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    """Base class of everything the client raises on purpose."""

    code: str = "CLIENT_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ConnectFailed(ClientError):
    """The node could not be reached, or an HTTP route answered with an error."""

    code = "CONNECT_FAILED"


class DowngradeRefused(ConnectFailed):
    """A session pinned to protocol v2 met a node that does not speak it (the client
    does not fall back to v1)."""

    code = "DOWNGRADE_REFUSED"


class HostVerificationFailed(ClientError):
    """The host key from ``/v1/host-key`` could not be confirmed by the challenge."""

    code = "HOST_VERIFICATION_FAILED"


class HostKeyMismatch(HostVerificationFailed):
    """The node's host key belongs to another address than the one pinned."""

    code = "HOST_KEY_MISMATCH"


class NodeErrorResponse(ClientError):
    """The node answered with an ``error`` frame; ``code`` is its wire code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
        self.extra: dict[str, Any] = dict(extra or {})


class ProtocolViolation(ClientError):
    """The node sent something the protocol does not allow. The session is not trusted
    any more after this: it is closed and further use raises :class:`SessionClosed`."""

    code = "PROTOCOL_VIOLATION"


class MalformedFrame(ProtocolViolation):
    """A frame that is not valid JSON of a known shape (bad hex, missing field, ...)."""

    code = "MALFORMED_FRAME"


class UnexpectedFrame(ProtocolViolation):
    """A well-formed frame that does not belong here (for example a plaintext chunk in an
    encrypted session, or a chunk after the final one)."""

    code = "UNEXPECTED_FRAME"


class ChunkOutOfOrder(ProtocolViolation):
    """A chunk whose index or AAD is not the next one: reordered, duplicated or skipped."""

    code = "CHUNK_OUT_OF_ORDER"


class ForeignFrame(ProtocolViolation):
    """A frame for another session id or another request id."""

    code = "FOREIGN_FRAME"


class ChunkAuthenticationFailed(ProtocolViolation):
    """A frame did not decrypt under the session key (tampered, or sealed with another key)."""

    code = "CHUNK_AUTHENTICATION_FAILED"


class InvalidFinishReason(ProtocolViolation):
    """The authenticated finish reason is unknown, or the plaintext ``stream_end`` says
    something else than it."""

    code = "INVALID_FINISH_REASON"


class StreamTruncated(ClientError):
    """The connection closed before the stream ended with ``stream_end``."""

    code = "STREAM_TRUNCATED"


class StreamTimeout(StreamTruncated):
    """No frame arrived within the first-chunk or between-chunk timeout."""

    code = "STREAM_TIMEOUT"


class SessionClosed(ClientError):
    """The session was used after its context exited or after it broke."""

    code = "SESSION_CLOSED"


class SessionBusy(ClientError):
    """Another task is reading a response on this session right now."""

    code = "SESSION_BUSY"


__all__ = [
    "ChunkAuthenticationFailed",
    "ChunkOutOfOrder",
    "ClientError",
    "ConnectFailed",
    "DowngradeRefused",
    "ForeignFrame",
    "HostKeyMismatch",
    "HostVerificationFailed",
    "InvalidFinishReason",
    "MalformedFrame",
    "NodeErrorResponse",
    "ProtocolViolation",
    "SessionBusy",
    "SessionClosed",
    "StreamTimeout",
    "StreamTruncated",
    "UnexpectedFrame",
]
