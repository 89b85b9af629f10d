"""HKDF-SHA256 (RFC 5869), the key schedule of PROTOCOL.md section 2."""

from __future__ import annotations

import hmac

from node.crypto.errors import CryptoError

HASH_LEN = 32
ZERO_SALT = bytes(32)


class HkdfLengthError(CryptoError):
    """Requested more than 255 * 32 bytes (RFC 5869 limit)."""


def hkdf_sha256(
    ikm: bytes | bytearray | memoryview,
    *,
    salt: bytes = b"",
    info: bytes = b"",
    length: int = 32,
) -> bytearray:
    """Extract-then-expand; an empty salt means 32 zero bytes, as the RFC says.

    Returns a ``bytearray`` so a caller can keep the output in a wipeable buffer.
    """
    if length < 0 or length > 255 * HASH_LEN:
        raise HkdfLengthError("HKDF output length must be between 0 and 8160 bytes")
    prk = hmac.digest(salt or ZERO_SALT, bytes(ikm), "sha256")
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        out += block
        counter += 1
    del out[length:]
    return out


def hkdf_sha256_fast32(ikm: bytes | bytearray) -> bytearray:
    """The protocol's exact case (zero salt, empty info, 32 bytes) without the loop."""
    prk = hmac.digest(ZERO_SALT, ikm, "sha256")
    return bytearray(hmac.digest(prk, b"\x01", "sha256"))
