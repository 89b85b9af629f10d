"""The v2 session record: the client's terms and a wallet signature bound to the handshake.

The client signs, with EIP-191 ``personal_sign``, a short text that contains the Noise
handshake hash, so a signature made for one connection is worthless on any other. The
node recovers the signer (low-S only) and compares its EIP-55 address with ``address``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

import attrs
from coincurve import PrivateKey

from node.crypto.curve import (
    address_of,
    eip191_digest,
    parse_public_key,
    recover_public_key,
    sign_recoverable,
)
from node.crypto.encoding import decode_hex
from node.crypto.errors import ErrorCode, InvalidHexEncoding, InvalidPublicKey, InvalidSignature
from node.crypto.secret import constant_time_equal
from node.protocol.errors import ProtocolError

SIGNED_TEXT_HEADER: Final = "llm-node session v2"
MAX_DECIMAL_DIGITS: Final = 78
MAX_UINT256: Final = 2**256 - 1
MAX_MODEL: Final = 256
MAX_VECTOR_DB: Final = 1024
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_RECOVERY = re.compile(r"0x0[23][0-9a-fA-F]{64}")


def _bad(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_SESSION_DATA, text)


@attrs.frozen
class SessionTerms:
    """What the client signs (everything but the handshake hash, which is implicit)."""

    job_id: int
    model: str
    price_per_token: int
    chain_id: int
    recovery_key: bytes | None = None  # 33-byte compressed point
    vector_db: str | None = None


@attrs.frozen
class VerifiedSession:
    terms: SessionTerms
    client_address: str  # EIP-55, recovered from the signature
    client_public_key: bytes


def signed_text(handshake_hash: bytes, terms: SessionTerms) -> bytes:
    """The exact UTF-8 text the client signs (no trailing newline)."""
    recovery = "0x" + terms.recovery_key.hex() if terms.recovery_key is not None else "none"
    vdb = (
        hashlib.sha256(terms.vector_db.encode("utf-8")).hexdigest()
        if terms.vector_db is not None
        else "none"
    )
    lines = [
        SIGNED_TEXT_HEADER,
        f"handshake: 0x{handshake_hash.hex()}",
        f"job: {terms.job_id}",
        f"model: {terms.model}",
        f"price: {terms.price_per_token}",
        f"chain: {terms.chain_id}",
        f"recovery: {recovery}",
        f"vector-db: {vdb}",
    ]
    return "\n".join(lines).encode("utf-8")


def sign_session(handshake_hash: bytes, terms: SessionTerms, key: PrivateKey) -> bytes:
    """A ``personal_sign`` signature (r || s || v, v in {27, 28}) as a wallet makes it."""
    sig = sign_recoverable(key, eip191_digest(signed_text(handshake_hash, terms)))
    return sig[:64] + bytes((sig[64] + 27,))


def session_record_object(terms: SessionTerms, address: str, signature: bytes) -> dict[str, Any]:
    """The JSON object of the client's first DATA record, in canonical key order."""
    obj: dict[str, Any] = {
        "type": "session",
        "job_id": str(terms.job_id),
        "model": terms.model,
        "price_per_token": str(terms.price_per_token),
        "chain_id": terms.chain_id,
    }
    if terms.recovery_key is not None:
        obj["recovery_key"] = "0x" + terms.recovery_key.hex()
    if terms.vector_db is not None:
        obj["vector_db"] = terms.vector_db
    obj["address"] = address
    obj["signature"] = "0x" + signature.hex()
    return obj


# ------------------------------------------------------------------------- parsing


def _decimal(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise _bad(f"{name} must be a decimal string without leading zeros")
    number = int(value)
    if number > MAX_UINT256:
        raise _bad(f"{name} must be at most 2^256-1")
    return number


def _plain_text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise _bad(f"{name} must be a string of 1 to {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _bad(f"{name} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{name} is not valid Unicode text") from None
    return value


def parse_session_record(obj: dict[str, Any]) -> tuple[SessionTerms, str, bytes]:
    """(terms, claimed address, signature) of a ``session`` DATA object; shape only."""
    job_id = _decimal(obj, "job_id")
    model = _plain_text(obj.get("model"), "model", MAX_MODEL)
    price = _decimal(obj, "price_per_token")
    chain_id = obj.get("chain_id")
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or not 0 < chain_id < 2**63:
        raise _bad("chain_id must be a positive integer below 2^63")
    recovery: bytes | None = None
    raw_recovery = obj.get("recovery_key")
    if raw_recovery is not None:
        if not isinstance(raw_recovery, str) or not _RECOVERY.fullmatch(raw_recovery):
            raise _bad("recovery_key must be 0x and a 33-byte compressed public key in hex")
        try:
            recovery = parse_public_key(decode_hex(raw_recovery, "recovery_key")).format(
                compressed=True
            )
        except (InvalidPublicKey, InvalidHexEncoding):
            raise _bad("recovery_key is not a point on secp256k1") from None
    vdb = obj.get("vector_db")
    vector_db = None if vdb is None else _plain_text(vdb, "vector_db", MAX_VECTOR_DB)
    address = obj.get("address")
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise _bad("address must be 0x and 40 hex digits")
    signature = obj.get("signature")
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise ProtocolError(
            ErrorCode.INVALID_SIGNATURE, "signature must be 0x and 65 bytes (130 hex digits)"
        )
    terms = SessionTerms(job_id, model, price, chain_id, recovery, vector_db)
    return terms, address, bytes.fromhex(signature[2:])


def verify_session(
    handshake_hash: bytes, terms: SessionTerms, address: str, signature: bytes
) -> VerifiedSession:
    """Recover the signer of the text bound to ``handshake_hash`` and check it.

    A signature over another handshake recovers some other key, so its address does not
    match: SESSION_AUTH_DENIED. A malformed or high-S signature: INVALID_SIGNATURE.
    """
    digest = eip191_digest(signed_text(handshake_hash, terms))
    try:
        signer = recover_public_key(digest, signature)
    except InvalidSignature as exc:
        raise ProtocolError(ErrorCode.INVALID_SIGNATURE, exc.message) from None
    public = signer.format(compressed=True)
    if terms.recovery_key is not None and not constant_time_equal(public, terms.recovery_key):
        raise ProtocolError(
            ErrorCode.INVALID_SIGNATURE, "the signature was not made by recovery_key"
        )
    recovered = address_of(signer)
    if not constant_time_equal(recovered.lower().encode(), address.lower().encode()):
        raise ProtocolError(
            ErrorCode.SESSION_AUTH_DENIED,
            "the signature does not belong to address for this handshake",
        )
    return VerifiedSession(terms, recovered, public)
