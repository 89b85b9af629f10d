"""Usage receipts: one per ended session, canonical JSON, signed by the host key.

Format (receipt version 2; version 1 below). The signed message is the canonical JSON
text of the receipt object::

    json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

encoded as UTF-8, signed as an EIP-191 personal message (``"\\x19Ethereum Signed
Message:\\n" + len + message``, Keccak-256) by the host key; the signature is 65 bytes
r || s || v with v in {27, 28}, written as 130 lowercase hex digits without ``0x``.
Any Ethereum tool verifies it, e.g. with eth-account::

    Account.recover_message(encode_defunct(text=canonical), signature=sig) == host_address

Fields of the receipt object:

- ``type``: ``"llm-node.usage-receipt"``; ``version``: 2 (1 for receipts written
  before the hash chain).
- ``sequence``: the ledger's receipt number, 1, 2, 3, ... without gaps.
- ``session_id`` (string), ``job_id`` (decimal string or null), ``chain_id`` (int).
- ``client_address``: EIP-55 address of the client (null for plaintext sessions).
- ``host_address``: EIP-55 address of the signing host key (null on a plaintext-only
  node, whose receipts are recorded unsigned).
- ``model``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
  ``request_count`` (ints).
- ``price_per_token`` and ``amount`` (= total_tokens * price_per_token): decimal
  *strings*, because uint256 values do not survive JSON consumers that parse numbers as
  IEEE doubles (anything above 2**53 - 1).
- ``encrypted`` (bool), ``started_at`` and ``ended_at`` (ISO-8601 UTC with milliseconds,
  ``Z`` suffix), ``end_reason`` (e.g. ``disconnect``, ``reinit``, ``idle_timeout``).
- ``protocol``: ``"v2"`` for a session over protocol v2 (``/v2/ws``). Absent for protocol
  v1, so that v1 receipts keep exactly the fields and bytes they always had.

Version 2 (written since the ledger became a hash chain) adds two fields; version 1
receipts (without them) stay valid and verify as before:

- ``ledger_epoch``: 32 hex digits, random, chosen each time a node process opens the
  ledger to write to it (a node start). ``(ledger_epoch, sequence)`` names one receipt;
  a restore from a backup always starts a new epoch, so a re-issued sequence number shows
  up as one number under two epochs.
- ``prev_hash``: SHA-256 (64 lowercase hex digits) of the canonical JSON text of the
  receipt with the previous sequence number (of any version), or null for the ledger's
  first receipt. Each receipt thus signs the whole history before it: a receipt removed
  or altered breaks the link of the one after it.

Export form (``llm-node receipts export --json``, one element per receipt)::

    {"receipt": {...the object above...}, "signature": "<130 hex>" | null, "signed": bool}
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from node.crypto.curve import address_of, eip191_digest, recover_public_key
from node.crypto.encoding import decode_hex, encode_hex
from node.crypto.errors import CryptoError
from node.crypto.hostkey import HostKey
from node.crypto.secret import constant_time_equal
from node.settlement.errors import ReceiptError
from node.settlement.usage import MAX_TOKENS, MAX_UINT256, PROTOCOLS, check_text, check_uint

RECEIPT_TYPE = "llm-node.usage-receipt"
RECEIPT_VERSION = 2
#: The receipt versions this code reads (1: before the hash chain).
RECEIPT_VERSIONS = (1, 2)
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,99}")
#: An amount is tokens (< 2**63) times a uint256 price, so it may exceed uint256.
MAX_AMOUNT = 2**320
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
_EPOCH_RE = re.compile(r"[0-9a-f]{32}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_FIELDS_V1 = frozenset(
    {
        "type",
        "version",
        "sequence",
        "session_id",
        "job_id",
        "chain_id",
        "client_address",
        "host_address",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "request_count",
        "price_per_token",
        "amount",
        "encrypted",
        "started_at",
        "ended_at",
        "end_reason",
    }
)
_FIELDS = {1: _FIELDS_V1, 2: _FIELDS_V1 | {"ledger_epoch", "prev_hash"}}
#: Written only when not "v1" (a receipt of a protocol v1 session leaves it out).
_PROTOCOL_FIELD = "protocol"


def receipt_hash(canonical: str) -> str:
    """SHA-256 of a receipt's canonical JSON text, as 64 lowercase hex digits: what the
    next receipt carries as ``prev_hash``."""
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def canonical_json(obj: Mapping[str, Any]) -> str:
    """The one JSON spelling that is signed: sorted keys, no spaces, raw UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decimal_string(value: int) -> str:
    return str(value)


def parse_decimal(name: str, value: object, *, limit: int = MAX_UINT256) -> int:
    """A uint256 (or up to ``limit``) as a canonical decimal string (no sign, no
    leading zeros)."""
    if not isinstance(value, str) or not _DECIMAL_RE.fullmatch(value):
        raise ReceiptError(f"receipt field {name} must be a decimal string")
    number = int(value)
    if number > limit:
        raise ReceiptError(f"receipt field {name} is out of range")
    return number


def _optional_address(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ADDRESS_RE.fullmatch(value):
        raise ReceiptError(f"receipt field {name} must be an 0x address or null")
    return value


@attrs.frozen(kw_only=True)
class Receipt:
    """The facts of one ended session. ``total_tokens`` and ``amount`` are derived."""

    sequence: int
    session_id: str
    job_id: int | None
    chain_id: int
    client_address: str | None
    host_address: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    request_count: int
    price_per_token: int
    encrypted: bool
    started_at: str
    ended_at: str
    end_reason: str
    protocol: str = "v1"
    version: int = RECEIPT_VERSION
    ledger_epoch: str | None = None
    prev_hash: str | None = None

    def __attrs_post_init__(self) -> None:
        try:
            check_uint("sequence", self.sequence, limit=2**63 - 1)
            check_text("session_id", self.session_id)
            if self.job_id is not None:
                check_uint("job_id", self.job_id, limit=MAX_UINT256)
            check_uint("chain_id", self.chain_id, limit=2**63 - 1)
            check_text("model", self.model)
            check_uint("prompt_tokens", self.prompt_tokens, limit=MAX_TOKENS * 2**14)
            check_uint("completion_tokens", self.completion_tokens, limit=MAX_TOKENS * 2**14)
            check_uint("request_count", self.request_count, limit=2**62)
            check_uint("price_per_token", self.price_per_token, limit=MAX_UINT256)
            check_text("started_at", self.started_at, limit=64)
            check_text("ended_at", self.ended_at, limit=64)
            check_text("end_reason", self.end_reason, limit=64)
        except (TypeError, ValueError) as exc:
            raise ReceiptError(f"receipt field {exc}") from None
        _optional_address("client_address", self.client_address)
        _optional_address("host_address", self.host_address)
        if not isinstance(self.encrypted, bool):
            raise ReceiptError("receipt field encrypted must be a bool")
        if self.protocol not in PROTOCOLS:
            raise ReceiptError(f"receipt field protocol must be one of {', '.join(PROTOCOLS)}")
        if self.version not in RECEIPT_VERSIONS or isinstance(self.version, bool):
            raise ReceiptError(f"unsupported receipt version {self.version!r}")
        if self.version == 1:
            if self.ledger_epoch is not None or self.prev_hash is not None:
                raise ReceiptError("a version 1 receipt has no ledger_epoch or prev_hash")
            return
        if not isinstance(self.ledger_epoch, str) or not _EPOCH_RE.fullmatch(self.ledger_epoch):
            raise ReceiptError("receipt field ledger_epoch must be 32 lowercase hex digits")
        if self.prev_hash is not None and (
            not isinstance(self.prev_hash, str) or not _HASH_RE.fullmatch(self.prev_hash)
        ):
            raise ReceiptError("receipt field prev_hash must be 64 lowercase hex digits or null")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def amount(self) -> int:
        """total_tokens * price_per_token, exact (Python ints, never floats)."""
        return self.total_tokens * self.price_per_token

    def to_json_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "type": RECEIPT_TYPE,
            "version": self.version,
            "sequence": self.sequence,
            "session_id": self.session_id,
            "job_id": None if self.job_id is None else decimal_string(self.job_id),
            "chain_id": self.chain_id,
            "client_address": self.client_address,
            "host_address": self.host_address,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "request_count": self.request_count,
            "price_per_token": decimal_string(self.price_per_token),
            "amount": decimal_string(self.amount),
            "encrypted": self.encrypted,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
        }
        if self.protocol != "v1":
            obj[_PROTOCOL_FIELD] = self.protocol
        if self.version >= 2:
            obj["ledger_epoch"] = self.ledger_epoch
            obj["prev_hash"] = self.prev_hash
        return obj

    def canonical_json(self) -> str:
        return canonical_json(self.to_json_object())

    def canonical_bytes(self) -> bytes:
        """The exact bytes the host key signs (before the EIP-191 prefix)."""
        return self.canonical_json().encode("utf-8")

    @classmethod
    def from_json_object(cls, obj: object) -> Receipt:
        """Parse a receipt object strictly; derived fields must agree with the rest."""
        if not isinstance(obj, Mapping):
            raise ReceiptError("a receipt must be a JSON object")
        keys = set(obj) - {_PROTOCOL_FIELD}
        version = obj.get("version")
        # The field set of the version it claims (the constructor checks the version).
        fields = _FIELDS.get(version) if type(version) is int else None
        fields = fields or _FIELDS[RECEIPT_VERSION]
        if keys != fields:
            missing = sorted(fields - keys)
            extra = sorted(keys - fields)
            raise ReceiptError(f"receipt fields differ: missing {missing}, unexpected {extra}")
        if obj["type"] != RECEIPT_TYPE:
            raise ReceiptError("not a usage receipt (wrong type)")
        job = obj["job_id"]
        receipt = cls(
            version=obj["version"],
            sequence=obj["sequence"],
            session_id=obj["session_id"],
            job_id=None if job is None else parse_decimal("job_id", job),
            chain_id=obj["chain_id"],
            client_address=obj["client_address"],
            host_address=obj["host_address"],
            model=obj["model"],
            prompt_tokens=obj["prompt_tokens"],
            completion_tokens=obj["completion_tokens"],
            request_count=obj["request_count"],
            price_per_token=parse_decimal("price_per_token", obj["price_per_token"]),
            encrypted=obj["encrypted"],
            started_at=obj["started_at"],
            ended_at=obj["ended_at"],
            end_reason=obj["end_reason"],
            protocol=obj.get(_PROTOCOL_FIELD, "v1"),
            ledger_epoch=obj.get("ledger_epoch"),
            prev_hash=obj.get("prev_hash"),
        )
        if obj.get(_PROTOCOL_FIELD) == "v1":
            raise ReceiptError('a v1 receipt leaves out the protocol field (it is not "v1")')
        if obj["total_tokens"] != receipt.total_tokens:
            raise ReceiptError("total_tokens is not prompt_tokens + completion_tokens")
        if parse_decimal("amount", obj["amount"], limit=MAX_AMOUNT) != receipt.amount:
            raise ReceiptError("amount is not total_tokens * price_per_token")
        return receipt

    @classmethod
    def from_canonical_json(cls, text: str) -> Receipt:
        try:
            obj = json.loads(text)
        except ValueError:
            raise ReceiptError("receipt text is not JSON") from None
        receipt = cls.from_json_object(obj)
        if receipt.canonical_json() != text:
            raise ReceiptError("receipt text is not in canonical form")
        return receipt


@attrs.frozen
class SignedReceipt:
    """A receipt and its 65-byte host signature, or ``None`` when recorded unsigned."""

    receipt: Receipt
    signature: bytes | None

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def signature_hex(self) -> str | None:
        return None if self.signature is None else encode_hex(self.signature)

    def to_export(self) -> dict[str, Any]:
        return {
            "receipt": self.receipt.to_json_object(),
            "signature": self.signature_hex,
            "signed": self.signed,
        }

    @classmethod
    def from_export(cls, obj: object) -> SignedReceipt:
        if not isinstance(obj, Mapping) or set(obj) != {"receipt", "signature", "signed"}:
            raise ReceiptError("an exported receipt has exactly receipt, signature, signed")
        signature = signature_from_hex(obj["signature"])
        if obj["signed"] is not (signature is not None):
            raise ReceiptError("signed flag disagrees with the signature field")
        return cls(Receipt.from_json_object(obj["receipt"]), signature)


def signature_from_hex(value: object) -> bytes | None:
    """A stored or exported signature: hex text, or None for an unsigned receipt."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ReceiptError("signature must be a hex string or null")
    try:
        return decode_hex(value, "signature")
    except CryptoError as exc:
        raise ReceiptError(exc.message) from None


def sign_receipt(receipt: Receipt, host_key: HostKey | None) -> SignedReceipt:
    """Sign with the host key, or record unsigned when the node has none (plaintext-only).

    The receipt must already name the signer: ``host_address`` equal to the key's
    address, or ``None`` when there is no key.
    """
    if host_key is None:
        if receipt.host_address is not None:
            raise ReceiptError("an unsigned receipt must not name a host address")
        return SignedReceipt(receipt, None)
    if receipt.host_address is None or not constant_time_equal(
        receipt.host_address.encode(), host_key.address.encode()
    ):
        raise ReceiptError("receipt host_address is not the signing key's address")
    return SignedReceipt(receipt, host_key.sign_personal_message(receipt.canonical_bytes()))


def recover_signer(message: bytes, signature: bytes) -> str:
    """EIP-55 address that signed ``message`` as an EIP-191 personal message.

    Raises :class:`~node.crypto.errors.InvalidSignature` for a malformed signature
    (wrong length, bad v, r/s out of range, high-S) or one that recovers no key.
    """
    return address_of(recover_public_key(eip191_digest(message), signature))


class VerificationStatus(enum.StrEnum):
    VALID = "valid"
    UNSIGNED = "unsigned"
    INVALID = "invalid"


@attrs.frozen
class Verification:
    status: VerificationStatus
    reason: str
    signer: str | None = None

    @property
    def ok(self) -> bool:
        """Valid or honestly unsigned; only INVALID is a failure."""
        return self.status is not VerificationStatus.INVALID


def verify_receipt(signed: SignedReceipt, *, host_address: str | None = None) -> Verification:
    """Check the signature against the host address the receipt names.

    ``host_address`` (optional) pins the expected host; a receipt naming another host
    fails. A receipt with no signature and no host address is reported UNSIGNED (a
    plaintext-only node wrote it), not INVALID; one that names a host but carries no
    signature is INVALID (a stripped signature).
    """
    receipt = signed.receipt
    if signed.signature is None:
        if receipt.host_address is None:
            return Verification(
                VerificationStatus.UNSIGNED, "recorded unsigned (node had no host key)"
            )
        return Verification(
            VerificationStatus.INVALID,
            f"receipt names host {receipt.host_address} but carries no signature",
        )
    if receipt.host_address is None:
        return Verification(
            VerificationStatus.INVALID, "receipt carries a signature but names no host address"
        )
    if host_address is not None and not constant_time_equal(
        host_address.lower().encode(), receipt.host_address.lower().encode()
    ):
        return Verification(
            VerificationStatus.INVALID,
            f"receipt names host {receipt.host_address}, expected {host_address}",
        )
    try:
        signer = recover_signer(receipt.canonical_bytes(), signed.signature)
    except CryptoError as exc:
        return Verification(VerificationStatus.INVALID, f"bad signature: {exc.message}")
    if not constant_time_equal(signer.lower().encode(), receipt.host_address.lower().encode()):
        return Verification(
            VerificationStatus.INVALID,
            f"signature is by {signer}, not by the host {receipt.host_address}",
            signer,
        )
    return Verification(VerificationStatus.VALID, f"signed by {signer}", signer)
