"""The encrypted session-init envelope (PROTOCOL.md section 3, steps 1-5).

:func:`parse_init_payload` checks the payload's shape and decodes its hex (steps 1-2);
:func:`open_session_init` derives the key, decrypts, validates the session data and
authenticates the client (steps 2-5). :func:`seal_session_init` is the client side,
building a payload exactly the way the TypeScript SDK does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from coincurve import PrivateKey, PublicKey

from node.crypto import aead
from node.crypto.curve import (
    address_of_uncompressed,
    compress_sec1,
    e2ee_v1_digest,
    parse_public_key,
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
from node.crypto.secp import recover_uncompressed
from node.crypto.secret import SecretBytes, constant_time_equal

ALG = "secp256k1-ecdh(ephemeral\u2192static)+hkdf(sha256)+xchacha20-poly1305"
MAX_DECIMAL_DIGITS = 78  # enough for any uint256
MAX_UINT256 = 2**256 - 1
# What one session may carry (docs/API.md, "Limits"). The decrypted session data is
# refused above MAX_SESSION_DATA_BYTES before it is decrypted (the ciphertext shows its
# size), so parsing it costs little memory even for a shape like ``{},{},...`` that grows
# about twenty-fold once parsed; what is kept is bounded per field.
MAX_SESSION_DATA_BYTES = 16 * 1024
MAX_MODEL_NAME_CHARS = 256
MAX_VECTOR_DATABASE_BYTES = 8 * 1024


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
    """What a successful init yields. ``session_key`` is wipeable and never printed.

    ``vector_database_json`` is the client's ``vectorDatabase`` as compact ASCII JSON text
    (at most ``MAX_VECTOR_DATABASE_BYTES``): kept as text, not as parsed objects, so what a
    session holds is exactly what was counted against its limits.
    """

    session_key: SecretBytes
    job_id: int
    model_name: str
    price_per_token: int
    client_address: str
    client_public_key: bytes
    recovery_public_key: bytes | None
    vector_database_json: str | None

    @property
    def vector_database(self) -> dict[str, Any] | None:
        """The ``vectorDatabase`` object, parsed again from the kept text."""
        return _vector_database(self.vector_database_json)

    def __repr__(self) -> str:
        return (
            f"SessionData(job_id={self.job_id}, model_name={self.model_name!r}, "
            f"client_address={self.client_address}, session_key=<redacted>)"
        )


def _vector_database(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value: dict[str, Any] = loads_bounded(text)
    return value


def _required_str(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise InvalidPayload(f"payload.{name} is required and must be a string")
    return value


_ZERO_SALT_HEX: Final = "0" * 64


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

    if salt_hex is None or salt_hex == "" or salt_hex == _ZERO_SALT_HEX:  # the SDK's
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


# The tokens of JSON that matter for finding a top-level member: strings (possibly
# unterminated; possessive, so linear, as in node.crypto.encoding) and punctuation.
_JSON_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)|[\[\]{}:,]', re.DOTALL)
_KEY_HEX = re.compile(rb"(?:0[xX])?[0-9a-fA-F]{64}")
_SESSION_KEY_NAME = b'"sessionKey"'
_QUOTE, _COLON, _COMMA = 0x22, 0x3A, 0x2C
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _session_key_span(buf: bytearray) -> tuple[int, int] | None:
    """Where the hex text of the top-level ``"sessionKey"`` string value lies in ``buf``.

    One linear pass over the tokens, reading offsets only: no slice of the value is taken,
    so no immutable copy of the key's hex text is made. ``None`` when there is no such
    member spelled plainly (an escaped key name, a value that is not a string); a second
    plain ``"sessionKey"`` member raises.
    """
    depth = 0
    expect_key = False  # the next string at depth 1 is a member name
    target = False  # the member name just read was "sessionKey"
    value_next = False  # the next token is that member's value
    span: tuple[int, int] | None = None
    seen = 0
    for match in _JSON_TOKEN.finditer(buf):
        start, end = match.span()
        first = buf[start]
        if first == _QUOTE:
            if depth == 1 and expect_key:
                expect_key = False
                target = end - start == len(_SESSION_KEY_NAME) and constant_time_equal(
                    buf[start:end], _SESSION_KEY_NAME
                )
                if target:
                    seen += 1
            elif depth == 1 and value_next and end - start >= 2 and buf[end - 1] == _QUOTE:
                span = (start + 1, end - 1)
            value_next = False
            continue
        if depth == 1 and value_next and first != _COLON:
            value_next = False  # the value is not a string
        if first in _OPEN:
            depth += 1
            expect_key = depth == 1 and first == ord("{")
        elif first in _CLOSE:
            depth -= 1
        elif depth == 1 and first == _COLON:
            value_next, target = target, False
        elif depth == 1 and first == _COMMA:
            expect_key = True
    if seen > 1:
        raise InvalidSessionData("sessionKey appears more than once")
    return span if seen == 1 else None


# The session data as the SDK writes it starts with the key: ``{"sessionKey":"`` and 64
# hex digits. When it does, and the name appears nowhere else, the span is known without
# reading the JSON token by token.
_SDK_KEY_PREFIX: Final = b'{"sessionKey":"'
_SDK_KEY_START: Final = len(_SDK_KEY_PREFIX)
_SDK_KEY_END: Final = _SDK_KEY_START + 64


def _hex_digit(c: int) -> int:
    # '0'-'9' -> 0-9, 'a'-'f' and 'A'-'F' -> 10-15 (validated as hex before).
    return (c & 0x0F) + 9 * (c >> 6)


# The same digit values as tables (indexing a tuple costs less than a call): the high
# nibble already shifted, so a key byte is one lookup in each.
_HEX_HIGH: Final = tuple(_hex_digit(c) << 4 for c in range(256))
_HEX_LOW: Final = tuple(_hex_digit(c) for c in range(256))


def _sdk_key_span(buf: bytearray) -> tuple[int, int] | None:
    """The span of the key's digits when ``buf`` starts the SDK's way and no other
    ``"sessionKey"`` appears in it (a later member so named, escaped or not, is then
    found when the parsed object is checked); otherwise None."""
    if (
        buf.startswith(_SDK_KEY_PREFIX)
        and len(buf) > _SDK_KEY_END
        and buf[_SDK_KEY_END] == _QUOTE
        and buf.find(_SESSION_KEY_NAME, _SDK_KEY_END) < 0
    ):
        return _SDK_KEY_START, _SDK_KEY_END
    return None


def _take_session_key(buf: bytearray) -> SecretBytes | None:
    """Decode the plain hex ``sessionKey`` of ``buf`` straight into a new wipeable buffer,
    then overwrite its digits in ``buf`` with ``0`` (the JSON stays valid, and the text
    that is parsed next no longer holds the key). ``None``: not found in plain form."""
    span = _sdk_key_span(buf) or _session_key_span(buf)
    if span is None:
        return None
    start, end = span
    if _KEY_HEX.fullmatch(buf, start, end) is None:
        return None  # not 64 plain hex digits: the general path judges (and refuses) it
    digits = start + (end - start - 64)
    key = bytearray(32)
    high, low = _HEX_HIGH, _HEX_LOW
    for i, j in enumerate(range(digits, digits + 64, 2)):
        key[i] = high[buf[j]] | low[buf[j + 1]]
    buf[start:end] = b"0" * (end - start)
    return SecretBytes.take(key)


def _parse_session_json(plaintext: SecretBytes) -> tuple[SecretBytes, dict[str, Any]]:
    key: SecretBytes | None = None
    try:
        buf = plaintext.live_buffer()
        key = _take_session_key(buf)
        data = loads_bounded(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        if key is not None:
            key.wipe()
        raise InvalidSessionData("decrypted session data is not UTF-8 JSON") from None
    except BaseException:
        if key is not None:
            key.wipe()
        raise
    finally:
        plaintext.wipe()
    if not isinstance(data, dict):
        if key is not None:
            key.wipe()
        raise InvalidSessionData("decrypted session data is not a JSON object")
    key_hex = data.pop("sessionKey", None)
    if key is not None:
        if not isinstance(key_hex, str) or not constant_time_equal(
            key_hex.encode("utf-8", "replace"), b"0" * len(key_hex)
        ):
            # json.loads kept another member (a later, escaped spelling of the name)
            key.wipe()
            raise InvalidSessionData("sessionKey appears more than once")
        return key, data
    # Not in plain form (escaped characters): decode what the parser made of it.
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


def _model_name(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidSessionData("modelName is required and must be a string")
    if len(value) > MAX_MODEL_NAME_CHARS:
        raise InvalidSessionData(f"modelName is longer than {MAX_MODEL_NAME_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        raise InvalidSessionData("modelName is not valid Unicode text") from None
    return value


def _vector_database_text(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidSessionData("vectorDatabase must be an object")
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    if len(text) > MAX_VECTOR_DATABASE_BYTES:
        raise InvalidSessionData(
            f"vectorDatabase is larger than {MAX_VECTOR_DATABASE_BYTES} bytes as compact JSON"
        )
    return text


def _recovery_key_error(raw: bytes) -> InvalidSessionData | None:
    """Why ``recoveryPublicKey`` is not a valid key, or None when it is one."""
    try:
        parse_public_key(raw, field="recoveryPublicKey")
    except InvalidPublicKey as exc:
        return InvalidSessionData(f"recoveryPublicKey is not a valid key: {exc}")
    return None


def open_session_init(host_key: HostKey, init: InitPayload) -> SessionData:
    """Steps 2-5: ECDH + HKDF, decrypt, validate session data, authenticate the client.

    Each step is done once, the two curve operations straight on libsecp256k1
    (:mod:`node.crypto.secp`): the ephemeral key is parsed (and so checked to be on the
    curve) once and, when it came compressed, used in that form; the signer's compressed
    form and address come from one serialisation of the recovered point. A
    ``recoveryPublicKey`` is checked by comparing it with the recovered signer's key in
    its own encoding (equal to a valid point's canonical encoding means valid); only when
    they differ is it parsed, to report an invalid key as such rather than as a signature
    mismatch.
    """
    if len(init.ciphertext) - aead.TAG_SIZE > MAX_SESSION_DATA_BYTES:
        raise InvalidSessionData(
            f"session data is larger than {MAX_SESSION_DATA_BYTES} bytes (the limit)"
        )
    try:
        shared, eph_compressed = host_key.ecdh_x_sec1(init.ephemeral_public, field="ephPubHex")
    except InvalidPublicKey as exc:
        raise InvalidPayload(exc.message) from None
    with shared:
        init_key = SecretBytes.take(hkdf_sha256_fast32(shared.live_buffer()))
    with init_key:
        plaintext = aead.open_secret(init_key, init.nonce, init.ciphertext, init.aad)
    session_key, data = _parse_session_json(plaintext)
    try:
        job_id = _parse_decimal(data.get("jobId"), "jobId")
        model = _model_name(data.get("modelName"))
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
        vdb = _vector_database_text(data.get("vectorDatabase"))
        del data  # the parsed objects go now; only the bounded fields above are kept

        digest = e2ee_v1_digest(
            eph_compressed,
            host_key.public_key,
            init.salt,
            init.nonce,
            init.info,
            init.aad,
        )
        try:
            signer_full = recover_uncompressed(digest, init.signature)
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
        vector_database_json=vdb,
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
