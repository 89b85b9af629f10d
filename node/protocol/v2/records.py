"""Protocol v2 constants and the record layer (docs/PROTOCOL_V2.md sections 2 and 4).

A record's plaintext is ``type (1) || body_len (4, big-endian) || body || zero padding``.
With a padding block ``B > 0`` the whole plaintext is the smallest multiple of ``B`` that
holds the header and body; with ``B = 0`` there is no padding. Every parser here checks
lengths before it allocates and runs in time linear in its input.
"""

from __future__ import annotations

import json
from typing import Any, Final

from node.crypto.encoding import loads_bounded
from node.crypto.errors import ErrorCode
from node.protocol.errors import ProtocolError

PROTOCOL_NAME: Final = "Noise_NK_secp256k1_ChaChaPoly_SHA256"
PROLOGUE: Final = b"llm-node/v2"
PROTOCOL_ID: Final = "llm-node/2"

PUBLIC_KEY_LEN: Final = 33
TAG_LEN: Final = 16
MAX_HANDSHAKE_PAYLOAD: Final = 1024  # plaintext bytes of payload1 / payload2
MIN_HANDSHAKE_MESSAGE: Final = PUBLIC_KEY_LEN + TAG_LEN
MAX_HANDSHAKE_MESSAGE: Final = PUBLIC_KEY_LEN + MAX_HANDSHAKE_PAYLOAD + TAG_LEN
HANDSHAKE_TIMEOUT_S: Final = 10.0  # msg1 received -> session record received
#: The close reason (code 1008) of a node that cannot open message 1: it lacks the host key.
HANDSHAKE_FAILED_REASON: Final = "handshake failed"

HEADER_LEN: Final = 5
MAX_BODY: Final = 65536
MAX_PADDING_BLOCK: Final = 256
PADDING_CHOICES: Final = (0, 16, 32, 64, 128, 256)
MAX_RECORD: Final = HEADER_LEN + MAX_BODY + MAX_PADDING_BLOCK - 1  # plaintext
MAX_FRAME: Final = MAX_RECORD + TAG_LEN  # one binary WebSocket message
MIN_FRAME: Final = HEADER_LEN + TAG_LEN
REKEY_EVERY: Final = 1000

DATA: Final = 0x01
END: Final = 0x02
ERROR: Final = 0x03
CLOSE: Final = 0x04
RECORD_TYPES: Final = frozenset({DATA, END, ERROR, CLOSE})
RECORD_NAMES: Final = {DATA: "DATA", END: "END", ERROR: "ERROR", CLOSE: "CLOSE"}

FINISH_REASONS: Final = frozenset({"stop", "length", "cancelled", "error"})
MAX_REQUEST_ID: Final = 256
MAX_REASON: Final = 256


def _invalid(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, text)


def padded_length(body_len: int, padding: int) -> int:
    """Length of the record plaintext for a body of ``body_len`` bytes."""
    raw = HEADER_LEN + body_len
    if padding == 0:
        return raw
    return -(-raw // padding) * padding


def encode_record(kind: int, body: bytes, padding: int = 0) -> bytearray:
    """The plaintext of one record (to be encrypted by the transport cipher)."""
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown record type {kind}")
    if len(body) > MAX_BODY:
        raise ValueError(f"record body is {len(body)} bytes; at most {MAX_BODY}")
    out = bytearray(padded_length(len(body), padding))
    out[0] = kind
    out[1:HEADER_LEN] = len(body).to_bytes(4, "big")
    out[HEADER_LEN : HEADER_LEN + len(body)] = body
    return out


def parse_record(plaintext: bytes | bytearray, padding: int) -> tuple[int, bytes]:
    """(type, body) of a decrypted record; framing errors raise INVALID_MESSAGE.

    The type is returned as it is (the caller decides what an unknown type means).
    """
    size = len(plaintext)
    if size < HEADER_LEN:
        raise _invalid("record is shorter than its 5-byte header")
    if size > MAX_RECORD:
        raise _invalid("record is longer than the limit")
    body_len = int.from_bytes(plaintext[1:HEADER_LEN], "big")
    if body_len > MAX_BODY:
        raise _invalid(f"record body length {body_len} is over the limit of {MAX_BODY}")
    end = HEADER_LEN + body_len
    if end > size:
        raise _invalid("record body length is longer than the record")
    if size != padded_length(body_len, padding):
        raise _invalid("record padding does not match the agreed block size")
    if any(memoryview(plaintext)[end:]):
        raise _invalid("record padding bytes must be zero")
    return plaintext[0], bytes(plaintext[HEADER_LEN:end])


def dump_json(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON in the given key order (byte-stable for the vectors)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def load_json_object(body: bytes, what: str) -> dict[str, Any]:
    """A record body or handshake payload -> JSON object; anything else INVALID_MESSAGE."""
    try:
        obj = loads_bounded(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError):
        raise _invalid(f"{what} is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise _invalid(f"{what} must be a JSON object")
    return obj


def request_id_field(obj: dict[str, Any]) -> str:
    value = obj.get("request_id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID:
        raise _invalid(f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("request_id is not valid Unicode text") from None
    return value


def padding_field(obj: dict[str, Any]) -> int:
    value = obj.get("padding", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value not in PADDING_CHOICES:
        raise _invalid(f"padding must be one of {', '.join(map(str, PADDING_CHOICES))}")
    return int(value)
