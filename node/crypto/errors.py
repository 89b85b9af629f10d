"""The one error hierarchy of the node.

Every class carries the wire code of PROTOCOL.md section 6 in ``code``; the server turns
any :class:`NodeError` into one ``error`` frame in one place. Messages are written for a
person and never contain key material, plaintext or the rejected input itself.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every wire error code the node may send (PROTOCOL.md section 6)."""

    INVALID_MESSAGE = "INVALID_MESSAGE"
    MISSING_PAYLOAD = "MISSING_PAYLOAD"
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    INVALID_HEX_ENCODING = "INVALID_HEX_ENCODING"
    INVALID_NONCE_SIZE = "INVALID_NONCE_SIZE"
    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    INVALID_SIGNATURE = "INVALID_SIGNATURE"
    INVALID_SESSION_DATA = "INVALID_SESSION_DATA"
    INVALID_AAD = "INVALID_AAD"
    REPLAY_DETECTED = "REPLAY_DETECTED"
    SESSION_AUTH_DENIED = "SESSION_AUTH_DENIED"
    SESSION_KEY_NOT_FOUND = "SESSION_KEY_NOT_FOUND"
    MISSING_SESSION_ID = "MISSING_SESSION_ID"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    ENCRYPTION_NOT_SUPPORTED = "ENCRYPTION_NOT_SUPPORTED"
    ENCRYPTION_REQUIRED = "ENCRYPTION_REQUIRED"
    MIXED_MODE_REJECTED = "MIXED_MODE_REJECTED"
    REQUEST_IN_PROGRESS = "REQUEST_IN_PROGRESS"
    UNSUPPORTED_ACTION = "UNSUPPORTED_ACTION"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    TOKEN_LIMIT_EXCEEDED = "TOKEN_LIMIT_EXCEEDED"  # noqa: S105 (a wire code, not a secret)
    INFERENCE_FAILED = "INFERENCE_FAILED"
    RATE_LIMITED = "RATE_LIMITED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class NodeError(Exception):
    """Base class: an error with a wire code and a safe, human-readable message."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            # An instance may narrow the class default (e.g. a ProtocolError raised
            # for one specific code); the class attribute stays the documented default.
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r})"


class CryptoError(NodeError):
    """A cryptographic check failed."""


class InvalidHexEncoding(CryptoError):
    code = ErrorCode.INVALID_HEX_ENCODING


class InvalidNonceSize(CryptoError):
    code = ErrorCode.INVALID_NONCE_SIZE


class InvalidKeySize(CryptoError):
    """A symmetric key of the wrong size reached the AEAD (a programming error)."""

    code = ErrorCode.INTERNAL_ERROR


class InvalidPublicKey(CryptoError):
    """Bytes that are not a valid secp256k1 point in SEC1 form."""

    code = ErrorCode.INVALID_PAYLOAD


class InvalidCiphertext(CryptoError):
    """Ciphertext too short to hold the 16-byte tag."""

    code = ErrorCode.INVALID_PAYLOAD


class DecryptionFailed(CryptoError):
    code = ErrorCode.DECRYPTION_FAILED


class InvalidSignature(CryptoError):
    code = ErrorCode.INVALID_SIGNATURE


class InvalidSessionData(CryptoError):
    code = ErrorCode.INVALID_SESSION_DATA


class InvalidPayload(CryptoError):
    code = ErrorCode.INVALID_PAYLOAD


class MissingPayload(CryptoError):
    code = ErrorCode.MISSING_PAYLOAD


class StorageUnavailable(NodeError):
    """The node cannot write what it must record (the init replay cache, or the usage
    ledger under ``--on-ledger-failure refuse``): disk full, file removed, I/O error.
    The message names the store, never a path or the database's own text."""

    code = ErrorCode.STORAGE_UNAVAILABLE


class HostKeyError(NodeError):
    """HOST_PRIVATE_KEY is present but unusable. Never carries the value itself."""

    code = ErrorCode.INTERNAL_ERROR
