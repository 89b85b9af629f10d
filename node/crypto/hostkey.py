"""The node's long-lived secp256k1 host key (``HOST_PRIVATE_KEY``)."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NoReturn

from coincurve import PrivateKey, PublicKey

from node.crypto import secp
from node.crypto.curve import (
    SECP256K1_N,
    address_of,
    ecdh_x,
    eip191_digest,
    sha256,
    sign_recoverable,
)
from node.crypto.errors import HostKeyError
from node.crypto.kdf import hkdf_sha256
from node.crypto.secret import SecretBytes

if TYPE_CHECKING:
    from node.crypto.noise import KeyPair

ENV_VAR = "HOST_PRIVATE_KEY"
_KEY_RE = re.compile(r"0x[0-9a-fA-F]{64}")
_FINGERPRINT_INFO = b"llm-node/v1 fingerprint key"


class HostKey:
    """A host private key held in a wipeable buffer, with its public key and address.

    coincurve keeps its own immutable copy of the scalar inside ``PrivateKey`` for as long
    as this object lives; :meth:`wipe` zeroes our buffer and drops that object.
    """

    __slots__ = (
        "_fingerprint_key",
        "_private",
        "_scalar",
        "address",
        "public_key",
        "public_key_hex",
    )

    def __init__(self, scalar: SecretBytes) -> None:
        value = int.from_bytes(scalar.view(), "big")
        if not 0 < value < SECP256K1_N:
            scalar.wipe()
            raise HostKeyError(
                f"{ENV_VAR} is not a valid secp256k1 private key (must be in [1, n-1])"
            )
        self._scalar = scalar
        # Lives and dies with the host key (made here, wiped by wipe()).
        self._fingerprint_key = SecretBytes.take(hkdf_sha256(scalar.view(), info=_FINGERPRINT_INFO))
        self._private: PrivateKey | None = PrivateKey(scalar.reveal())
        self.public_key: bytes = self._private.public_key.format(compressed=True)
        self.public_key_hex: str = self.public_key.hex()
        self.address: str = address_of(self._private.public_key)

    @classmethod
    def parse(cls, text: str) -> HostKey:
        """Parse ``0x`` + 64 hex digits. Error messages never contain the value."""
        if not text:
            raise HostKeyError(f"{ENV_VAR} is set but empty; unset it to run a plaintext-only node")
        if not text.startswith(("0x", "0X")):
            raise HostKeyError(f"{ENV_VAR} must start with 0x followed by 64 hex digits")
        if len(text) != 66:
            raise HostKeyError(
                f"{ENV_VAR} must be 0x followed by exactly 64 hex digits "
                f"(got {len(text) - 2} characters after 0x)"
            )
        if not _KEY_RE.fullmatch("0x" + text[2:]):
            raise HostKeyError(f"{ENV_VAR} contains characters that are not hex digits")
        return cls(SecretBytes(bytearray.fromhex(text[2:])))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HostKey | None:
        """The host key from the environment; ``None`` (plaintext-only) when unset."""
        env = os.environ if environ is None else environ
        if ENV_VAR not in env:
            return None
        return cls.parse(env[ENV_VAR].strip())

    @classmethod
    def generate(cls, rng: Callable[[int], bytes] = os.urandom) -> HostKey:
        while True:
            candidate = SecretBytes(rng(32))
            if 0 < int.from_bytes(candidate.view(), "big") < SECP256K1_N:
                return cls(candidate)

    def _key(self) -> PrivateKey:
        if self._private is None:
            raise HostKeyError("host key was wiped")
        return self._private

    def ecdh_x(self, peer: PublicKey) -> SecretBytes:
        """Raw ECDH x-coordinate with a peer's point."""
        self._key()
        return ecdh_x(self._scalar.view(), peer)

    def ecdh_x_sec1(self, peer: bytes, *, field: str = "public key") -> tuple[SecretBytes, bytes]:
        """ECDH with a peer's SEC1 encoding (33 or 65 bytes), parsed and checked here:
        ``(x, the peer's compressed form)``; see :func:`node.crypto.secp.ecdh_x`. The
        scalar is read in place from its wipeable buffer."""
        self._key()
        return secp.ecdh_x(self._scalar.live_buffer(), peer, field=field)

    def noise_keypair(self) -> KeyPair:
        """The host key as a Noise static key pair for protocol v2. It borrows the
        scalar buffer: wiping the key pair leaves it alone; :meth:`wipe` zeroes it."""
        from node.crypto.noise import KeyPair

        self._key()
        return KeyPair(self._scalar, self.public_key, owned=False)

    def sign_digest(self, digest: bytes) -> bytes:
        """65-byte r || s || v (v in {0,1}) over a 32-byte digest."""
        return sign_recoverable(self._key(), digest)

    def sign_challenge(self, challenge: bytes) -> bytes:
        """Signature over SHA256(challenge) for ``POST /v1/auth/challenge``."""
        return self.sign_digest(sha256(challenge))

    def sign_personal_message(self, message: bytes) -> bytes:
        """EIP-191 personal-message signature, v in {27, 28} as wallets write it."""
        sig = self.sign_digest(eip191_digest(message))
        return sig[:64] + bytes((sig[64] + 27,))

    def fingerprint(self, data: SecretBytes) -> bytes:
        """A keyed hash of a secret: HMAC-SHA256 under a key derived from the host key
        (HKDF-SHA256, info ``llm-node/v1 fingerprint key``).

        Equal secrets give equal fingerprints on every process with this host key (the
        workers of one node share it), but without the host key a fingerprint cannot be
        checked against guessed secrets. The node keeps fingerprints of accepted session
        keys, never the keys themselves.
        """
        self._key()
        # hmac reads both buffers in place (no copy of either secret is made)
        return hmac.digest(self._fingerprint_key.live_buffer(), data.live_buffer(), "sha256")

    def private_key_hex(self) -> str:
        """The private key as ``0x`` hex. Only ``llm-node keygen`` calls this."""
        return "0x" + self._scalar.reveal().hex()

    def wipe(self) -> None:
        self._scalar.wipe()
        self._fingerprint_key.wipe()
        self._private = None

    @property
    def wiped(self) -> bool:
        return self._private is None

    def __repr__(self) -> str:
        return f"<HostKey address={self.address} private=redacted>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("HostKey cannot be pickled")
