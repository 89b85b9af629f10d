"""The inference request carried by a prompt (plaintext) or an encrypted message."""

from __future__ import annotations

from typing import Any, Final

import attrs

from node.crypto.errors import ErrorCode
from node.protocol.errors import ProtocolError
from node.protocol.messages import (
    PromptRequest,
    check_text,
    parse_json,
    parse_max_tokens,
    parse_temperature,
)

# ``action`` values that mean plain inference; anything else is UNSUPPORTED_ACTION.
INFERENCE_ACTIONS: Final = frozenset({"inference", "prompt", "chat", "generate"})
MAX_STOP_SEQUENCES: Final = 8


@attrs.frozen
class InferenceRequest:
    """What the node asks its backend for; the same for both modes."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True

    @classmethod
    def from_prompt(cls, message: PromptRequest) -> InferenceRequest:
        return cls(
            prompt=message.prompt,
            model=message.model,
            max_tokens=message.max_tokens,
            temperature=message.temperature,
            stream=message.stream,
        )


def _invalid(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_PAYLOAD, text)


def _text(value: str, name: str) -> str:
    """``check_text`` with this module's code: request content errors are INVALID_PAYLOAD."""
    try:
        return check_text(value, name)
    except ProtocolError as exc:
        raise _invalid(exc.message) from None


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _invalid("messages must be a non-empty list")
    out: list[tuple[str, str]] = []
    for item in value:
        if not isinstance(item, dict):
            raise _invalid("each message must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _invalid("each message needs string role and content")
        out.append((_text(role, "role"), _text(content, "content")))
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise _invalid(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings")
    return tuple(_text(s, "stop") for s in value)


def parse_request_plaintext(text: str) -> InferenceRequest:
    """Decrypted ``encrypted_message`` plaintext -> request.

    A JSON object is read for ``prompt`` (or ``messages``), ``model``, ``max_tokens``,
    ``temperature``, ``stop``, ``seed``, ``stream``; anything that is not a JSON object is
    the bare prompt itself (PROTOCOL.md section 4).
    """
    _text(text, "prompt")
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return InferenceRequest(prompt=text)
    try:
        obj = parse_json(text)
    except ProtocolError:
        return InferenceRequest(prompt=text)
    if not isinstance(obj, dict):  # pragma: no cover - a '{' start parses to a dict
        return InferenceRequest(prompt=text)
    return request_from_object(obj)


def request_from_object(obj: dict[str, Any]) -> InferenceRequest:
    """The request fields of a decoded JSON object (v1's encrypted message, v2's
    ``request`` record): ``prompt`` or ``messages``, ``model``, ``max_tokens``,
    ``temperature``, ``stop``, ``seed``, ``stream``. Errors are ``INVALID_PAYLOAD``."""
    action = obj.get("action")
    if action is not None and not (isinstance(action, str) and action in INFERENCE_ACTIONS):
        # The value comes from decrypted text: never echo it in the (plaintext) error.
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_ACTION, "action is not supported; only plain inference is"
        )
    prompt = obj.get("prompt")
    messages = _messages(obj["messages"]) if obj.get("messages") is not None else None
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _invalid("prompt must be a string")
        _text(prompt, "prompt")
    elif messages is None:
        raise _invalid("request needs a prompt or messages")
    model = obj.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _invalid("model must be a string")
        _text(model, "model")
    seed = obj.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32
    ):
        raise _invalid("seed must be an integer between 0 and 2^32-1")
    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise _invalid("stream must be true or false")
    try:
        max_tokens = parse_max_tokens(obj.get("max_tokens"))
        temperature = parse_temperature(obj.get("temperature"))
    except ProtocolError as exc:
        raise _invalid(exc.message) from None
    return InferenceRequest(
        prompt=prompt,
        messages=messages,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        stop=_stop(obj.get("stop")),
        seed=seed,
        stream=stream,
    )
