"""Build ``encrypted_session_init`` payloads from arbitrary plaintext under the real key
schedule, so tests can reach every branch of session-init validation.

The digest is written out here from PROTOCOL.md section 3 rather than imported, so it also
checks the node's own ``e2ee_v1_digest``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from coincurve import PrivateKey, PublicKey

from node.crypto import HostKey, SecretBytes, aead
from node.crypto.kdf import ZERO_SALT, hkdf_sha256

HOST = HostKey(SecretBytes(bytes.fromhex("7e" * 32)))
CLIENT = PrivateKey(bytes.fromhex("c1" * 32))
OTHER = PrivateKey(bytes.fromhex("0f" * 32))
EPH = PrivateKey(bytes.fromhex("e5" * 32))
NONCE = bytes(range(100, 124))
SESSION_KEY = bytes(range(32))


DELETE: Any = object()


def session(**overrides: Any) -> dict[str, Any]:
    """A valid session-data object; ``overrides`` replace fields (``DELETE`` drops one)."""
    data: dict[str, Any] = {
        "sessionKey": SESSION_KEY.hex(),
        "jobId": "42",
        "modelName": "tiny-model",
        "pricePerToken": 1000,
        "recoveryPublicKey": "0x" + CLIENT.public_key.format(compressed=True).hex(),
    }
    for name, value in overrides.items():
        if value is DELETE:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def e2ee_digest(eph: bytes, host: bytes, nonce: bytes, aad: bytes) -> bytes:
    preimage = b"E2EEv1|" + eph + b"|" + host + b"|" + ZERO_SALT + b"|" + nonce + b"|"
    if aad:
        preimage += b"|" + aad
    return hashlib.sha256(preimage).digest()


@dataclass
class Frame:
    plaintext: bytes | dict[str, Any] = field(default_factory=session)
    host_public: bytes = HOST.public_key
    eph: PrivateKey = EPH
    nonce: bytes = NONCE
    aad: bytes = b""
    signer: PrivateKey = CLIENT
    uncompressed_eph: bool = False
    # What the signature covers, when a test wants it to differ from the frame:
    signed_aad: bytes | None = None
    signed_host: bytes | None = None
    signed_eph_uncompressed: bool = False

    def plaintext_bytes(self) -> bytes:
        if isinstance(self.plaintext, bytes):
            return self.plaintext
        return json.dumps(self.plaintext).encode("utf-8")

    def init_key(self) -> bytes:
        point = PublicKey(self.host_public).multiply(self.eph.secret)
        return bytes(hkdf_sha256(point.format(compressed=True)[1:], salt=b"", info=b""))

    def signature(self) -> bytes:
        host = self.host_public if self.signed_host is None else self.signed_host
        digest = e2ee_digest(
            self.eph.public_key.format(compressed=not self.signed_eph_uncompressed),
            PublicKey(host).format(compressed=True),
            self.nonce,
            self.aad if self.signed_aad is None else self.signed_aad,
        )
        return self.signer.sign_recoverable(digest, hasher=None)

    def payload(self) -> dict[str, Any]:
        ciphertext = aead.seal(self.init_key(), self.nonce, self.plaintext_bytes(), self.aad)
        eph = self.eph.public_key.format(compressed=not self.uncompressed_eph)
        return {
            "ephPubHex": eph.hex(),
            "ciphertextHex": ciphertext.hex(),
            "nonceHex": self.nonce.hex(),
            "signatureHex": self.signature().hex(),
            "aadHex": self.aad.hex(),
            "saltHex": ZERO_SALT.hex(),
            "info": "",
        }
