"""The two elliptic-curve steps of every encrypted init, called on libsecp256k1 directly.

coincurve's objects wrap each call in Python (a ``PublicKey`` made per result, the
scalar checked and copied to ``bytes`` per multiplication, a fresh output buffer per
serialisation); on an init that is a tenth of the whole. These functions make the same
library calls through coincurve's own cffi binding, once each, with the node's checks
in front, and they wipe what held a secret: the shared point and its serialisation are
zeroed before their memory is given back, and the host scalar is read in place from its
wipeable buffer, never copied to ``bytes``.

:func:`node.crypto.curve.parse_public_key` and :func:`~node.crypto.curve.recover_public_key`
remain the general entry points; tests check that both paths agree on every input.
"""

from __future__ import annotations

from typing import Any, Final

from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT

from node.crypto.curve import HALF_N, SECP256K1_N
from node.crypto.errors import InvalidPublicKey, InvalidSignature
from node.crypto.secret import SecretBytes

_CTX: Final[Any] = GLOBAL_CONTEXT.ctx
_COMPRESSED: Final[int] = _lib.SECP256K1_EC_COMPRESSED
_UNCOMPRESSED: Final[int] = _lib.SECP256K1_EC_UNCOMPRESSED
_POINT_SIZE: Final = 64  # sizeof(secp256k1_pubkey), libsecp256k1's internal form
_ZEROS: Final = bytes(_POINT_SIZE)
# r and s as 32-byte big-endian strings: for strings of one length, bytes order is
# numeric order, so the range checks need no integers.
_ZERO32: Final = bytes(32)
_N32: Final = SECP256K1_N.to_bytes(32, "big")
_HALF_N32: Final = HALF_N.to_bytes(32, "big")


def _parse_point(data: bytes, field: str) -> Any:
    """A parsed ``secp256k1_pubkey *`` from 33 (02/03) or 65 (04) bytes on the curve."""
    size = len(data)
    if size == 33:
        if data[0] not in (2, 3):
            raise InvalidPublicKey(f"{field}: compressed key must start with 02 or 03")
    elif size == 65:
        if data[0] != 4:  # libsecp256k1 would also take the hybrid 06/07 forms
            raise InvalidPublicKey(f"{field}: uncompressed key must start with 04")
    else:
        raise InvalidPublicKey(f"{field}: must be 33 or 65 bytes, got {size}")
    point = _ffi.new("secp256k1_pubkey *")
    if not _lib.secp256k1_ec_pubkey_parse(_CTX, point, bytes(data), size):
        raise InvalidPublicKey(f"{field}: not a point on secp256k1")
    return point


def ecdh_x(
    scalar: bytearray, peer: bytes, *, field: str = "public key"
) -> tuple[SecretBytes, bytes]:
    """``(x, P)``: the x-coordinate of ``scalar * peer`` as a wipeable secret, and the
    peer's 33-byte compressed form ``P``.

    ``peer`` is checked as :func:`node.crypto.curve.parse_public_key` checks it
    (:class:`InvalidPublicKey` otherwise); ``scalar`` must be a valid private key (the
    host key, checked when it was loaded) and is read in place.
    """
    point = _parse_point(peer, field)
    # a valid 04 || x || y compresses to x with y's parity
    compressed = bytes(peer) if len(peer) == 33 else bytes((2 | (peer[64] & 1),)) + peer[1:33]
    out = _ffi.new("unsigned char[33]")
    size = _ffi.new("size_t *", 33)
    try:
        if not _lib.secp256k1_ec_pubkey_tweak_mul(_CTX, point, _ffi.from_buffer(scalar)):
            raise ValueError("the scalar is not a valid private key")  # pragma: no cover
        _lib.secp256k1_ec_pubkey_serialize(_CTX, out, size, point, _COMPRESSED)
        x = bytearray(32)
        _ffi.memmove(x, out + 1, 32)
    finally:
        _ffi.memmove(point, _ZEROS, _POINT_SIZE)
        _ffi.memmove(out, _ZEROS, 33)
    return SecretBytes.take(x), compressed


def check_recoverable_signature(signature: bytes) -> int:
    """The recovery id (0/1) of a 65-byte ``r || s || v`` signature, by the policy of
    :func:`node.crypto.curve.parse_recoverable_signature` (same checks, same messages)."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes (r||s||v), got {len(signature)}")
    v = signature[64]
    if v in (27, 28):
        v -= 27
    elif v not in (0, 1):
        raise InvalidSignature("signature v must be 0, 1, 27 or 28")
    r = signature[:32]
    s = signature[32:64]
    if not _ZERO32 < r < _N32:
        raise InvalidSignature("signature r is out of range")
    if not _ZERO32 < s < _N32:
        raise InvalidSignature("signature s is out of range")
    if s > _HALF_N32:
        raise InvalidSignature("signature s is in the upper half of the order (high-S)")
    return v


def recover_uncompressed(digest: bytes, signature: bytes) -> bytes:
    """The signer's 65-byte ``04 || x || y`` key from a 32-byte digest and ``r || s || v``
    (low-S, v in 0/1/27/28); :class:`InvalidSignature` when none can be recovered."""
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    recid = check_recoverable_signature(signature)
    sig = _ffi.new("secp256k1_ecdsa_recoverable_signature *")
    # r and s were checked to be below n, so the parse cannot fail
    _lib.secp256k1_ecdsa_recoverable_signature_parse_compact(
        _CTX, sig, bytes(signature[:64]), recid
    )
    point = _ffi.new("secp256k1_pubkey *")
    if not _lib.secp256k1_ecdsa_recover(_CTX, point, sig, bytes(digest)):
        raise InvalidSignature("no public key can be recovered from this signature")
    out = _ffi.new("unsigned char[65]")
    size = _ffi.new("size_t *", 65)
    _lib.secp256k1_ec_pubkey_serialize(_CTX, out, size, point, _UNCOMPRESSED)
    full: bytes = _ffi.buffer(out, 65)[:]
    return full


__all__ = ["check_recoverable_signature", "ecdh_x", "recover_uncompressed"]
