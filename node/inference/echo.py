"""A deterministic backend that streams the prompt back: for tests, demos and load runs."""

from __future__ import annotations

import trio

from node.inference.base import (
    Emit,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Piece,
    report_prompt_tokens,
    resolve_max_tokens,
    validate_request,
)
from node.inference.errors import InferenceFailed, TokenLimitExceeded
from node.inference.text import split_word_pieces

ECHO_MODEL_ID = "echo"


class EchoBackend:
    """Streams the prompt text back unchanged, one word piece (= one token) at a time.

    The pieces keep the whitespace in front of each word, so their concatenation is exactly
    the echoed text (``"a b  c"`` -> ``"a"``, ``" b"``, ``"  c"``). For a message list the
    last ``user`` message is echoed. ``prompt_tokens`` is the number of word pieces of the
    prompt (of all message contents together for a message list).

    Options:

    * ``delay_s``: wait this long (``trio.sleep``, so MockClock works) before each piece.
    * ``context_window``: if set, a prompt with at least this many pieces raises
      :class:`TokenLimitExceeded` and ``max_tokens`` is clamped to the room left.
    * ``default_max_tokens``: the limit when a request gives none (None: echo everything).
    * ``fail_after_pieces``: if set, raise :class:`InferenceFailed` after emitting this many
      pieces (to exercise a server's error-after-streaming path).

    Any model name is accepted and ignored (clients such as the SDK send their own model
    names); stop sequences and temperature are ignored too: the output is always the input.
    """

    name = "echo"

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        context_window: int | None = None,
        default_max_tokens: int | None = None,
        fail_after_pieces: int | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self._delay_s = delay_s
        self._context_window = context_window
        self._default_max_tokens = default_max_tokens
        self._fail_after_pieces = fail_after_pieces
        self._closed = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=ECHO_MODEL_ID, context_window=self._context_window, owned_by="node")]

    async def ready(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        self._closed = True

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        validate_request(request)
        if self._closed:
            raise InferenceFailed("the echo backend is closed")

        if request.messages:
            prompt_tokens = sum(len(split_word_pieces(m.content)) for m in request.messages)
            users = [m.content for m in request.messages if m.role == "user"]
            text = users[-1] if users else ""
        else:
            text = request.prompt or ""
            prompt_tokens = len(split_word_pieces(text))

        room = None
        if self._context_window is not None:
            room = self._context_window - prompt_tokens
            if room < 1:
                raise TokenLimitExceeded(prompt_tokens, self._context_window)
        report_prompt_tokens(emit, prompt_tokens)
        limit = resolve_max_tokens(request.max_tokens, self._default_max_tokens, room)

        pieces = split_word_pieces(text)
        sent = 0
        for piece in pieces:
            if limit is not None and sent >= limit:
                return GenerationResult("length", prompt_tokens, sent)
            if self._fail_after_pieces is not None and sent >= self._fail_after_pieces:
                raise InferenceFailed("the echo backend was told to fail here")
            if self._delay_s:
                await trio.sleep(self._delay_s)
            elif sent % 64 == 63:
                # emit normally checkpoints (a memory channel does); this keeps a cancel
                # point even for an emit that never yields.
                await trio.lowlevel.checkpoint()
            await emit(Piece(text=piece, tokens=1))
            sent += 1
        return GenerationResult("stop", prompt_tokens, sent)
