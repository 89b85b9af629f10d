"""secp256k1 points, ECDH x-coordinate, signatures and Ethereum addresses."""

from __future__ import annotations

import hashlib

from coincurve import PrivateKey, PublicKey
from Crypto.Hash import keccak

from node.crypto.errors import InvalidPublicKey, InvalidSignature
from node.crypto.secret import SecretBytes

# Order of the secp256k1 group.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


def parse_public_key(data: bytes | bytearray, *, field: str = "public key") -> PublicKey:
    """Parse a SEC1 point of 33 (compressed) or 65 (uncompressed) bytes and check it is on
    the curve. Hybrid (0x06/0x07) encodings and the point at infinity are refused."""
    if len(data) == 33:
        if data[0] not in (2, 3):
            raise InvalidPublicKey(f"{field}: compressed key must start with 02 or 03")
    elif len(data) == 65:
        if data[0] != 4:
            raise InvalidPublicKey(f"{field}: uncompressed key must start with 04")
    else:
        raise InvalidPublicKey(f"{field}: must be 33 or 65 bytes, got {len(data)}")
    try:
        return PublicKey(bytes(data))
    except (ValueError, TypeError):
        raise InvalidPublicKey(f"{field}: not a point on secp256k1") from None


def ecdh_x(scalar: bytes | bytearray | memoryview, peer: PublicKey) -> SecretBytes:
    """The raw 32-byte x-coordinate of ``scalar * peer`` (no hashing of the point)."""
    point = peer.multiply(bytes(scalar))
    return SecretBytes(point.format(compressed=True)[1:])


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def to_checksum_address(address20: bytes) -> str:
    """EIP-55 mixed-case hex of a 20-byte address."""
    lower = address20.hex()
    digest = keccak256(lower.encode("ascii")).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(lower)
    )


def address_of(public_key: PublicKey | bytes) -> str:
    """EIP-55 Ethereum address of a public key (33- or 65-byte SEC1, or parsed)."""
    pk = public_key if isinstance(public_key, PublicKey) else parse_public_key(public_key)
    return to_checksum_address(keccak256(pk.format(compressed=False)[1:])[-20:])


def parse_recoverable_signature(signature: bytes) -> tuple[int, int, int]:
    """Split a 65-byte r || s || v signature, enforcing our policy.

    v may be 0, 1, 27 or 28; r and s must be in [1, n-1]; s must be at most n/2 (low-S,
    EIP-2) so that a signature cannot be re-shaped into a second valid one.
    Returns (r, s, recovery id 0/1).
    """
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes (r||s||v), got {len(signature)}")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v in (27, 28):
        v -= 27
    elif v not in (0, 1):
        raise InvalidSignature("signature v must be 0, 1, 27 or 28")
    if not 0 < r < SECP256K1_N:
        raise InvalidSignature("signature r is out of range")
    if not 0 < s < SECP256K1_N:
        raise InvalidSignature("signature s is out of range")
    if s > HALF_N:
        raise InvalidSignature("signature s is in the upper half of the order (high-S)")
    return r, s, v


def recover_public_key(digest: bytes, signature: bytes) -> PublicKey:
    """Recover the signer's public key from a 32-byte digest and r || s || v."""
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    r, s, recid = parse_recoverable_signature(signature)
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((recid,))
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
