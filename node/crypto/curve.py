"""secp256k1 points, ECDH x-coordinate, signatures and Ethereum addresses."""

from __future__ import annotations

import hashlib
import importlib
import threading
from typing import Any

from coincurve import PrivateKey, PublicKey
from Crypto.Hash import keccak

from node.crypto.errors import InvalidPublicKey, InvalidSignature
from node.crypto.secret import SecretBytes

# Order of the secp256k1 group.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


def check_sec1_encoding(data: bytes | bytearray, field: str) -> None:
    """Refuse what is not a 33-byte (02/03) or 65-byte (04) SEC1 encoding; the hybrid
    06/07 forms, which libsecp256k1 would parse, are refused too."""
    if len(data) == 33:
        if data[0] not in (2, 3):
            raise InvalidPublicKey(f"{field}: compressed key must start with 02 or 03")
    elif len(data) == 65:
        if data[0] != 4:
            raise InvalidPublicKey(f"{field}: uncompressed key must start with 04")
    else:
        raise InvalidPublicKey(f"{field}: must be 33 or 65 bytes, got {len(data)}")


def parse_public_key(data: bytes | bytearray, *, field: str = "public key") -> PublicKey:
    """Parse a SEC1 point of 33 (compressed) or 65 (uncompressed) bytes and check it is on
    the curve. Hybrid (0x06/0x07) encodings and the point at infinity are refused."""
    check_sec1_encoding(data, field)
    try:
        return PublicKey(bytes(data))
    except (ValueError, TypeError):
        raise InvalidPublicKey(f"{field}: not a point on secp256k1") from None


def ecdh_x(scalar: bytes | bytearray | memoryview, peer: PublicKey) -> SecretBytes:
    """The raw 32-byte x-coordinate of ``scalar * peer`` (no hashing of the point)."""
    point = peer.multiply(bytes(scalar))
    return SecretBytes(point.format(compressed=True)[1:])


def _keccak256_pycryptodome(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


# pycryptodome's C Keccak called without its per-call Python wrapper (2.7 vs 6.2 us a
# digest here); if a pycryptodome version lacks these internals, its public API is used.
_keccak_lib: Any = getattr(keccak, "_raw_keccak_lib", None)
_ffi: Any = getattr(importlib.import_module("Crypto.Util._raw_api"), "ffi", None)
if _ffi is None:  # pragma: no cover - the ctypes backend
    _keccak_lib = None


class _KeccakState(threading.local):
    """One reusable Keccak-256 state per thread (reset before each use)."""

    def __init__(self) -> None:
        ptr = _ffi.new("void **")
        if _keccak_lib.keccak_init(ptr, 64, 24):  # capacity 2 x 32 bytes, 24 rounds
            raise RuntimeError("keccak_init failed")  # pragma: no cover
        self.state = _ffi.gc(ptr[0], _keccak_lib.keccak_destroy)
        self.out = _ffi.new("uint8_t[32]")


_keccak_local = _KeccakState() if _keccak_lib is not None else None


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's, not SHA3-256) of ``data``."""
    local = _keccak_local
    if local is None:  # pragma: no cover - depends on the installed pycryptodome
        return _keccak256_pycryptodome(data)
    if type(data) is not bytes:
        data = bytes(data)
    state = local.state
    out = local.out
    if (
        _keccak_lib.keccak_reset(state)
        or _keccak_lib.keccak_absorb(state, data, len(data))
        or _keccak_lib.keccak_digest(state, out, 32, 1)  # 0x01: Keccak padding, not SHA-3's
    ):
        raise RuntimeError("keccak failed")  # pragma: no cover
    digest: bytes = _ffi.buffer(out)[:]
    return digest


# Per hex character: 0x20 where EIP-55 may upper-case it (a-f), and 0x20 where the
# checksum digest's nibble says to (8-f). ASCII a-f XOR 0x20 is A-F.
_HEX_DIGITS = b"0123456789abcdef"
_IS_LETTER = bytes.maketrans(_HEX_DIGITS, bytes(10) + b"\x20" * 6)
_IS_HIGH = bytes.maketrans(_HEX_DIGITS, bytes(8) + b"\x20" * 8)


def to_checksum_address(address20: bytes) -> str:
    """EIP-55 mixed-case hex of a 20-byte address (bytewise integer masks, no loop)."""
    if len(address20) != 20:
        raise ValueError("an address is 20 bytes")
    lower = address20.hex().encode("ascii")
    nibbles = keccak256(lower).hex().encode("ascii")[:40]
    mask = int.from_bytes(lower.translate(_IS_LETTER), "big") & int.from_bytes(
        nibbles.translate(_IS_HIGH), "big"
    )
    return "0x" + (int.from_bytes(lower, "big") ^ mask).to_bytes(40, "big").decode("ascii")


def compress_sec1(uncompressed: bytes) -> bytes:
    """The 33-byte compressed form of a 65-byte 04 || x || y key already known to be valid
    (x with y's parity; no second serialisation by the library)."""
    return bytes((2 | (uncompressed[64] & 1),)) + uncompressed[1:33]


def address_of_uncompressed(uncompressed: bytes) -> str:
    """EIP-55 address of a 65-byte 04 || x || y key: Keccak of x || y, last 20 bytes.

    EIP-55's checksum is by definition a second Keccak (of the address's lowercase hex),
    so it cannot be taken from this first digest.
    """
    return to_checksum_address(keccak256(uncompressed[1:])[-20:])


def address_of(public_key: PublicKey | bytes) -> str:
    """EIP-55 Ethereum address of a public key (33- or 65-byte SEC1, or parsed)."""
    pk = public_key if isinstance(public_key, PublicKey) else parse_public_key(public_key)
    return address_of_uncompressed(pk.format(compressed=False))


# r and s as 32-byte big-endian strings: for strings of one length, bytes order is
# numeric order, so the range checks need no integers.
_ZERO32 = bytes(32)
_N32 = SECP256K1_N.to_bytes(32, "big")
_HALF_N32 = HALF_N.to_bytes(32, "big")


def recovery_id(signature: bytes) -> int:
    """The recovery id (0/1) of a 65-byte r || s || v signature, enforcing our policy.

    v may be 0, 1, 27 or 28; r and s must be in [1, n-1]; s must be at most n/2 (low-S,
    EIP-2) so that a signature cannot be re-shaped into a second valid one.
    """
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


def recover_public_key(digest: bytes, signature: bytes) -> PublicKey:
    """Recover the signer's public key from a 32-byte digest and r || s || v."""
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    recid = recovery_id(signature)
    compact = signature[:64] + bytes((recid,))
    try:
        return PublicKey.from_signature_and_message(compact, digest, hasher=None)
    except (ValueError, TypeError):
        raise InvalidSignature("no public key can be recovered from this signature") from None


def sign_recoverable(private_key: PrivateKey, digest: bytes) -> bytes:
    """Sign a 32-byte digest: r || s || v with v in {0, 1}, always low-S."""
    if len(digest) != 32:
        raise ValueError("digest must be 32 bytes")
    return private_key.sign_recoverable(digest, hasher=None)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def eip191_digest(message: bytes) -> bytes:
    """Keccak-256 of the EIP-191 personal-message encoding of ``message``."""
    prefix = b"\x19Ethereum Signed Message:\n" + str(len(message)).encode("ascii")
    return keccak256(prefix + message)


def e2ee_v1_digest(
    ephemeral_public: bytes,
    host_public: bytes,
    salt: bytes,
    nonce: bytes,
    info: bytes,
    aad: bytes,
) -> bytes:
    """SHA256("E2EEv1|" E "|" H "|" S "|" N "|" I ["|" A]) of PROTOCOL.md section 3.

    E and H are 33-byte compressed keys; the AAD part is present only when non-empty.
    """
    parts = [b"E2EEv1", ephemeral_public, host_public, salt, nonce, info]
    if aad:
        parts.append(aad)
    return hashlib.sha256(b"|".join(parts)).digest()
