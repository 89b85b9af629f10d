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

from node.crypto.curve import check_sec1_encoding, recovery_id
from node.crypto.errors import InvalidPublicKey, InvalidSignature
from node.crypto.secret import SecretBytes

_CTX: Final[Any] = GLOBAL_CONTEXT.ctx
_COMPRESSED: Final[int] = _lib.SECP256K1_EC_COMPRESSED
_UNCOMPRESSED: Final[int] = _lib.SECP256K1_EC_UNCOMPRESSED
_POINT_SIZE: Final = 64  # sizeof(secp256k1_pubkey), libsecp256k1's internal form
_ZEROS: Final = bytes(_POINT_SIZE)


def _parse_point(data: bytes, field: str) -> Any:
    """A parsed ``secp256k1_pubkey *`` from 33 (02/03) or 65 (04) bytes on the curve."""
    check_sec1_encoding(data, field)
    point = _ffi.new("secp256k1_pubkey *")
    if not _lib.secp256k1_ec_pubkey_parse(_CTX, point, bytes(data), len(data)):
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


def recover_uncompressed(digest: bytes, signature: bytes) -> bytes:
    """The signer's 65-byte ``04 || x || y`` key from a 32-byte digest and ``r || s || v``
    (low-S, v in 0/1/27/28); :class:`InvalidSignature` when none can be recovered."""
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    recid = recovery_id(signature)  # the policy of recover_public_key, shared
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


__all__ = ["ecdh_x", "recover_uncompressed"]
