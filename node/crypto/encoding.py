"""Hex decoding with wire error codes (PROTOCOL.md section 2)."""

from __future__ import annotations

import binascii

from node.crypto.errors import InvalidHexEncoding

_HEX_CHARS = frozenset("0123456789abcdefABCDEF")


def decode_hex(text: str, field: str) -> bytes:
    """Decode hex with an optional ``0x``/``0X`` prefix, either case.

    Odd length or a non-hex character raises :class:`InvalidHexEncoding` naming the
    field but never echoing the value.
    """
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) % 2:
        raise InvalidHexEncoding(f"{field}: hex string has an odd number of digits")
    try:
        # bytes.fromhex accepts whitespace; the wire format does not.
        if not _HEX_CHARS.issuperset(body):
            raise ValueError
        return binascii.unhexlify(body)
    except ValueError:
        raise InvalidHexEncoding(f"{field}: not a hex string") from None


def decode_hex_into_bytearray(text: str, field: str) -> bytearray:
    """Like :func:`decode_hex` but returns a mutable buffer (for secrets to be wiped)."""
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) % 2:
        raise InvalidHexEncoding(f"{field}: hex string has an odd number of digits")
    if not _HEX_CHARS.issuperset(body):
        raise InvalidHexEncoding(f"{field}: not a hex string")
    return bytearray.fromhex(body)


def encode_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex without prefix, as the node writes it."""
    return binascii.hexlify(data).decode("ascii")
