"""Receipts: canonical JSON, exact amounts, EIP-191 signatures (checked with eth-account
and with the node's own verifier), unsigned receipts and tampering."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from node.crypto.curve import SECP256K1_N
from node.crypto.hostkey import HostKey
from node.settlement import (
    Receipt,
    ReceiptError,
    SignedReceipt,
    VerificationStatus,
    canonical_json,
    recover_signer,
    sign_receipt,
    verify_receipt,
)
from tests.settlement.conftest import CLIENT_ADDRESS


def make_receipt(host: HostKey | None, **changes: Any) -> Receipt:
    fields: dict[str, Any] = {
        "sequence": 1,
        "session_id": "42",
        "job_id": 42,
        "chain_id": 84532,
        "client_address": CLIENT_ADDRESS,
        "host_address": None if host is None else host.address,
        "model": "smollm2-135m",
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "request_count": 2,
        "price_per_token": 5,
        "encrypted": True,
        "started_at": "2025-06-15T15:06:40.000Z",
        "ended_at": "2025-06-15T15:07:40.000Z",
        "end_reason": "disconnect",
        "ledger_epoch": "ab" * 16,
        "prev_hash": None,
    }
    fields.update(changes)
    return Receipt(**fields)


def eth_recover(text: str, signature: bytes | str) -> str:
    recovered: str = Account.recover_message(encode_defunct(text=text), signature=signature)
    return recovered


def test_canonical_json_is_sorted_compact_utf8(host_key: HostKey) -> None:
    receipt = make_receipt(host_key, model="modèle-中文")
    text = receipt.canonical_json()
    obj = json.loads(text)
    assert text == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert list(obj) == sorted(obj)
    assert " " not in text
    assert "modèle-中文" in text  # raw UTF-8, not \u escapes
    assert receipt.canonical_bytes() == text.encode("utf-8")
    assert obj["type"] == "llm-node.usage-receipt"
    assert obj["version"] == 2
    assert obj["total_tokens"] == 42
    assert obj["amount"] == "210"
    assert obj["price_per_token"] == "5"
    assert obj["job_id"] == "42"
    assert obj["host_address"] == host_key.address
    assert canonical_json(obj) == text


@pytest.mark.parametrize(
    "price",
    [2**53 - 1, 2**53 + 1, 2**64 + 7, 2**256 - 1],
    ids=["2^53-1", "2^53+1", "2^64+7", "max"],
)
def test_amounts_are_exact_decimal_strings(price: int) -> None:
    receipt = make_receipt(None, prompt_tokens=7, completion_tokens=4, price_per_token=price)
    expected = 11 * price
    assert receipt.amount == expected
    obj = json.loads(receipt.canonical_json())
    assert isinstance(obj["amount"], str)
    assert isinstance(obj["price_per_token"], str)
    assert int(obj["amount"]) == expected
    assert int(obj["price_per_token"]) == price
    # The reason for strings: a double cannot carry these values.
    assert int(float(expected)) != expected


def test_signature_verifies_with_eth_account_and_own_verifier(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key), host_key)
    assert signed.signed
    assert signed.signature is not None
    assert len(signed.signature) == 65
    assert signed.signature[64] in (27, 28)
    text = signed.receipt.canonical_json()
    assert eth_recover(text, signed.signature) == host_key.address
    assert signed.signature_hex is not None
    assert eth_recover(text, "0x" + signed.signature_hex) == host_key.address
    assert recover_signer(signed.receipt.canonical_bytes(), signed.signature) == host_key.address
    verdict = verify_receipt(signed)
    assert verdict.status is VerificationStatus.VALID
    assert verdict.signer == host_key.address
    assert verdict.ok
    assert verify_receipt(signed, host_address=host_key.address.lower()).ok


def test_non_ascii_fields_sign_the_utf8_bytes(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key, model="λ-模型 🚀"), host_key)
    assert signed.signature is not None
    assert eth_recover(signed.receipt.canonical_json(), signed.signature) == host_key.address
    assert verify_receipt(signed).status is VerificationStatus.VALID


@pytest.mark.parametrize(
    "change",
    [
        {"completion_tokens": 31},
        {"price_per_token": 6},
        {"job_id": 43},
        {"end_reason": "shutdown"},
        {"sequence": 2},
        {"client_address": "0x" + "11" * 20},
    ],
)
def test_any_changed_field_breaks_the_signature(host_key: HostKey, change: dict[str, Any]) -> None:
    signed = sign_receipt(make_receipt(host_key), host_key)
    assert signed.signature is not None
    forged = SignedReceipt(attrs.evolve(signed.receipt, **change), signed.signature)
    verdict = verify_receipt(forged)
    assert verdict.status is VerificationStatus.INVALID
    assert not verdict.ok
    text = forged.receipt.canonical_json()
    assert eth_recover(text, signed.signature) != host_key.address


def test_pinned_host_address_must_match(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key), host_key)
    other = HostKey.generate()
    verdict = verify_receipt(signed, host_address=other.address)
    assert verdict.status is VerificationStatus.INVALID
    assert other.address in verdict.reason
    # A receipt that claims another host than the key that signed it.
    assert signed.signature is not None
    claimed = SignedReceipt(
        attrs.evolve(signed.receipt, host_address=other.address), signed.signature
    )
    verdict = verify_receipt(claimed)
    assert verdict.status is VerificationStatus.INVALID
    assert "signature is by" in verdict.reason
    other.wipe()


def test_unsigned_receipt_for_node_without_host_key() -> None:
    signed = sign_receipt(make_receipt(None), None)
    assert signed.signature is None
    assert not signed.signed
    assert signed.to_export()["signed"] is False
    assert signed.to_export()["signature"] is None
    verdict = verify_receipt(signed)
    assert verdict.status is VerificationStatus.UNSIGNED
    assert verdict.ok


def test_stripped_signature_is_invalid_not_unsigned(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key), host_key)
    stripped = SignedReceipt(signed.receipt, None)
    verdict = verify_receipt(stripped)
    assert verdict.status is VerificationStatus.INVALID
    assert "carries no signature" in verdict.reason
    orphan = SignedReceipt(make_receipt(None), signed.signature)
    assert verify_receipt(orphan).status is VerificationStatus.INVALID


def test_malformed_signatures_are_invalid_verdicts_not_exceptions(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key), host_key)
    sig = signed.signature
    assert sig is not None
    s = int.from_bytes(sig[32:64], "big")
    high_s = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((sig[64] ^ 1,))
    for bad in (b"\x00" * 65, sig[:64], sig[:64] + b"\x05", high_s):
        verdict = verify_receipt(SignedReceipt(signed.receipt, bad))
        assert verdict.status is VerificationStatus.INVALID
        assert verdict.reason.startswith("bad signature")


def test_sign_refuses_a_receipt_naming_another_host(host_key: HostKey) -> None:
    with pytest.raises(ReceiptError, match="not the signing key"):
        sign_receipt(make_receipt(None, host_address="0x" + "22" * 20), host_key)
    with pytest.raises(ReceiptError, match="must not name a host"):
        sign_receipt(make_receipt(host_key), None)


def test_json_and_export_round_trip(host_key: HostKey) -> None:
    signed = sign_receipt(make_receipt(host_key, job_id=None, price_per_token=2**256 - 1), host_key)
    exported = json.loads(json.dumps(signed.to_export()))
    again = SignedReceipt.from_export(exported)
    assert again == signed
    assert Receipt.from_canonical_json(signed.receipt.canonical_json()) == signed.receipt


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(amount="211"), "amount is not"),
        (lambda o: o.update(total_tokens=41), "total_tokens is not"),
        (lambda o: o.update(price_per_token=5), "decimal string"),
        (lambda o: o.update(price_per_token="05"), "decimal string"),
        (lambda o: o.update(job_id=42), "decimal string"),
        (lambda o: o.update(type="other"), "wrong type"),
        (lambda o: o.update(version=3), "unsupported receipt version"),
        (lambda o: o.update(version=True), "unsupported receipt version"),
        (lambda o: o.update(version=1), "unexpected"),
        (lambda o: o.update(ledger_epoch="AB" * 16), "ledger_epoch"),
        (lambda o: o.update(ledger_epoch=None), "ledger_epoch"),
        (lambda o: o.update(prev_hash="00" * 31), "prev_hash"),
        (lambda o: o.update(extra=1), "unexpected"),
        (lambda o: o.pop("model"), "missing"),
        (lambda o: o.update(encrypted=1), "must be a bool"),
        (lambda o: o.update(prompt_tokens="12"), "must be an int"),
    ],
)
def test_from_json_object_rejects_inconsistent_receipts(mutate: Any, message: str) -> None:
    obj = make_receipt(None).to_json_object()
    mutate(obj)
    with pytest.raises(ReceiptError, match=message):
        Receipt.from_json_object(obj)


def test_from_canonical_json_rejects_non_canonical_text() -> None:
    text = make_receipt(None).canonical_json()
    with pytest.raises(ReceiptError, match="canonical"):
        Receipt.from_canonical_json(json.dumps(json.loads(text), indent=1))
    with pytest.raises(ReceiptError, match="not JSON"):
        Receipt.from_canonical_json("{")
