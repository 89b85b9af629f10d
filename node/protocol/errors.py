"""Protocol-level errors: a :class:`NodeError` whose wire code is chosen per instance."""

from __future__ import annotations

from typing import Any

from node.crypto.errors import ErrorCode, NodeError


class ProtocolError(NodeError):
    """A client-caused error with an explicit wire code.

    ``extra`` holds additional JSON fields for the ``error`` frame (for example
    ``prompt_tokens`` and ``context_window_size`` with ``TOKEN_LIMIT_EXCEEDED``).
    ``request_id`` is the ``id`` of the frame that failed to decode, when its JSON parsed
    and held a valid one (``decode`` sets it), so the error can echo it without the frame
    being parsed a second time.
    """

    request_id: str | int | None = None

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message, code=code)
        self.extra = extra


CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
