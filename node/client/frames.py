"""Strict parsing of node -> client frames, and the client -> node frames the client sends.

``node.protocol.messages.decode`` reads what a node receives; this module reads what a
node sends (``connected``, ``pong``, ``session_init_ack``, ``encrypted_chunk``,
``encrypted_response``, ``stream_chunk``, ``stream_end``, ``error``) into the same attrs
classes the node writes them from, and raises :class:`MalformedFrame` for anything that
is not one of them. Unknown extra keys are ignored; missing or mistyped keys are not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from node.client.errors import MalformedFrame
from node.crypto import aead
from node.crypto.encoding import decode_hex, encode_hex, loads_bounded
from node.crypto.errors import InvalidHexEncoding
from node.protocol.messages import (
    ChunkPayload,
    Connected,
    EncryptedChunk,
    EncryptedResponse,
    ErrorMessage,
    Pong,
    RequestId,
    SessionInitAck,
    StreamChunk,
    Usage,
)

_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,77}")
MAX_TEXT: Final = 1 << 20


@attrs.frozen
class StreamEndFrame:
    """``stream_end`` as a client reads it.

    ``finish_reason`` and ``usage`` are optional here because some nodes leave them out;
    an encrypted stream takes its finish reason from the authenticated
    ``encrypted_response`` anyway, and a plaintext stream requires it (see the readers).
    """

    reason: str
    tokens_used: int
    finish_reason: str | None = None
    usage: Usage | None = None
    id: RequestId | None = None
    session_id: str | None = None


ServerFrame = (
    Connected
    | Pong
    | SessionInitAck
    | EncryptedChunk
    | EncryptedResponse
    | StreamChunk
    | StreamEndFrame
    | ErrorMessage
)


def _bad(message: str) -> MalformedFrame:
    return MalformedFrame(message)


def _str(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise _bad(f"{obj.get('type')} frame needs a string field {name!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        raise _bad(f"{obj.get('type')} frame field {name!r} is not valid Unicode text") from None
    return value


def _optional_str(obj: Mapping[str, Any], name: str) -> str | None:
    return None if obj.get(name) is None else _str(obj, name)


def _count(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{obj.get('type', 'usage')} frame needs a non-negative integer {name!r}")
    return value


def _request_id(obj: Mapping[str, Any]) -> RequestId | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _bad("id must be a string or an integer")
    return value


def _decimal_id(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(f"{name} must be a decimal string")
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return value
    raise _bad(f"{name} must be a decimal string")


def _hex(payload: Mapping[str, Any], name: str) -> bytes:
    value = payload.get(name)
    if not isinstance(value, str):
        raise _bad(f"payload.{name} must be a hex string")
    try:
        return decode_hex(value, name)
    except InvalidHexEncoding as exc:
        raise _bad(exc.message) from None


def _sealed_payload(obj: Mapping[str, Any], *, with_index: bool) -> ChunkPayload:
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise _bad(f"{obj.get('type')} frame needs a payload object")
    ciphertext = _hex(payload, "ciphertextHex")
    nonce = _hex(payload, "nonceHex")
    aad = _hex(payload, "aadHex")
    if len(nonce) != aead.NONCE_SIZE:
        raise _bad(f"payload.nonceHex must be {aead.NONCE_SIZE} bytes, got {len(nonce)}")
    if len(ciphertext) < aead.TAG_SIZE:
        raise _bad("payload.ciphertextHex is shorter than the 16-byte tag")
    index = None
    if with_index:
        index = _count(payload, "index")
    return ChunkPayload(ciphertext, nonce, aad, index)


def _connected(obj: Mapping[str, Any]) -> Connected:
    return Connected(_optional_str(obj, "message") or "")


def _pong(obj: Mapping[str, Any]) -> Pong:
    return Pong(_request_id(obj))


def _ack(obj: Mapping[str, Any]) -> SessionInitAck:
    session_id = _decimal_id(obj, "session_id")
    if session_id is None:
        raise _bad("session_init_ack needs a session_id")
    job = _decimal_id(obj, "job_id")
    chain = obj.get("chain_id")
    if isinstance(chain, bool) or not isinstance(chain, int):
        raise _bad("session_init_ack needs an integer chain_id")
    return SessionInitAck(
        session_id=session_id,
        job_id=None if job is None else int(job),
        chain_id=chain,
        message=_optional_str(obj, "message") or "",
        client_address=_optional_str(obj, "client_address"),
        id=_request_id(obj),
        status=_str(obj, "status"),
    )


def _final_flag(obj: Mapping[str, Any]) -> bool:
    value = obj.get("final", False)
    if not isinstance(value, bool):
        raise _bad("encrypted_chunk final must be true or false")
    return value


def _encrypted_chunk(obj: Mapping[str, Any]) -> EncryptedChunk:
    return EncryptedChunk(
        tokens=_count(obj, "tokens"),
        payload=_sealed_payload(obj, with_index=True),
        id=_request_id(obj),
        session_id=_decimal_id(obj, "session_id"),
        final=_final_flag(obj),
    )


def _encrypted_response(obj: Mapping[str, Any]) -> EncryptedResponse:
    return EncryptedResponse(
        payload=_sealed_payload(obj, with_index=False),
        id=_request_id(obj),
        session_id=_decimal_id(obj, "session_id"),
    )


def _stream_chunk(obj: Mapping[str, Any]) -> StreamChunk:
    return StreamChunk(
        _str(obj, "content"),
        _count(obj, "tokens"),
        _request_id(obj),
        _decimal_id(obj, "session_id"),
    )


def _usage(obj: Mapping[str, Any]) -> Usage | None:
    value = obj.get("usage")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("stream_end usage must be an object")
    prompt = _count(value, "prompt_tokens")
    completion = _count(value, "completion_tokens")
    total = _count(value, "total_tokens")
    if total != prompt + completion:
        raise _bad("stream_end usage total_tokens is not prompt_tokens + completion_tokens")
    return Usage(prompt, completion, total)


def _stream_end(obj: Mapping[str, Any]) -> StreamEndFrame:
    return StreamEndFrame(
        reason=_str(obj, "reason"),
        tokens_used=_count(obj, "tokens_used"),
        finish_reason=_optional_str(obj, "finish_reason"),
        usage=_usage(obj),
        id=_request_id(obj),
        session_id=_decimal_id(obj, "session_id"),
    )


_ERROR_KEYS: Final = frozenset({"type", "code", "message", "id", "session_id", "error"})


def _error(obj: Mapping[str, Any]) -> ErrorMessage:
    code = _optional_str(obj, "code")
    message = _optional_str(obj, "message")
    if message is None:
        # Some nodes write {"type":"error","error":"..."} without code or message.
        message = _optional_str(obj, "error")
    extra = {
        k: v
        for k, v in obj.items()
        if k not in _ERROR_KEYS and isinstance(v, int | float | str | bool)
    }
    return ErrorMessage(
        code=code or "UNSPECIFIED",
        message=(message or "the node reported an error without a message")[:2000],
        id=_request_id(obj),
        session_id=_decimal_id(obj, "session_id"),
        extra=extra,
    )


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any]], ServerFrame]]] = {
    "connected": _connected,
    "pong": _pong,
    "session_init_ack": _ack,
    "encrypted_chunk": _encrypted_chunk,
    "encrypted_response": _encrypted_response,
    "stream_chunk": _stream_chunk,
    "stream_end": _stream_end,
    "error": _error,
}


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def parse_server_frame(frame: str | bytes) -> ServerFrame:
    """Parse one node -> client frame; anything else raises :class:`MalformedFrame`."""
    if not isinstance(frame, str):
        raise _bad("the node sent a binary frame; the protocol uses JSON text frames only")
    if len(frame) > 4 * MAX_TEXT:
        raise _bad("frame is too large")
    try:
        obj = loads_bounded(frame, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise _bad("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _bad("frame is not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _bad("frame has no string field 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise _bad(f"unknown frame type {kind[:40]!r}")
    result: ServerFrame = parser(obj)
    return result


# ------------------------------------------------------------------ client -> node

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def dumps(obj: Mapping[str, Any]) -> str:
    """Compact JSON the way ``JSON.stringify`` writes it (non-ASCII kept as is)."""
    return _dumps(obj)


def encrypted_session_init_frame(
    payload: Mapping[str, Any], *, session_id: str, job_id: str, chain_id: int
) -> str:
    """The init frame in the SDK's key order: type, payload, chain_id, session_id, job_id."""
    return dumps(
        {
            "type": "encrypted_session_init",
            "payload": dict(payload),
            "chain_id": chain_id,
            "session_id": session_id,
            "job_id": job_id,
        }
    )


def encrypted_message_frame(
    *,
    session_id: str,
    request_id: str,
    ciphertext: bytes,
    nonce: bytes,
    aad: bytes,
    web_search: bool = False,
    max_searches: int = 0,
    search_queries: list[str] | None = None,
) -> str:
    """An ``encrypted_message`` with the SDK's keys in the SDK's order.

    The SDK always appends its web-search fields (``false``/``0``/``null`` when unused);
    the node ignores them, and writing them keeps our frames shaped like the SDK's.
    """
    return dumps(
        {
            "type": "encrypted_message",
            "session_id": session_id,
            "id": request_id,
            "payload": {
                "ciphertextHex": encode_hex(ciphertext),
                "nonceHex": encode_hex(nonce),
                "aadHex": encode_hex(aad),
            },
            "web_search": web_search,
            "max_searches": max_searches,
            "search_queries": search_queries,
        }
    )


def session_init_frame(*, session_id: str, job_id: str, chain_id: int) -> str:
    return dumps(
        {"type": "session_init", "session_id": session_id, "job_id": job_id, "chain_id": chain_id}
    )


def prompt_frame(*, session_id: str, request_id: str, request: Mapping[str, Any]) -> str:
    return dumps(
        {
            "type": "prompt",
            "session_id": session_id,
            "id": request_id,
            "prompt": request["prompt"],
            "request": dict(request),
        }
    )


def stream_cancel_frame(*, session_id: str, reason: str) -> str:
    return dumps({"type": "stream_cancel", "session_id": session_id, "reason": reason})


def ping_frame(request_id: str) -> str:
    return dumps({"type": "ping", "id": request_id})
