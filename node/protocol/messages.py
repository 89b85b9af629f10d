"""Wire messages of PROTOCOL.md: one attrs class each, one cattrs converter.

``decode(text)`` turns one text frame into an inbound message or raises
:class:`ProtocolError` with the wire code of PROTOCOL.md section 6 - never another
exception type. ``encode(message)`` writes compact, byte-stable JSON (fixed key order,
lowercase hex without ``0x``, ASCII-only so any frame the node writes is valid UTF-8).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import cattrs

from node.crypto import aead
from node.crypto.encoding import bounded_loads, decode_hex
from node.crypto.errors import ErrorCode, NodeError
from node.crypto.session_init import InitPayload, parse_init_payload
from node.protocol.errors import ProtocolError

DEFAULT_CHAIN_ID: Final = 84532
MAX_ID_LENGTH: Final = 256
MAX_DECIMAL_DIGITS: Final = 78
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)n?")
_MESSAGE_AAD = re.compile(rb"message_(0|[1-9][0-9]{0,18})")

RequestId = str | int

# --------------------------------------------------------------------------- inbound


@attrs.frozen
class Ping:
    id: RequestId | None = None


@attrs.frozen
class EncryptedSessionInit:
    session_id: str
    job_id: int | None
    chain_id: int
    payload: InitPayload
    id: RequestId | None = None


@attrs.frozen
class SessionInit:
    """Plaintext (deprecated) session init."""

    session_id: str
    job_id: int | None
    chain_id: int
    id: RequestId | None = None


@attrs.frozen
class MessagePayload:
    ciphertext: bytes
    nonce: bytes
    aad: bytes
    index: int  # k of the ``message_<k>`` AAD


@attrs.frozen
class EncryptedMessage:
    session_id: str
    payload: MessagePayload
    id: RequestId | None = None


@attrs.frozen
class PromptRequest:
    """Plaintext ``prompt``/``inference`` request (deprecated mode)."""

    prompt: str
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool = True
    session_id: str | None = None
    id: RequestId | None = None


@attrs.frozen
class StreamCancel:
    session_id: str | None = None
    reason: str | None = None
    id: RequestId | None = None


InboundMessage = (
    Ping | EncryptedSessionInit | SessionInit | EncryptedMessage | PromptRequest | StreamCancel
)

# -------------------------------------------------------------------------- outbound


@attrs.frozen
class Connected:
    message: str
    type: str = "connected"


@attrs.frozen
class Pong:
    id: RequestId | None = None
    type: str = "pong"


@attrs.frozen
class SessionInitAck:
    session_id: str
    job_id: int | None
    chain_id: int
    message: str
    client_address: str | None = None
    id: RequestId | None = None
    status: str = "success"
    type: str = "session_init_ack"


@attrs.frozen
class ChunkPayload:
    ciphertext: bytes
    nonce: bytes
    aad: bytes
    index: int | None = None


@attrs.frozen
class EncryptedChunk:
    tokens: int
    payload: ChunkPayload
    id: RequestId | None = None
    session_id: str | None = None
    final: bool = False
    type: str = "encrypted_chunk"


@attrs.frozen
class EncryptedResponse:
    payload: ChunkPayload
    id: RequestId | None = None
    session_id: str | None = None
    type: str = "encrypted_response"


@attrs.frozen
class StreamChunk:
    content: str
    tokens: int
    id: RequestId | None = None
    session_id: str | None = None
    type: str = "stream_chunk"


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@attrs.frozen
class StreamEnd:
    reason: str  # complete | cancelled | error
    tokens_used: int
    finish_reason: str  # stop | length | cancelled | error
    usage: Usage
    id: RequestId | None = None
    session_id: str | None = None
    type: str = "stream_end"


@attrs.frozen
class ErrorMessage:
    code: str
    message: str
    id: RequestId | None = None
    session_id: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    type: str = "error"


OutboundMessage = (
    Connected
    | Pong
    | SessionInitAck
    | EncryptedChunk
    | EncryptedResponse
    | StreamChunk
    | StreamEnd
    | ErrorMessage
)

# ------------------------------------------------------------------------ converter

converter = cattrs.Converter()


def _hex(data: bytes) -> str:
    return data.hex()


def _unstructure_chunk_payload(p: ChunkPayload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ciphertextHex": p.ciphertext.hex(),
        "nonceHex": p.nonce.hex(),
        "aadHex": p.aad.hex(),
    }
    if p.index is not None:
        out["index"] = p.index
    return out


def _unstructure_encrypted_chunk(m: EncryptedChunk) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": m.type,
        "tokens": m.tokens,
        "payload": _unstructure_chunk_payload(m.payload),
    }
    _ids(out, m.id, m.session_id)
    if m.final:
        out["final"] = True
    return out


def _ids(out: dict[str, Any], request_id: RequestId | None, session_id: str | None) -> None:
    if request_id is not None:
        out["id"] = request_id
    if session_id is not None:
        out["session_id"] = session_id


def _unstructure_generic(cls: type[Any]) -> Any:
    """Type first, then the fields in declaration order, ``None`` values left out."""
    names = [f.name for f in attrs.fields(cls) if f.name != "type"]

    def unstructure(m: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"type": m.type}
        for name in names:
            value = getattr(m, name)
            if value is None:
                continue
            if name == "extra":
                out.update(value)
                continue
            out[name] = converter.unstructure(value)
        return out

    return unstructure


converter.register_unstructure_hook(bytes, _hex)
converter.register_unstructure_hook(ChunkPayload, _unstructure_chunk_payload)
converter.register_unstructure_hook(EncryptedChunk, _unstructure_encrypted_chunk)
for _cls in (Connected, Pong, EncryptedResponse, StreamChunk, StreamEnd, ErrorMessage):
    converter.register_unstructure_hook(_cls, _unstructure_generic(_cls))


def _unstructure_ack(m: SessionInitAck) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": m.type,
        "status": m.status,
        "session_id": m.session_id,
        "job_id": m.job_id,
        "chain_id": m.chain_id,
    }
    if m.client_address is not None:
        out["client_address"] = m.client_address
    out["message"] = m.message
    if m.id is not None:
        out["id"] = m.id
    return out


converter.register_unstructure_hook(SessionInitAck, _unstructure_ack)

_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def _ids_text(request_id: RequestId | None, session_id: str | None) -> str:
    out = ""
    if request_id is not None:
        out += ',"id":' + _dumps(request_id)
    if session_id is not None:
        out += ',"session_id":' + _dumps(session_id)
    return out


def encrypted_chunk_text(
    tokens: int,
    ciphertext: bytes,
    nonce: bytes,
    aad: bytes,
    index: int | None,
    request_id: RequestId | None,
    session_id: str | None,
    final: bool = False,
) -> str:
    """The exact text ``encode(EncryptedChunk(...))`` gives, without building the objects
    (the per-piece hot path of the chunk sender)."""
    index_text = "" if index is None else f',"index":{index:d}'
    final_text = ',"final":true' if final else ""
    return (
        f'{{"type":"encrypted_chunk","tokens":{tokens:d},"payload":{{"ciphertextHex":"'
        f'{ciphertext.hex()}","nonceHex":"{nonce.hex()}","aadHex":"{aad.hex()}"'
        f"{index_text}}}{_ids_text(request_id, session_id)}{final_text}}}"
    )


def _encode_encrypted_chunk(m: EncryptedChunk) -> str:
    p = m.payload
    return encrypted_chunk_text(
        m.tokens, p.ciphertext, p.nonce, p.aad, p.index, m.id, m.session_id, m.final
    )


def _encode_ack(m: SessionInitAck) -> str:
    """``session_init_ack`` written directly (once per init; same bytes as the converter)."""
    job = "null" if m.job_id is None else f"{m.job_id:d}"
    address = "" if m.client_address is None else f',"client_address":{_dumps(m.client_address)}'
    request_id = "" if m.id is None else f',"id":{_dumps(m.id)}'
    return (
        f'{{"type":{_dumps(m.type)},"status":{_dumps(m.status)},'
        f'"session_id":{_dumps(m.session_id)},"job_id":{job},"chain_id":{m.chain_id:d}'
        f'{address},"message":{_dumps(m.message)}{request_id}}}'
    )


def _encode_stream_chunk(m: StreamChunk) -> str:
    return (
        f'{{"type":"stream_chunk","content":{_dumps(m.content)},"tokens":{m.tokens:d}'
        f"{_ids_text(m.id, m.session_id)}}}"
    )


# The two frames sent once per piece, and the init ack, get a direct writer; tests check
# that it gives exactly the bytes of the generic converter path.
_FAST_ENCODERS: Final[dict[type[Any], Callable[[Any], str]]] = {
    EncryptedChunk: _encode_encrypted_chunk,
    StreamChunk: _encode_stream_chunk,
    SessionInitAck: _encode_ack,
}


def encode(message: OutboundMessage) -> str:
    """Compact, byte-stable JSON text of an outbound message."""
    fast = _FAST_ENCODERS.get(type(message))
    if fast is not None:
        return fast(message)
    return _dumps(converter.unstructure(message))


def encode_generic(message: OutboundMessage) -> str:
    """The converter path for every message type (the reference the fast path matches)."""
    return _dumps(converter.unstructure(message))


# -------------------------------------------------------------------------- decoding


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, message)


def _field(obj: Mapping[str, Any], snake: str, camel: str | None = None) -> Any:
    if snake in obj:
        return obj[snake]
    if camel is not None:
        return obj.get(camel)
    return None


def _request_id(obj: Mapping[str, Any]) -> RequestId | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _invalid("id must be a string or an integer")
    if isinstance(value, str):
        if len(value) > MAX_ID_LENGTH:
            raise _invalid(f"id is longer than {MAX_ID_LENGTH} characters")
        check_text(value, "id")
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise _invalid("id is out of range")
    return value


def _decimal(value: Any, name: str) -> int:
    """A decimal string (optional trailing ``n``) or a non-negative integer."""
    if isinstance(value, bool):
        raise _invalid(f"{name} must be a decimal string")
    if isinstance(value, int):
        if not 0 <= value < 10**MAX_DECIMAL_DIGITS:
            raise _invalid(f"{name} must be a non-negative number of at most 78 digits")
        return value
    if (
        isinstance(value, str)
        and len(value) <= MAX_DECIMAL_DIGITS + 1
        and _DECIMAL.fullmatch(value)
    ):
        return int(value.rstrip("n"))
    raise _invalid(f"{name} must be a decimal string")


def _session_id(obj: Mapping[str, Any], *, required: bool) -> str | None:
    value = _field(obj, "session_id", "sessionId")
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.MISSING_SESSION_ID, "session_id is required")
        return None
    return str(_decimal(value, "session_id"))


def _job_id(obj: Mapping[str, Any]) -> int | None:
    value = _field(obj, "job_id", "jobId")
    return None if value is None else _decimal(value, "job_id")


def _chain_id(obj: Mapping[str, Any]) -> int:
    value = _field(obj, "chain_id", "chainId")
    if value is None:
        return DEFAULT_CHAIN_ID
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise _invalid("chain_id must be a positive integer")
    return value


def _payload(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    payload = obj.get("payload")
    if payload is None:
        raise ProtocolError(ErrorCode.MISSING_PAYLOAD, "payload object is required")
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "payload must be a JSON object")
    return payload


def _payload_hex(payload: Mapping[str, Any], name: str) -> bytes:
    value = payload.get(name)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"payload.{name} must be a hex string")
    return decode_hex(value, name)


def parse_message_aad(aad: bytes) -> int:
    """k of an AAD ``message_<k>``; anything else is ``INVALID_AAD``."""
    match = _MESSAGE_AAD.fullmatch(aad)
    if match is None:
        raise ProtocolError(ErrorCode.INVALID_AAD, "AAD must be the ASCII text message_<k>")
    return int(match.group(1))


def check_text(value: str, name: str) -> str:
    """Refuse strings that cannot be written as UTF-8 (lone surrogates from \\u escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{name} is not valid Unicode text") from None
    return value


def _optional_str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    return check_text(value, name)


def parse_max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1_000_000:
        raise _invalid("max_tokens must be an integer between 1 and 1000000")
    return value


def parse_temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10:
        raise _invalid("temperature must be a number between 0 and 10")
    return float(value)


def _decode_encrypted_init(obj: Mapping[str, Any]) -> EncryptedSessionInit:
    request_id = _request_id(obj)
    session_id = _session_id(obj, required=True)
    assert session_id is not None
    job_id = _job_id(obj)
    chain_id = _chain_id(obj)
    try:
        payload = parse_init_payload(obj.get("payload"))
    except NodeError as exc:
        raise ProtocolError(exc.code, exc.message) from None
    return EncryptedSessionInit(session_id, job_id, chain_id, payload, request_id)


def _decode_encrypted_message(obj: Mapping[str, Any]) -> EncryptedMessage:
    request_id = _request_id(obj)
    session_id = _session_id(obj, required=True)
    assert session_id is not None
    payload = _payload(obj)
    ciphertext = _payload_hex(payload, "ciphertextHex")
    nonce = _payload_hex(payload, "nonceHex")
    aad = _payload_hex(payload, "aadHex")
    if len(nonce) != aead.NONCE_SIZE:
        raise ProtocolError(
            ErrorCode.INVALID_NONCE_SIZE, f"nonceHex must be 24 bytes, got {len(nonce)}"
        )
    if len(ciphertext) < aead.TAG_SIZE:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "ciphertextHex is shorter than the tag")
    index = parse_message_aad(aad)
    return EncryptedMessage(session_id, MessagePayload(ciphertext, nonce, aad, index), request_id)


def _decode_session_init(obj: Mapping[str, Any]) -> SessionInit:
    request_id = _request_id(obj)
    job_id = _job_id(obj)
    session_id = _session_id(obj, required=job_id is None)
    if session_id is None:
        session_id = str(job_id)
    return SessionInit(session_id, job_id, _chain_id(obj), request_id)


def _decode_prompt(obj: Mapping[str, Any]) -> PromptRequest:
    request_id = _request_id(obj)
    session_id = _session_id(obj, required=False)
    request = obj.get("request")
    if request is None:
        request = {}
    elif not isinstance(request, dict):
        raise _invalid("request must be a JSON object")
    prompt = obj.get("prompt")
    if prompt is None:
        prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise _invalid("prompt is required and must be a string")
    check_text(prompt, "prompt")

    def pick(name: str) -> Any:
        return request[name] if name in request else obj.get(name)

    model = pick("model")
    if model is not None:
        if not isinstance(model, str):
            raise _invalid("model must be a string")
        check_text(model, "model")
    stream = pick("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream must be true or false")
    return PromptRequest(
        prompt=prompt,
        model=model,
        max_tokens=parse_max_tokens(pick("max_tokens")),
        temperature=parse_temperature(pick("temperature")),
        stream=True if stream is None else stream,
        session_id=session_id,
        id=request_id,
    )


def _decode_cancel(obj: Mapping[str, Any]) -> StreamCancel:
    return StreamCancel(
        session_id=_session_id(obj, required=False),
        reason=_optional_str(obj, "reason"),
        id=_request_id(obj),
    )


_DECODERS: Final[dict[str, Callable[[Mapping[str, Any]], InboundMessage]]] = {
    "ping": lambda obj: Ping(_request_id(obj)),
    "encrypted_session_init": _decode_encrypted_init,
    "session_init": _decode_session_init,
    "encrypted_message": _decode_encrypted_message,
    "prompt": _decode_prompt,
    "inference": _decode_prompt,
    "stream_cancel": _decode_cancel,
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


# One decoder for every frame (json.loads with a keyword builds a new one per call).
_frame_loads = bounded_loads(parse_constant=_reject_constant)


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` that turns every failure into ``INVALID_MESSAGE``."""
    try:
        if isinstance(text, bytes):
            # Strict UTF-8: json.loads would otherwise guess UTF-16/32 from the bytes.
            text = text.decode("utf-8")
        return _frame_loads(text)
    except (ValueError, RecursionError, TypeError):
        raise _invalid("frame is not valid UTF-8 JSON") from None


def decode(text: str | bytes) -> InboundMessage:
    """Decode one text frame. Raises :class:`ProtocolError` (with a wire code) only.

    The frame is parsed once. When its JSON is an object with a valid ``id`` but the frame
    is refused, the error carries that id in ``request_id`` for the reply to echo.
    """
    obj = parse_json(text)
    if not isinstance(obj, dict):
        raise _invalid("frame must be a JSON object")
    try:
        return _decode_object(obj)
    except NodeError as exc:
        error = exc if isinstance(exc, ProtocolError) else ProtocolError(exc.code, exc.message)
        error.request_id = _echo_id(obj)
        raise error from None


def _decode_object(obj: Mapping[str, Any]) -> InboundMessage:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _invalid("frame needs a string field 'type'")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise _invalid(f"unknown message type {kind[:40]!r}")
    return decoder(obj)


def _echo_id(obj: Mapping[str, Any]) -> RequestId | None:
    try:
        return _request_id(obj)
    except ProtocolError:
        return None


def request_id_of(text: str | bytes) -> RequestId | None:
    """Best-effort ``id`` of a frame that failed to decode (parses it again: the server
    uses ``ProtocolError.request_id`` from :func:`decode` instead)."""
    try:
        obj = parse_json(text)  # the same depth guard as decode: never json.loads raw input
        return _echo_id(obj) if isinstance(obj, dict) else None
    except ProtocolError:
        return None
