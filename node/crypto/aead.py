"""XChaCha20-Poly1305 (IETF construction), through libsodium.

We call libsodium's ``crypto_aead_xchacha20poly1305_ietf_*`` through the cffi handle that
PyNaCl ships rather than its Python wrappers: the key can then be passed straight from a
wipeable ``bytearray`` without an immutable copy, and each call costs about half as much.
"""

from __future__ import annotations

from typing import Any

from nacl._sodium import ffi, lib  # PyNaCl's own cffi binding to libsodium

from node.crypto.errors import DecryptionFailed, InvalidCiphertext, InvalidKeySize, InvalidNonceSize
from node.crypto.secret import SecretBytes

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16

_Key = SecretBytes | bytes | bytearray
_Buf = bytes | bytearray | memoryview


def _key_buffer(key: _Key) -> Any:
    """The key as a cffi argument; a SecretBytes' live bytearray is passed without a copy."""
    raw: bytes | bytearray = key.live_buffer() if isinstance(key, SecretBytes) else key
    if len(raw) != KEY_SIZE:
        raise InvalidKeySize(f"AEAD key must be {KEY_SIZE} bytes")
    return raw if type(raw) is bytes else ffi.from_buffer(raw)


def _arg(data: _Buf) -> Any:
    """cffi takes ``bytes`` for a ``const unsigned char *`` as it is; others need a view."""
    return data if type(data) is bytes else ffi.from_buffer(data)


def _check_nonce(nonce: _Buf) -> None:
    if len(nonce) != NONCE_SIZE:
        raise InvalidNonceSize(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


def seal(key: _Key, nonce: _Buf, plaintext: _Buf, aad: _Buf = b"") -> bytes:
    """Encrypt and authenticate; returns ciphertext || 16-byte tag."""
    k = _key_buffer(key)
    _check_nonce(nonce)
    mlen = len(plaintext)
    out = bytearray(mlen + TAG_SIZE)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out),
        ffi.NULL,
        _arg(plaintext),
        mlen,
        _arg(aad),
        len(aad),
        ffi.NULL,
        _arg(nonce),
        k,
    )
    if rc != 0:  # pragma: no cover - libsodium encrypt cannot fail for valid sizes
        raise InvalidKeySize("encryption failed")
    return bytes(out)


def _open_into(key: _Key, nonce: _Buf, ciphertext: _Buf, aad: _Buf) -> bytearray:
    k = _key_buffer(key)
    _check_nonce(nonce)
    clen = len(ciphertext)
    if clen < TAG_SIZE:
        raise InvalidCiphertext(f"ciphertext must be at least {TAG_SIZE} bytes (the tag)")
    out = bytearray(clen - TAG_SIZE)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ffi.from_buffer(out, require_writable=True) if out else ffi.NULL,
        ffi.NULL,
        ffi.NULL,
        _arg(ciphertext),
        clen,
        _arg(aad),
        len(aad),
        _arg(nonce),
        k,
    )
    if rc != 0:
        raise DecryptionFailed("decryption failed: wrong key, nonce, AAD or tampered data")
    return out


def open(key: _Key, nonce: _Buf, ciphertext: _Buf, aad: _Buf = b"") -> bytes:
    """Verify and decrypt; raises :class:`DecryptionFailed` on any mismatch."""
    return bytes(_open_into(key, nonce, ciphertext, aad))


def open_secret(key: _Key, nonce: _Buf, ciphertext: _Buf, aad: _Buf = b"") -> SecretBytes:
    """Like :func:`open` but the plaintext lands in a wipeable buffer."""
    return SecretBytes.take(_open_into(key, nonce, ciphertext, aad))
