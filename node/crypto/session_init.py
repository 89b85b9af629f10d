"""The encrypted session-init envelope (PROTOCOL.md section 3, steps 1-5).

:func:`parse_init_payload` checks the payload's shape and decodes its hex (steps 1-2);
:func:`open_session_init` derives the key, decrypts, validates the session data and
authenticates the client (steps 2-5). :func:`seal_session_init` is the client side,
building a payload exactly the way the TypeScript SDK does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from coincurve import PrivateKey, PublicKey

from node.crypto import aead
from node.crypto.curve import (
    address_of_uncompressed,
    compress_sec1,
    e2ee_v1_digest,
    parse_public_key,
    recover_public_key,
    sign_recoverable,
)
from node.crypto.encoding import (
    decode_hex,
    decode_hex_into_bytearray,
    encode_hex,
    loads_bounded,
)
from node.crypto.errors import (
    InvalidHexEncoding,
    InvalidNonceSize,
    InvalidPayload,
    InvalidPublicKey,
    InvalidSessionData,
    InvalidSignature,
    MissingPayload,
)
from node.crypto.hostkey import HostKey
from node.crypto.kdf import ZERO_SALT, hkdf_sha256_fast32
from node.crypto.secret import SecretBytes, constant_time_equal

ALG = "secp256k1-ecdh(ephemeral\u2192static)+hkdf(sha256)+xchacha20-poly1305"
MAX_DECIMAL_DIGITS = 78  # enough for any uint256
MAX_UINT256 = 2**256 - 1


@attrs.frozen
class InitPayload:
    """The decoded bytes of an ``encrypted_session_init`` payload."""

    ephemeral_public: bytes
    ciphertext: bytes
    nonce: bytes
    signature: bytes
    aad: bytes
    salt: bytes = ZERO_SALT
    info: bytes = b""

    def replay_key(self) -> bytes:
        """What the init replay cache remembers: the ephemeral key's x-coordinate and nonce.

        Only x is kept. The ECDH secret is the x-coordinate of ``d * E``, which is the same
        for E and -E, so the 02/03 (and 65-byte) spellings of +/-E all open the same init;
        with the parity flipped the signature recovers another key, which a replay without
        ``recoveryPublicKey`` would otherwise get accepted under. All of them must hit the
        same cache entry.
        """
        return self.ephemeral_public[1:33] + b"|" + self.nonce


@attrs.define(repr=False)
class SessionData:
    """What a successful init yields. ``session_key`` is wipeable and never printed."""

    session_key: SecretBytes
    job_id: int
    model_name: str
    price_per_token: int
    client_address: str
    client_public_key: bytes
    recovery_public_key: bytes | None
    vector_database: dict[str, Any] | None

    def __repr__(self) -> str:
        return (
            f"SessionData(job_id={self.job_id}, model_name={self.model_name!r}, "
            f"client_address={self.client_address}, session_key=<redacted>)"
        )


def _required_str(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise InvalidPayload(f"payload.{name} is required and must be a string")
    return value


def parse_init_payload(payload: object) -> InitPayload:
    """Steps 1 and 2: shape, hex and sizes. The on-curve check happens when opening."""
    if payload is None:
        raise MissingPayload("encrypted_session_init needs a payload object")
    if not isinstance(payload, Mapping):
        raise InvalidPayload("payload must be a JSON object")
    eph_hex = _required_str(payload, "ephPubHex")
    ct_hex = _required_str(payload, "ciphertextHex")
    nonce_hex = _required_str(payload, "nonceHex")
    sig_hex = _required_str(payload, "signatureHex")
    aad_hex = _required_str(payload, "aadHex")
    salt_hex = payload.get("saltHex")
    info = payload.get("info")

    nonce = decode_hex(nonce_hex, "nonceHex")
    if len(nonce) != aead.NONCE_SIZE:
        raise InvalidNonceSize(f"nonceHex must be 24 bytes, got {len(nonce)}")
    signature = decode_hex(sig_hex, "signatureHex")
    if len(signature) != 65:
        raise InvalidSignature(f"signatureHex must be 65 bytes, got {len(signature)}")
    eph = decode_hex(eph_hex, "ephPubHex")
    if len(eph) not in (33, 65):
        raise InvalidPayload(f"ephPubHex must be 33 or 65 bytes, got {len(eph)}")
    ciphertext = decode_hex(ct_hex, "ciphertextHex")
    if len(ciphertext) < aead.TAG_SIZE:
        raise InvalidPayload("ciphertextHex is shorter than the 16-byte tag")
    aad = decode_hex(aad_hex, "aadHex")

    if salt_hex is None or salt_hex == "":
        salt = ZERO_SALT
    elif isinstance(salt_hex, str):
        salt = decode_hex(salt_hex, "saltHex")
        if salt != ZERO_SALT:
            raise InvalidPayload("unsupported salt: only 32 zero bytes (or none) are accepted")
    else:
        raise InvalidPayload("payload.saltHex must be a string")
    if info is not None and info != "":
        raise InvalidPayload("unsupported info: only an empty info string is accepted")
    return InitPayload(eph, ciphertext, nonce, signature, aad, salt, b"")


def _parse_decimal(value: object, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidSessionData(f"{field} must be a decimal string or integer")
    if isinstance(value, int):
        if not 0 <= value <= MAX_UINT256:
            raise InvalidSessionData(f"{field} must be between 0 and 2^256-1")
        return value
    if isinstance(value, str):
        text = value[:-1] if value.endswith("n") else value
        if not text or not text.isascii() or not text.isdigit() or len(text) > MAX_DECIMAL_DIGITS:
            raise InvalidSessionData(f"{field} must be a non-negative decimal number")
        number = int(text)
        if number > MAX_UINT256:
            raise InvalidSessionData(f"{field} must be between 0 and 2^256-1")
        return number
    raise InvalidSessionData(f"{field} must be a decimal string or integer")


def _parse_session_json(plaintext: SecretBytes) -> tuple[SecretBytes, dict[str, Any]]:
    try:
        data = loads_bounded(plaintext.view().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidSessionData("decrypted session data is not UTF-8 JSON") from None
    finally:
        plaintext.wipe()
    if not isinstance(data, dict):
        raise InvalidSessionData("decrypted session data is not a JSON object")
    key_hex = data.pop("sessionKey", None)
    if not isinstance(key_hex, str):
        raise InvalidSessionData("sessionKey is required (64 hex digits)")
    body = key_hex[2:] if key_hex[:2] in ("0x", "0X") else key_hex
    if len(body) != 64:
        raise InvalidSessionData("sessionKey must be exactly 32 bytes (64 hex digits)")
    try:
        # Decode the original text: decode_hex_into_bytearray strips one 0x prefix itself,
        # so passing ``body`` would strip a second one ("0x0x" + 62 digits -> 31 bytes).
        key = SecretBytes.take(decode_hex_into_bytearray(key_hex, "sessionKey"))
    except InvalidHexEncoding:
        raise InvalidSessionData("sessionKey is not valid hex") from None
    return key, data


def _recovery_key_error(raw: bytes) -> InvalidSessionData | None:
    """Why ``recoveryPublicKey`` is not a valid key, or None when it is one."""
    try:
        parse_public_key(raw, field="recoveryPublicKey")
    except InvalidPublicKey as exc:
        return InvalidSessionData(f"recoveryPublicKey is not a valid key: {exc}")
    return None


def open_session_init(host_key: HostKey, init: InitPayload) -> SessionData:
    """Steps 2-5: ECDH + HKDF, decrypt, validate session data, authenticate the client.

    Each step is done once: the ephemeral key is parsed (and so checked to be on the
    curve) once and, when it came compressed, used in that form; the signer's compressed
    form and address come from one serialisation of the recovered point. A
    ``recoveryPublicKey`` is checked by comparing it with the recovered signer's key in
    its own encoding (equal to a valid point's canonical encoding means valid); only when
    they differ is it parsed, to report an invalid key as such rather than as a signature
    mismatch.
    """
    eph = init.ephemeral_public
    try:
        eph_point = parse_public_key(eph, field="ephPubHex")
    except InvalidPublicKey as exc:
        raise InvalidPayload(exc.message) from None
    with host_key.ecdh_x(eph_point) as shared:
        init_key = SecretBytes.take(hkdf_sha256_fast32(shared.reveal()))
    with init_key:
        plaintext = aead.open_secret(init_key, init.nonce, init.ciphertext, init.aad)
    session_key, data = _parse_session_json(plaintext)
    try:
        job_id = _parse_decimal(data.get("jobId"), "jobId")
        model = data.get("modelName")
        if not isinstance(model, str):
            raise InvalidSessionData("modelName is required and must be a string")
        if "pricePerToken" not in data:
            raise InvalidSessionData("pricePerToken is required")
        price = _parse_decimal(data["pricePerToken"], "pricePerToken")
        recovery_raw = data.get("recoveryPublicKey")
        recovery: bytes | None = None
        if recovery_raw is not None:
            if not isinstance(recovery_raw, str):
                raise InvalidSessionData("recoveryPublicKey must be a hex string")
            try:
                recovery = decode_hex(recovery_raw, "recoveryPublicKey")
            except InvalidHexEncoding:
                raise InvalidSessionData("recoveryPublicKey is not valid hex") from None
        vdb = data.get("vectorDatabase")
        if vdb is not None and not isinstance(vdb, dict):
            raise InvalidSessionData("vectorDatabase must be an object")

        digest = e2ee_v1_digest(
            eph if len(eph) == 33 else eph_point.format(compressed=True),
            host_key.public_key,
            init.salt,
            init.nonce,
            init.info,
            init.aad,
        )
        try:
            signer_full = recover_public_key(digest, init.signature).format(compressed=False)
        except InvalidSignature:
            if recovery is not None:  # an invalid recoveryPublicKey is reported first
                bad = _recovery_key_error(recovery)
                if bad is not None:
                    raise bad from None
            raise
        signer = compress_sec1(signer_full)
        if recovery is not None:
            if not constant_time_equal(recovery, signer if len(recovery) == 33 else signer_full):
                bad = _recovery_key_error(recovery)
                if bad is not None:
                    raise bad
                raise InvalidSignature(
                    "signature was not made by recoveryPublicKey (the session is not bound "
                    "to the client's key)"
                )
            recovery = signer
        address = address_of_uncompressed(signer_full)
    except BaseException:
        session_key.wipe()
        raise
    return SessionData(
        session_key=session_key,
        job_id=job_id,
        model_name=model,
        price_per_token=price,
        client_address=address,
        client_public_key=signer,
        recovery_public_key=recovery,
        vector_database=vdb,
    )


def seal_session_init(
    host_public_key: bytes | str,
    client_key: PrivateKey,
    session_key: bytes | bytearray | SecretBytes,
    *,
    job_id: int | str,
    model_name: str,
    price_per_token: int | str = 0,
    vector_database: Mapping[str, Any] | None = None,
    include_recovery_key: bool = True,
    rng: Callable[[int], bytes] = os.urandom,
) -> dict[str, Any]:
    """Client side: build an ``encrypted_session_init`` payload the SDK way."""
    host_pub = (
        decode_hex(host_public_key, "host public key")
        if isinstance(host_public_key, str)
        else host_public_key
    )
    host_point = parse_public_key(host_pub, field="host public key")
    host_compressed = host_point.format(compressed=True)
    eph = PrivateKey(_valid_scalar(rng))
    eph_pub = eph.public_key.format(compressed=True)
    shared = SecretBytes(host_point.multiply(eph.secret).format(compressed=True)[1:])
    with shared:
        init_key = SecretBytes.take(hkdf_sha256_fast32(shared.reveal()))
    key_bytes = session_key.reveal() if isinstance(session_key, SecretBytes) else bytes(session_key)
    session: dict[str, Any] = {
        "sessionKey": key_bytes.hex(),
        "jobId": str(job_id),
        "modelName": model_name,
        "pricePerToken": price_per_token,
    }
    if include_recovery_key:
        session["recoveryPublicKey"] = "0x" + client_key.public_key.format(compressed=True).hex()
    if vector_database is not None:
        session["vectorDatabase"] = dict(vector_database)
    nonce = rng(aead.NONCE_SIZE)
    with init_key:
        ciphertext = aead.seal(
            init_key, nonce, json.dumps(session, separators=(",", ":")).encode("utf-8"), b""
        )
    digest = e2ee_v1_digest(eph_pub, host_compressed, ZERO_SALT, nonce, b"", b"")
    signature = sign_recoverable(client_key, digest)
    return {
        "ephPubHex": encode_hex(eph_pub),
        "saltHex": encode_hex(ZERO_SALT),
        "nonceHex": encode_hex(nonce),
        "ciphertextHex": encode_hex(ciphertext),
        "signatureHex": encode_hex(signature),
        "recid": signature[64],
        "alg": ALG,
        "info": "",
        "aadHex": "",
    }


def _valid_scalar(rng: Callable[[int], bytes]) -> bytes:
    from node.crypto.curve import SECP256K1_N

    while True:
        candidate = rng(32)
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
            return candidate


__all__ = [
    "ALG",
    "InitPayload",
    "PublicKey",
    "SessionData",
    "open_session_init",
    "parse_init_payload",
    "seal_session_init",
]
