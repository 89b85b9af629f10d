"""Errors raised by inference backends, each with its wire code (PROTOCOL.md section 6).

Messages are meant for the person who sent the request. They never contain the prompt, the
generated text or the requested model name (all of which may have arrived encrypted while
the ``error`` frame travels in plaintext).
"""

from __future__ import annotations

from node.crypto.errors import ErrorCode, NodeError


class InferenceError(NodeError):
    """Base class of every error an inference backend raises."""

    code = ErrorCode.INFERENCE_FAILED


class ModelNotFound(InferenceError):
    """The request named a model this backend does not serve."""

    code = ErrorCode.MODEL_NOT_FOUND

    def __init__(self, available: list[str] | tuple[str, ...]) -> None:
        self.available = tuple(available)
        served = ", ".join(self.available) if self.available else "none"
        super().__init__(f"the requested model is not served by this node; available: {served}")


class TokenLimitExceeded(InferenceError):
    """The prompt does not fit into the model's context window."""

    code = ErrorCode.TOKEN_LIMIT_EXCEEDED

    def __init__(self, prompt_tokens: int, context_window: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the model's context window is "
            f"{context_window} tokens (at least one token must remain for the answer)"
        )


class InferenceFailed(InferenceError):
    """The model or the upstream server failed; the message says how, never with the prompt."""

    code = ErrorCode.INFERENCE_FAILED


class RateLimited(InferenceError):
    """Too many requests are already waiting for this backend."""

    code = ErrorCode.RATE_LIMITED


class InvalidGenerationRequest(InferenceError):
    """The request's parameters are unusable (no prompt, negative temperature, ...)."""

    code = ErrorCode.INVALID_PAYLOAD
