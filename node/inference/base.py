"""The one interface every inference backend implements.

A backend turns a :class:`GenerationRequest` into a stream of :class:`Piece` objects, handed
one at a time to an ``emit`` callback as soon as each exists, and returns a
:class:`GenerationResult` with the finish reason and the token counts.

Contract shared by all backends:

* ``generate`` awaits ``emit(piece)`` for every piece in order; ``emit`` may block (that
  is the back-pressure: a backend does not run ahead of its consumer by more than a piece).
* Cancellation is Trio cancellation. When the caller's cancel scope is cancelled the
  backend stops the model's work within about one token and lets :class:`trio.Cancelled`
  propagate; it never returns ``finish_reason="cancelled"`` for that case (the caller,
  which cancelled, knows). ``"cancelled"`` and ``"error"`` exist for callers that build a
  result themselves.
* Errors are :class:`node.inference.errors.InferenceError` subclasses with wire codes.
* Nothing here logs or stores prompt or output text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, runtime_checkable

import attrs

from node.inference.errors import InvalidGenerationRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled", "error")


@attrs.frozen
class ChatMessage:
    """One turn of a conversation (``role`` is ``system``, ``user`` or ``assistant``)."""

    role: str
    content: str = attrs.field(repr=False)


@attrs.frozen
class GenerationRequest:
    """What to generate. Either ``prompt`` or ``messages`` is set.

    ``prompt`` is sent as a single user turn through the model's chat template.
    ``model`` None or "" selects the backend's default model. ``max_tokens`` None selects the
    backend's default and is always clamped to what fits into the context window.
    ``temperature`` None selects the backend's default; 0 means greedy (reproducible).
    """

    prompt: str | None = attrs.field(default=None, repr=False)
    messages: tuple[ChatMessage, ...] | None = attrs.field(default=None, repr=False)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = attrs.field(default=(), repr=False)
    seed: int | None = None


@attrs.frozen
class Piece:
    """One piece of generated text and how many tokens it holds.

    The pieces' token counts add up to the result's ``completion_tokens`` when the backend
    counts exactly, unless a stop sequence cut the text or ``max_tokens`` ended the answer
    in the middle of a multi-byte character (those tokens are counted, never emitted).
    A piece may hold 0 tokens when it is text held back from an earlier token (e.g. a
    possible stop-sequence start).
    """

    text: str = attrs.field(repr=False)
    tokens: int


@attrs.frozen
class GenerationResult:
    """How a generation ended and what it used.

    ``usage_estimated`` is True when the counts are estimates (e.g. an upstream server sent
    no usage) rather than exact tokenizer counts.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class ModelInfo:
    """One model a backend serves (the shape of an OpenAI ``/v1/models`` entry)."""

    id: str
    context_window: int | None
    owned_by: str


Emit = Callable[[Piece], Awaitable[None]]


def report_prompt_tokens(emit: Emit, count: int, *, estimated: bool = False) -> None:
    """Tell the caller, as soon as it is known, how many prompt tokens a request uses.

    A request that is cancelled or fails afterwards returns no result, yet its prompt was
    processed: the caller (the node's driver) accounts it with this count. An ``emit``
    that has no ``prompt_tokens_known`` method ignores the report.
    """
    hook = getattr(emit, "prompt_tokens_known", None)
    if hook is not None:
        hook(count, estimated)


@runtime_checkable
class Backend(Protocol):
    """An inference backend. See the module docstring for the contract."""

    name: str

    def models(self) -> list[ModelInfo]:
        """The models this backend serves; the first one is the default."""
        ...

    async def ready(self) -> bool:
        """True when the backend can serve requests now (loads or probes as needed)."""
        ...

    async def aclose(self) -> None:
        """Release the model or connections; running generations stop at the next token."""
        ...

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        """Generate for ``request``, awaiting ``emit`` per piece; see the module docstring."""
        ...


def validate_request(request: GenerationRequest) -> None:
    """Reject requests no backend can serve, with a message that never quotes the input."""
    if request.prompt is None and not request.messages:
        raise InvalidGenerationRequest("the request has neither a prompt nor messages")
    if request.prompt is not None and request.messages:
        raise InvalidGenerationRequest("the request has both a prompt and messages")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidGenerationRequest("max_tokens must be at least 1")
    if request.temperature is not None and not 0.0 <= request.temperature <= 10.0:
        raise InvalidGenerationRequest("temperature must be between 0 and 10")
    if any(s == "" for s in request.stop):
        raise InvalidGenerationRequest("stop sequences must not be empty")


def request_messages(request: GenerationRequest) -> tuple[ChatMessage, ...]:
    """The conversation of a request: its messages, or its prompt as one user turn."""
    if request.messages:
        return request.messages
    return (ChatMessage(role="user", content=request.prompt or ""),)


def resolve_max_tokens(requested: int | None, default: int | None, room: int | None) -> int | None:
    """The number of tokens to generate at most: the request's or the default, clamped to room.

    ``None`` means unlimited (only possible when both the default and ``room`` are None).
    """
    limit = requested if requested is not None else default
    if room is not None:
        limit = room if limit is None else min(limit, room)
    return limit
