"""The OpenAI side of the proxy, without I/O: request parsing, response shapes, errors.

Requests are read strictly: every field the OpenAI API defines is either honoured,
accepted at the value that means "the default" (``n: 1``, ``top_p: 1``, ``logprobs:
false``, ...), or refused with an OpenAI-style 400 that names it. Unknown fields are
refused too, so a client never gets an answer that silently ignored what it asked for.
A JSON ``null`` means the same as leaving the field out.

Error messages never quote the request's text (prompts, stop sequences, model names).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import attrs

from node.client.errors import (
    ClientError,
    ConnectFailed,
    HostVerificationFailed,
    NodeErrorResponse,
    ProtocolViolation,
    StreamTimeout,
    StreamTruncated,
)

MAX_STOP_SEQUENCES: Final = 8  # what the node accepts (node.protocol.requests)
MAX_SEED: Final = 2**32 - 1
MAX_TOKENS_LIMIT: Final = 1 << 20
_ROLES: Final = frozenset({"system", "developer", "user", "assistant"})

# Fields accepted only at the value that changes nothing: (field, accepted values).
_NEUTRAL: Final[Mapping[str, tuple[object, ...]]] = {
    "n": (1,),
    "top_p": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "echo": (False,),
    "best_of": (1,),
    "parallel_tool_calls": (False,),
}
_COMMON: Final = frozenset(
    {"model", "max_tokens", "temperature", "stop", "seed", "stream", "stream_options", "user"}
)
CHAT_FIELDS: Final = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS: Final = _COMMON | {"prompt"}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status plus ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _unsupported(name: str) -> ApiError:
    return _bad(
        f"'{name}' is not supported by this proxy (the node cannot honour it)",
        name,
        "unsupported_parameter",
    )


@attrs.frozen
class ProxyRequest:
    """What the proxy asks the node for: one OpenAI request, checked."""

    kind: str  # "chat" | "text"
    model: str
    messages: tuple[tuple[str, str], ...] | None = attrs.field(default=None, repr=False)
    prompt: str | None = attrs.field(default=None, repr=False)
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = attrs.field(default=(), repr=False)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("the request body must be a JSON object", None, "invalid_json") from None
    if not isinstance(obj, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_json")
    return {k: v for k, v in obj.items() if v is not None}


def _check_fields(obj: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name, value in obj.items():
        if name in allowed:
            continue
        neutral = _NEUTRAL.get(name, ())
        if any(value == v and type(value) is type(v) for v in neutral):
            continue  # the value that changes nothing
        raise _unsupported(name[:64])


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"'{param}' must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"'{param}' is not valid Unicode text", param) from None
    if "\x00" in value:
        raise _bad(f"'{param}' must not contain NUL characters", param)
    return value


def _int(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"'{param}' must be an integer from {low} to {high}", param)
    return value


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return _text(value, param)
    if not isinstance(value, list):
        raise _bad(f"'{param}' must be a string or a list of text parts", param)
    texts = []
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or set(part)
            != {
                "type",
                "text",
            }
        ):
            raise _bad(f"'{where}' is not a text part (only text content is supported)", where)
        texts.append(_text(part["text"], where + ".text"))
    return "".join(texts)


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object with role and content", where)
        for field_name, field in item.items():
            if field_name in ("role", "content"):
                continue
            if field is None or (field_name == "name" and isinstance(field, str)):
                continue
            raise _unsupported(f"{where}.{field_name[:64]}")
        role = item.get("role")
        if role not in _ROLES:
            raise _bad(
                f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}", f"{where}.role"
            )
        out.append(
            (
                "system" if role == "developer" else role,
                _content(item.get("content"), f"{where}.content"),
            )
        )
    return tuple(out)


def _common(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    model = obj.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise _bad("'model' is required: a model name from GET /v1/models", "model")
    max_tokens = None
    if "max_tokens" in obj:
        max_tokens = _int(obj["max_tokens"], "max_tokens", 1, MAX_TOKENS_LIMIT)
    if "max_completion_tokens" in obj:
        other = _int(obj["max_completion_tokens"], "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
        if max_tokens is not None and other != max_tokens:
            raise _bad(
                "'max_tokens' and 'max_completion_tokens' disagree; give one",
                "max_completion_tokens",
            )
        max_tokens = other
    temperature = None
    if "temperature" in obj:
        t = obj["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2:
            raise _bad("'temperature' must be a number from 0 to 2", "temperature")
        temperature = float(t)
        if not math.isfinite(temperature):  # pragma: no cover - JSON has no inf/nan here
            raise _bad("'temperature' must be a number from 0 to 2", "temperature")
    stop: tuple[str, ...] = ()
    if "stop" in obj:
        value = obj["stop"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > MAX_STOP_SEQUENCES:
            raise _bad(
                f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings",
                "stop",
            )
        stop = tuple(_text(s, "stop") for s in items)
        if any(not s for s in stop):
            raise _bad("'stop' sequences must not be empty", "stop")
    seed = _int(obj["seed"], "seed", 0, MAX_SEED) if "seed" in obj else None
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    include_usage = False
    if "stream_options" in obj:
        options = obj["stream_options"]
        if not stream:
            raise _bad("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        for option, value in options.items():
            if option != "include_usage" or not isinstance(value, bool):
                raise _unsupported(f"stream_options.{option[:64]}")
            include_usage = value
    if "user" in obj:
        _text(obj["user"], "user")
    return {
        "kind": kind,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stop": stop,
        "seed": seed,
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_chat_request(body: bytes) -> ProxyRequest:
    """``POST /v1/chat/completions`` body -> :class:`ProxyRequest` (or :class:`ApiError`)."""
    obj = _load_object(body)
    _check_fields(obj, CHAT_FIELDS)
    if "messages" not in obj:
        raise _bad("'messages' is required", "messages")
    messages = _messages(obj["messages"])
    return ProxyRequest(messages=messages, **_common(obj, "chat"))


def parse_completion_request(body: bytes) -> ProxyRequest:
    """``POST /v1/completions`` body -> :class:`ProxyRequest` (or :class:`ApiError`)."""
    obj = _load_object(body)
    _check_fields(obj, COMPLETION_FIELDS)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _bad("'prompt' must be one string (batches are not supported)", "prompt")
    if prompt is None:
        raise _bad("'prompt' is required", "prompt")
    return ProxyRequest(prompt=_text(prompt, "prompt"), **_common(obj, "text"))


# ---------------------------------------------------------------- errors from the node

# Node wire code -> (HTTP status, OpenAI type, OpenAI code).
_NODE_CODES: Final[Mapping[str, tuple[int, str, str]]] = {
    "RATE_LIMITED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "MODEL_NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "TOKEN_LIMIT_EXCEEDED": (400, "invalid_request_error", "context_length_exceeded"),
    "INVALID_PAYLOAD": (400, "invalid_request_error", "invalid_request"),
    "UNSUPPORTED_ACTION": (400, "invalid_request_error", "invalid_request"),
}


def error_from_client(exc: ClientError, request: ProxyRequest | None = None) -> ApiError:
    """Map what node.client raised to the HTTP error an OpenAI client expects."""
    if isinstance(exc, NodeErrorResponse):
        status, kind, code = _NODE_CODES.get(exc.code, (502, "api_error", "node_error"))
        param = None
        if exc.code == "MODEL_NOT_FOUND":
            param = "model"
        elif exc.code == "TOKEN_LIMIT_EXCEEDED" and request is not None:
            param = "messages" if request.kind == "chat" else "prompt"
        return ApiError(
            status,
            f"the node refused the request ({exc.code}): {exc.message}",
            type=kind,
            param=param,
            code=code,
        )
    if isinstance(exc, StreamTimeout):
        return ApiError(
            504,
            f"the node did not answer in time: {exc.message}",
            type="api_error",
            code="node_timeout",
        )
    if isinstance(exc, StreamTruncated):
        return ApiError(
            502,
            f"the node's answer broke off: {exc.message}",
            type="api_error",
            code="stream_truncated",
        )
    if isinstance(exc, ConnectFailed | HostVerificationFailed):
        return ApiError(
            502, f"cannot reach the node: {exc.message}", type="api_error", code="node_unreachable"
        )
    if isinstance(exc, ProtocolViolation):
        return ApiError(
            502,
            f"the node broke the protocol ({exc.code}): {exc.message}",
            type="api_error",
            code="node_protocol_error",
        )
    return ApiError(
        502,
        f"the encrypted session failed ({exc.code}): {exc.message}",
        type="api_error",
        code="node_error",
    )


# ---------------------------------------------------------------- response shapes


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(12).hex()


def openai_finish_reason(node_reason: str) -> str:
    return "length" if node_reason == "length" else "stop"


@attrs.define
class ResponseShaper:
    """Builds the JSON objects of one answer, streaming or not."""

    request: ProxyRequest
    id: str = attrs.field(factory=lambda: "")
    created: int = attrs.field(factory=lambda: int(time.time()))

    def __attrs_post_init__(self) -> None:
        if not self.id:
            self.id = new_id(self.request.kind)

    @property
    def _object(self) -> str:
        return "chat.completion" if self.request.kind == "chat" else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.request.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.request.include_usage:
            obj["usage"] = None
        return obj

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role (as OpenAI does); text streams don't."""
        if self.request.kind != "chat":
            return None
        return self._chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def piece_chunk(self, text: str) -> dict[str, Any]:
        if self.request.kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk([choice])

    def final_chunks(self, finish_reason: str, usage: dict[str, int]) -> list[dict[str, Any]]:
        reason = openai_finish_reason(finish_reason)
        if self.request.kind == "chat":
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        out = [self._chunk([choice])]
        if self.request.include_usage:
            last = self._chunk([])
            last["usage"] = usage
            out.append(last)
        return out

    def complete(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        reason = openai_finish_reason(finish_reason)
        if self.request.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage,
        }


def sse_event(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE: Final = b"data: [DONE]\n\n"
