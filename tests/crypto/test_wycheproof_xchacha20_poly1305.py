"""Wycheproof XChaCha20-Poly1305 through node.crypto.aead.seal/open (every case)."""

from __future__ import annotations

from collections import Counter

import pytest

from node.crypto import aead
from node.crypto.errors import CryptoError, DecryptionFailed, InvalidNonceSize
from tests.crypto._wycheproof import Case, load_cases, params

DATA, CASES = load_cases("xchacha20_poly1305_test.json")


def run_case(case: Case) -> str:
    """Check one case against our policy; return its outcome class."""
    key, iv, aad, msg = case.hex("key"), case.hex("iv"), case.hex("aad"), case.hex("msg")
    wire = case.hex("ct") + case.hex("tag")
    if case.result == "valid":
        assert aead.seal(key, iv, msg, aad) == wire
        assert aead.open(key, iv, wire, aad) == msg
        assert aead.open_secret(key, iv, wire, aad).equals(msg)
        return "valid: seal and open match"
    assert case.result == "invalid"
    if "InvalidNonceSize" in case.flags:
        assert len(iv) != aead.NONCE_SIZE
        with pytest.raises(InvalidNonceSize):
            aead.open(key, iv, wire, aad)
        with pytest.raises(InvalidNonceSize):
            aead.seal(key, iv, msg, aad)
        return "invalid: InvalidNonceSize"
    with pytest.raises(CryptoError) as info:
        aead.open(key, iv, wire, aad)
    assert isinstance(info.value, DecryptionFailed)
    return "invalid: DecryptionFailed"


@pytest.mark.parametrize("case", params(CASES))
def test_case(case: Case) -> None:
    run_case(case)


def test_summary_counts() -> None:
    assert DATA["algorithm"] == "XCHACHA20-POLY1305"
    counts = Counter(run_case(case) for case in CASES)
    assert counts == {
        "valid: seal and open match": 246,
        "invalid: DecryptionFailed": 60,
        "invalid: InvalidNonceSize": 9,
    }


def test_known_answer_vector_is_tc1() -> None:
    assert CASES[0].tc_id == 1
    assert "Ktv" in CASES[0].flags
    assert run_case(CASES[0]) == "valid: seal and open match"
