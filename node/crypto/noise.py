"""A small Noise Protocol Framework engine (revision 34), pure and synchronous.

What it covers: the handshake patterns NN, NK and XK; ChaChaPoly (ChaCha20-Poly1305,
IETF 96-bit nonce = 4 zero bytes || LE64(n)) and SHA-256 with Noise's HKDF; DH functions
pluggable, with the public-key length and the DH output length kept apart so that
secp256k1 as BOLT 8 uses it (33-byte compressed keys, 32-byte output = SHA-256 of the
compressed shared point) fits next to X25519 (32 and 32). It also has Noise's
``Rekey()`` and BOLT 8's transport key rotation (``ck, k = HKDF(ck, k)`` and ``n = 0``
once a key has used ``rotate_every`` nonces), which protocol v2 uses per direction.

Every secret this module holds (chaining key, cipher keys, DH outputs, ephemeral private
keys) sits in a :class:`SecretBytes` and is zeroed by the ``wipe()`` methods; nothing
prints its content. The handshake hash ``h`` is not secret (an observer can compute it
from the messages), so it is plain ``bytes``.

Checked against the BOLT 8 Appendix A vectors and the cacophony and snow vectors for
``Noise_{NN,NK,XK}_25519_ChaChaPoly_SHA256`` (tests/crypto/test_noise_vectors.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NoReturn, Protocol

from coincurve import PublicKey
from coincurve._libsecp256k1 import ffi as _k1_ffi
from coincurve._libsecp256k1 import lib as _k1_lib
from coincurve.context import GLOBAL_CONTEXT as _K1_CONTEXT
from nacl import bindings as _nacl
from nacl._sodium import ffi as _na_ffi
from nacl._sodium import lib as _na_lib

from node.crypto.curve import SECP256K1_N, parse_public_key
from node.crypto.errors import (
    CryptoError,
    DecryptionFailed,
    ErrorCode,
    InvalidCiphertext,
    InvalidPublicKey,
)
from node.crypto.secret import SecretBytes

HASHLEN: Final = 32
KEYLEN: Final = 32
TAGLEN: Final = 16
MAX_MESSAGE_LEN: Final = 65535  # Noise's limit for one handshake or transport message
MAX_NONCE: Final = 2**64 - 1  # reserved by Noise: never used to encrypt a message
BOLT8_ROTATE_EVERY: Final = 1000

Rng = Callable[[int], bytes]


# ------------------------------------------------------------------------- errors


class NoiseError(CryptoError):
    """A handshake or transport message that cannot be processed."""

    code = ErrorCode.INVALID_PAYLOAD


class NoiseMessageLengthError(NoiseError):
    """A message shorter than its pattern needs, or longer than 65535 bytes."""


class NoiseStateError(NoiseError):
    """The engine was used out of order (a programming error, or a state that failed)."""

    code = ErrorCode.INTERNAL_ERROR


class NonceExhausted(NoiseError):
    """A cipher key reached the reserved nonce 2^64-1."""

    code = ErrorCode.INTERNAL_ERROR


# ----------------------------------------------------------------- ChaChaPoly, HKDF


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _cbuf(data: bytes | bytearray | memoryview) -> Any:
    return data if type(data) is bytes else _na_ffi.from_buffer(data)


def chachapoly_encrypt(
    key: SecretBytes, n: int, ad: bytes | bytearray | memoryview, plaintext: bytes | bytearray
) -> bytes:
    """ENCRYPT(k, n, ad, plaintext) of the Noise ChaChaPoly cipher functions."""
    raw = key.live_buffer()
    mlen = len(plaintext)
    out = bytearray(mlen + TAGLEN)
    _na_lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        _na_ffi.from_buffer(out),
        _na_ffi.NULL,
        _cbuf(plaintext),
        mlen,
        _cbuf(ad),
        len(ad),
        _na_ffi.NULL,
        _nonce(n),
        _na_ffi.from_buffer(raw),
    )
    return bytes(out)


def chachapoly_decrypt(
    key: SecretBytes,
    n: int,
    ad: bytes | bytearray | memoryview,
    ciphertext: bytes | bytearray | memoryview,
) -> bytearray:
    """DECRYPT(k, n, ad, ciphertext); the plaintext comes back in a buffer a caller can
    wipe. Raises :class:`DecryptionFailed` when the tag does not verify."""
    clen = len(ciphertext)
    if clen < TAGLEN:
        raise InvalidCiphertext("ciphertext is shorter than the 16-byte tag")
    raw = key.live_buffer()
    out = bytearray(clen - TAGLEN)
    rc = _na_lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        _na_ffi.from_buffer(out, require_writable=True) if out else _na_ffi.NULL,
        _na_ffi.NULL,
        _na_ffi.NULL,
        _cbuf(ciphertext),
        clen,
        _cbuf(ad),
        len(ad),
        _nonce(n),
        _na_ffi.from_buffer(raw),
    )
    if rc != 0:
        raise DecryptionFailed("authentication failed: wrong key, nonce or tampered data")
    return out


def hkdf2(
    chaining_key: SecretBytes, ikm: bytes | bytearray | memoryview
) -> tuple[SecretBytes, SecretBytes]:
    """Noise ``HKDF(ck, ikm, 2)`` with HMAC-SHA256 (= RFC 5869, salt ck, empty info)."""
    temp = bytearray(hmac.digest(chaining_key.live_buffer(), ikm, "sha256"))
    out1 = bytearray(hmac.digest(temp, b"\x01", "sha256"))
    mac = hmac.new(temp, out1, "sha256")
    mac.update(b"\x02")
    out2 = bytearray(mac.digest())
    temp[:] = bytes(HASHLEN)
    return SecretBytes.take(out1), SecretBytes.take(out2)


# -------------------------------------------------------------------- DH functions


class KeyPair:
    """A DH key pair. ``owned=False`` borrows a private key that someone else wipes
    (the node's host key): :meth:`wipe` then leaves it alone."""

    __slots__ = ("_owned", "private", "public")

    def __init__(self, private: SecretBytes, public: bytes, *, owned: bool = True) -> None:
        self.private = private
        self.public = public
        self._owned = owned

    def wipe(self) -> None:
        if self._owned:
            self.private.wipe()

    def __repr__(self) -> str:
        return f"<KeyPair public={self.public.hex()} private=redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyPair cannot be pickled")


class DHFunctions(Protocol):
    """The DH half of a Noise cipher suite."""

    name: str  # as in the protocol name: "25519", "secp256k1"
    public_key_len: int  # bytes of a public key on the wire
    dh_len: int  # bytes of a DH output

    def generate_keypair(self, rng: Rng = os.urandom) -> KeyPair: ...

    def keypair(self, private: SecretBytes) -> KeyPair: ...

    def parse_public(self, data: bytes) -> Any:
        """Check a received public key; returns the form :meth:`dh` takes."""
        ...

    def dh(self, keypair: KeyPair, public: Any) -> SecretBytes:
        """DH with a public key as :meth:`parse_public` returned it."""
        ...


class Secp256k1DH:
    """secp256k1 as BOLT 8 defines its ECDH: SHA-256 of the compressed shared point.

    Public keys are 33-byte SEC1 compressed points (02/03 prefix); the output is 32 bytes.
    libsecp256k1's default ECDH hash is exactly this construction.
    """

    name = "secp256k1"
    public_key_len = 33
    dh_len = 32

    def generate_keypair(self, rng: Rng = os.urandom) -> KeyPair:
        while True:
            candidate = bytearray(rng(32))
            if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
                return self.keypair(SecretBytes.take(candidate))
            SecretBytes.take(candidate).wipe()

    def keypair(self, private: SecretBytes) -> KeyPair:
        if not 0 < int.from_bytes(private.view(), "big") < SECP256K1_N:
            raise NoiseError("secp256k1 private key out of range")
        point = PublicKey.from_valid_secret(private.reveal())
        return KeyPair(private, point.format(compressed=True))

    def parse_public(self, data: bytes) -> PublicKey:
        if len(data) != 33:
            raise InvalidPublicKey("public key must be 33 bytes (SEC1 compressed)")
        return parse_public_key(data)

    def dh(self, keypair: KeyPair, public: PublicKey) -> SecretBytes:
        out = bytearray(32)
        rc = _k1_lib.secp256k1_ecdh(
            _K1_CONTEXT.ctx,
            _k1_ffi.from_buffer(out),
            public.public_key,
            _k1_ffi.from_buffer(keypair.private.live_buffer()),
            _k1_ffi.NULL,
            _k1_ffi.NULL,
        )
        if rc != 1:  # pragma: no cover - a valid scalar and point always give a result
            raise NoiseError("secp256k1 ECDH failed")
        return SecretBytes.take(out)


class X25519DH:
    """Curve25519 (RFC 7748) through libsodium; 32-byte keys and outputs."""

    name = "25519"
    public_key_len = 32
    dh_len = 32

    def generate_keypair(self, rng: Rng = os.urandom) -> KeyPair:
        return self.keypair(SecretBytes(rng(32)))

    def keypair(self, private: SecretBytes) -> KeyPair:
        if len(private) != 32:
            raise NoiseError("X25519 private key must be 32 bytes")
        return KeyPair(private, _nacl.crypto_scalarmult_base(private.reveal()))

    def parse_public(self, data: bytes) -> bytes:
        if len(data) != 32:
            raise InvalidPublicKey("X25519 public key must be 32 bytes")
        return bytes(data)

    def dh(self, keypair: KeyPair, public: bytes) -> SecretBytes:
        try:
            return SecretBytes(_nacl.crypto_scalarmult(keypair.private.reveal(), public))
        except Exception:  # libsodium refuses low-order points (all-zero output)
            raise InvalidPublicKey("X25519 public key gives an all-zero shared secret") from None


SECP256K1: Final = Secp256k1DH()
X25519: Final = X25519DH()


# -------------------------------------------------------------------- CipherState


class CipherState:
    """Noise CipherState: a key (or none) and a 64-bit counter nonce."""

    __slots__ = ("k", "n")

    def __init__(self, k: SecretBytes | None = None, n: int = 0) -> None:
        self.k = k
        self.n = n

    def initialize_key(self, k: SecretBytes | None) -> None:
        if self.k is not None:
            self.k.wipe()
        self.k = k
        self.n = 0

    def has_key(self) -> bool:
        return self.k is not None

    def _next_nonce(self) -> int:
        if self.n >= MAX_NONCE:
            raise NonceExhausted("this key has used every nonce")
        return self.n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | bytearray) -> bytes:
        if self.k is None:
            return bytes(plaintext)
        out = chachapoly_encrypt(self.k, self._next_nonce(), ad, plaintext)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        """The nonce advances only when the tag verifies (Noise section 5.1)."""
        if self.k is None:
            return bytearray(ciphertext)
        out = chachapoly_decrypt(self.k, self._next_nonce(), ad, ciphertext)
        self.n += 1
        return out

    def rekey(self) -> None:
        """Noise ``Rekey()``: k = first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zeros)."""
        if self.k is None:
            raise NoiseStateError("no key to rekey")
        fresh = bytearray(chachapoly_encrypt(self.k, MAX_NONCE, b"", bytes(KEYLEN))[:KEYLEN])
        self.k.wipe()
        self.k = SecretBytes.take(fresh)

    def wipe(self) -> None:
        if self.k is not None:
            self.k.wipe()

    @property
    def wiped(self) -> bool:
        return self.k is None or self.k.wiped

    def __repr__(self) -> str:
        return f"<CipherState n={self.n} key={'set' if self.k is not None else 'empty'}>"


# ---------------------------------------------------------------- TransportCipher


class TransportCipher:
    """One direction of a transport: a CipherState plus BOLT 8 key rotation.

    After each message the nonce grows by one; when it reaches ``rotate_every``,
    ``ck, k = HKDF(ck, k)`` and the nonce starts again at 0. ``rotate_every=None`` is
    plain Noise (no rotation). Both directions start from the final handshake ``ck``.
    """

    __slots__ = ("_cipher", "ck", "rotate_every", "rotations")

    def __init__(self, k: SecretBytes, ck: SecretBytes, rotate_every: int | None) -> None:
        if rotate_every is not None and not 0 < rotate_every < MAX_NONCE:
            raise ValueError("rotate_every must be positive")
        self._cipher = CipherState(k)
        self.ck = ck
        self.rotate_every = rotate_every
        self.rotations = 0

    @property
    def n(self) -> int:
        return self._cipher.n

    def _after_use(self) -> None:
        if self.rotate_every is not None and self._cipher.n >= self.rotate_every:
            assert self._cipher.k is not None
            ck, k = hkdf2(self.ck, self._cipher.k.live_buffer())
            self.ck.wipe()
            self.ck = ck
            self._cipher.initialize_key(k)
            self.rotations += 1

    def encrypt(self, plaintext: bytes | bytearray, ad: bytes = b"") -> bytes:
        cipher = self._cipher
        k, n = cipher.k, cipher.n
        assert k is not None  # a TransportCipher is always made with a key
        if self.rotate_every is None and len(plaintext) + TAGLEN > MAX_MESSAGE_LEN:
            raise NoiseMessageLengthError("Noise transport messages are at most 65535 bytes")
        if n >= MAX_NONCE:
            raise NonceExhausted("this key has used every nonce")
        out = chachapoly_encrypt(k, n, ad, plaintext)
        cipher.n = n + 1
        if self.rotate_every is not None and n + 1 >= self.rotate_every:
            self._after_use()
        return out

    def decrypt(self, ciphertext: bytes | bytearray, ad: bytes = b"") -> bytearray:
        out = self._cipher.decrypt_with_ad(ad, ciphertext)
        self._after_use()
        return out

    def wipe(self) -> None:
        self._cipher.wipe()
        self.ck.wipe()

    @property
    def wiped(self) -> bool:
        return self._cipher.wiped and self.ck.wiped

    def secrets_for_tests(self) -> tuple[SecretBytes, SecretBytes]:
        """The live key and chaining-key buffers, so tests can check they were zeroed."""
        assert self._cipher.k is not None
        return self._cipher.k, self.ck

    def __repr__(self) -> str:
        return f"<TransportCipher n={self.n} rotations={self.rotations} keys=redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("TransportCipher cannot be pickled")


# ------------------------------------------------------------------ SymmetricState


class SymmetricState:
    """Noise SymmetricState with SHA-256 and ChaChaPoly."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self, protocol_name: bytes, *, h: bytes | None = None) -> None:
        ck = _name_hash(protocol_name)
        self.h = ck if h is None else h
        self.ck = SecretBytes(ck)
        self.cipher = CipherState()

    def mix_key(self, ikm: SecretBytes) -> None:
        ck, temp_k = hkdf2(self.ck, ikm.live_buffer())
        ikm.wipe()
        self.ck.wipe()
        self.ck = ck
        self.cipher.initialize_key(temp_k)  # HASHLEN == 32: no truncation needed

    def mix_hash(self, data: bytes | bytearray | memoryview) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes | bytearray) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[SecretBytes, SecretBytes]:
        """The two transport keys (initiator->responder first)."""
        return hkdf2(self.ck, b"")

    def wipe(self) -> None:
        self.ck.wipe()
        self.cipher.wipe()


def _name_hash(protocol_name: bytes) -> bytes:
    if len(protocol_name) <= HASHLEN:
        return protocol_name + bytes(HASHLEN - len(protocol_name))
    return hashlib.sha256(protocol_name).digest()


@functools.lru_cache(maxsize=64)
def _initial_h(protocol_name: bytes, prologue: bytes, pre_keys: tuple[bytes, ...]) -> bytes:
    """``h`` after InitializeSymmetric, the prologue and the pre-message public keys.

    Every input is public and the result is the same for every handshake of one node
    (its host key is the only pre-message key), so it is computed once and cached; the
    initial ``ck`` is the protocol name's hash and holds nothing secret either.
    """
    h = _name_hash(protocol_name)
    for data in (prologue, *pre_keys):
        h = hashlib.sha256(h + data).digest()
    return h


# ------------------------------------------------------------------ HandshakeState

# (pre-message tokens of the initiator, of the responder, message patterns)
PATTERNS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]]] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "NK": ((), ("s",), (("e", "es"), ("e", "ee"))),
    "XK": ((), ("s",), (("e", "es"), ("e", "ee"), ("s", "se"))),
}


class HandshakeState:
    """Noise HandshakeState for the patterns in :data:`PATTERNS` (no PSK modifiers).

    ``s`` is this side's static key pair (the caller's: never wiped here), ``rs`` the
    peer's static public key (required when the pattern's pre-message has it). ``e``
    injects the ephemeral key pair (tests, vectors, or a pool of fresh keys; it is wiped
    after use). Any failure leaves the state unusable and wiped.
    """

    def __init__(
        self,
        pattern: str,
        *,
        initiator: bool,
        dh: DHFunctions,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        rs: bytes | None = None,
        e: KeyPair | None = None,
        rng: Rng = os.urandom,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unsupported handshake pattern {pattern!r}")
        pre_i, pre_r, messages = PATTERNS[pattern]
        self.protocol_name = f"Noise_{pattern}_{dh.name}_ChaChaPoly_SHA256"
        self.initiator = initiator
        self.dh = dh
        self.s = s
        self.e = e
        self.rs = rs
        self.re: bytes | None = None
        self._rs_key: Any = dh.parse_public(rs) if rs is not None else None
        self._re_key: Any = None
        self._rng = rng
        self._messages = list(messages)
        self._turn = 0  # index of the next message
        self._failed = False
        self._result: tuple[SecretBytes, SecretBytes] | None = None
        self._final_ck: SecretBytes | None = None
        pre_keys: list[bytes] = []
        for owner_is_initiator, tokens in ((True, pre_i), (False, pre_r)):
            for step in tokens:
                assert step == "s"
                local = owner_is_initiator == initiator
                key = (s.public if s is not None else None) if local else rs
                if key is None:
                    raise ValueError("the pattern's pre-message needs a static public key")
                pre_keys.append(bytes(key))
        name = self.protocol_name.encode("ascii")
        self.symmetric = SymmetricState(name, h=_initial_h(name, bytes(prologue), tuple(pre_keys)))

    # -------------------------------------------------------------- queries

    @property
    def finished(self) -> bool:
        """True once the last handshake message was written or read successfully."""
        return self._turn == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    def my_turn_to_write(self) -> bool:
        return (self._turn % 2 == 0) == self.initiator

    # -------------------------------------------------------------- helpers

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise NoiseStateError("this handshake failed and cannot be used")
        if self._turn >= len(self._messages):
            raise NoiseStateError("the handshake is already complete")
        if self.my_turn_to_write() != writing:
            raise NoiseStateError(
                "it is not this side's turn to " + ("write" if writing else "read")
            )

    def _dh(self, step: str) -> SecretBytes:
        # ee, es, se, ss: the first letter is the initiator's key, the second the responder's
        mine, theirs = (step[0], step[1]) if self.initiator else (step[1], step[0])
        local = self.e if mine == "e" else self.s
        remote = self._re_key if theirs == "e" else self._rs_key
        if local is None or remote is None:
            raise NoiseStateError(f"step {step} needs a key this handshake does not have")
        return self.dh.dh(local, remote)

    def _finish_if_done(self) -> None:
        self._turn += 1
        if self._turn == len(self._messages):
            self._result = self.symmetric.split()
            self._final_ck = SecretBytes(self.symmetric.ck.view())
            self.symmetric.wipe()
            if self.e is not None:
                self.e.wipe()

    def _fail(self) -> None:
        self._failed = True
        self.wipe()

    # -------------------------------------------------------------- messages

    def write_message(self, payload: bytes | bytearray = b"") -> bytes:
        self._check_turn(writing=True)
        try:
            out = bytearray()
            for step in self._messages[self._turn]:
                if step == "e":
                    if self.e is None:
                        self.e = self.dh.generate_keypair(self._rng)
                    out += self.e.public
                    self.symmetric.mix_hash(self.e.public)
                elif step == "s":
                    if self.s is None:
                        raise NoiseStateError("this pattern needs a local static key")
                    out += self.symmetric.encrypt_and_hash(self.s.public)
                else:
                    self.symmetric.mix_key(self._dh(step))
            out += self.symmetric.encrypt_and_hash(payload)
            if len(out) > MAX_MESSAGE_LEN:
                raise NoiseMessageLengthError("a Noise message is at most 65535 bytes")
        except BaseException:
            self._fail()
            raise
        self._finish_if_done()
        return bytes(out)

    def read_message(self, message: bytes | bytearray) -> bytearray:
        """Process one peer message; returns its decrypted payload."""
        self._check_turn(writing=False)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise NoiseMessageLengthError("a Noise message is at most 65535 bytes")
            view = memoryview(message)
            pos = 0
            klen = self.dh.public_key_len
            for step in self._messages[self._turn]:
                if step == "e":
                    if len(view) - pos < klen:
                        raise NoiseMessageLengthError("handshake message too short")
                    re = bytes(view[pos : pos + klen])
                    pos += klen
                    self._re_key = self.dh.parse_public(re)
                    self.re = re
                    self.symmetric.mix_hash(re)
                elif step == "s":
                    need = klen + (TAGLEN if self.symmetric.cipher.has_key() else 0)
                    if len(view) - pos < need:
                        raise NoiseMessageLengthError("handshake message too short")
                    rs = bytes(self.symmetric.decrypt_and_hash(view[pos : pos + need]))
                    pos += need
                    self._rs_key = self.dh.parse_public(rs)
                    self.rs = rs
                else:
                    self.symmetric.mix_key(self._dh(step))
            rest = view[pos:]
            if self.symmetric.cipher.has_key() and len(rest) < TAGLEN:
                raise NoiseMessageLengthError("handshake message too short")
            payload = self.symmetric.decrypt_and_hash(rest)
        except BaseException:
            self._fail()
            raise
        self._finish_if_done()
        return payload

    # -------------------------------------------------------------- results

    def split(self) -> tuple[CipherState, CipherState]:
        """Noise ``Split()``: (initiator->responder, responder->initiator) CipherStates.
        May be taken once; the handshake keeps nothing afterwards."""
        c1, c2 = self._take_result()
        assert self._final_ck is not None
        self._final_ck.wipe()
        return CipherState(c1), CipherState(c2)

    def transport(
        self, rotate_every: int | None = BOLT8_ROTATE_EVERY
    ) -> tuple[TransportCipher, TransportCipher]:
        """(send, receive) ciphers for this side, each with its own copy of the final
        ``ck`` for BOLT 8 rotation. May be taken once."""
        c1, c2 = self._take_result()
        assert self._final_ck is not None
        ck_a = self._final_ck
        ck_b = SecretBytes(ck_a.view())
        self._final_ck = None
        to_responder = TransportCipher(c1, ck_a, rotate_every)
        to_initiator = TransportCipher(c2, ck_b, rotate_every)
        if self.initiator:
            return to_responder, to_initiator
        return to_initiator, to_responder

    def _take_result(self) -> tuple[SecretBytes, SecretBytes]:
        if self._result is None:
            raise NoiseStateError("the handshake is not complete (or its keys were taken)")
        result, self._result = self._result, None
        self._failed = True  # nothing more to do with this state
        return result

    def wipe(self) -> None:
        """Zero everything secret this handshake holds (safe to call twice): the
        chaining key, the cipher key, the ephemeral key pair (generated here or injected,
        it serves one handshake) and untaken transport keys. The static key pair ``s``
        belongs to the caller, who may use it again, and is left alone."""
        self.symmetric.wipe()
        if self.e is not None:
            self.e.wipe()
        if self._result is not None:
            for key in self._result:
                key.wipe()
        if self._final_ck is not None:
            self._final_ck.wipe()

    def __repr__(self) -> str:
        return f"<HandshakeState {self.protocol_name} turn={self._turn} keys=redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("HandshakeState cannot be pickled")


# ------------------------------------------------------------------ ephemeral key pool


class EphemeralPool:
    """A bounded stock of fresh ephemeral key pairs, made before the handshakes need them.

    Generating the responder's ephemeral key is one scalar multiplication; a node that
    keeps a few ready (filled off the handshake path, e.g. in a worker thread) saves it on
    each handshake. :meth:`take` removes the key it returns, so no key is handed out twice;
    the handshake that gets it owns it and wipes it (``HandshakeState`` does). Keys wait
    here in :class:`~node.crypto.secret.SecretBytes`; :meth:`wipe` zeroes every one still
    held and closes the pool for good (:meth:`take` then returns None, :meth:`fill` adds
    nothing). :meth:`fill` may run in another thread than :meth:`take`: a lock guards
    the stock, and key generation happens outside it.
    """

    __slots__ = ("_closed", "_dh", "_keys", "_lock", "_rng", "size")

    def __init__(self, size: int, *, dh: DHFunctions = SECP256K1, rng: Rng = os.urandom) -> None:
        if size < 1:
            raise ValueError("an ephemeral pool holds at least one key")
        self.size = size
        self._dh = dh
        self._rng = rng
        self._keys: deque[KeyPair] = deque()
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def missing(self) -> int:
        """How many keys :meth:`fill` would add now."""
        return 0 if self._closed else self.size - len(self._keys)

    def take(self) -> KeyPair | None:
        """A fresh key pair, now the caller's to use once and wipe; None when empty."""
        with self._lock:
            return self._keys.popleft() if self._keys else None

    def fill(self, max_new: int | None = None) -> int:
        """Generate keys until the pool is full (or ``max_new`` were added); returns how
        many were added. A key that finds the pool full or closed is wiped at once."""
        added = 0
        while (max_new is None or added < max_new) and self.missing > 0:
            key = self._dh.generate_keypair(self._rng)
            with self._lock:
                if not self._closed and len(self._keys) < self.size:
                    self._keys.append(key)
                    added += 1
                    continue
            key.wipe()
        return added

    def wipe(self) -> None:
        """Zero every pooled key and close the pool (safe to call twice)."""
        with self._lock:
            self._closed = True
            keys, self._keys = self._keys, deque()
        for key in keys:
            key.wipe()

    def __repr__(self) -> str:
        return f"<EphemeralPool {len(self._keys)}/{self.size} keys=redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("EphemeralPool cannot be pickled")
