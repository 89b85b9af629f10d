"""Wycheproof HKDF-SHA256 through node.crypto.kdf.hkdf_sha256 (every case)."""

from __future__ import annotations

from collections import Counter

import pytest

from node.crypto.errors import CryptoError
from node.crypto.kdf import ZERO_SALT, HkdfLengthError, hkdf_sha256, hkdf_sha256_fast32
from tests.crypto._wycheproof import Case, load_cases, params

DATA, CASES = load_cases("hkdf_sha256_test.json")


def inexpressible(case: Case) -> str | None:
    """Why our API cannot take this case, or None. Every field maps onto a keyword today:
    ikm/salt/info are byte strings and size is the ``length`` int."""
    if not isinstance(case.test["size"], int):
        return "size is not an integer"
    return None


def run_case(case: Case) -> str:
    reason = inexpressible(case)
    if reason is not None:
        return f"skipped: {reason}"
    ikm, salt, info = case.hex("ikm"), case.hex("salt"), case.hex("info")
    size = case.test["size"]
    if case.result == "valid":
        out = hkdf_sha256(ikm, salt=salt, info=info, length=size)
        assert isinstance(out, bytearray)
        assert out.hex() == case.test["okm"]
        if not salt:  # EmptySalt: "no salt" is the same as 32 zero bytes
            assert hkdf_sha256(ikm, salt=ZERO_SALT, info=info, length=size) == out
        return "valid: okm matches"
    assert case.result == "invalid"
    assert "SizeTooLarge" in case.flags
    with pytest.raises(HkdfLengthError) as exc:
        hkdf_sha256(ikm, salt=salt, info=info, length=size)
    assert isinstance(exc.value, CryptoError)
    return "invalid: SizeTooLarge raised"


@pytest.mark.parametrize("case", params(CASES))
def test_case(case: Case) -> None:
    reason = inexpressible(case)
    if reason is not None:
        pytest.skip(reason)
    run_case(case)


def test_summary_counts() -> None:
    counts = Counter(run_case(case) for case in CASES)
    # No case needs skipping: the skip count is asserted to be exactly zero.
    assert sum(n for k, n in counts.items() if k.startswith("skipped")) == 0
    assert counts == {"valid: okm matches": 83, "invalid: SizeTooLarge raised": 3}


def test_rfc5869_a1_is_tc1() -> None:
    assert CASES[0].tc_id == 1
    assert run_case(CASES[0]) == "valid: okm matches"


@pytest.mark.parametrize("length", [-1, 255 * 32 + 1])
def test_length_bounds(length: int) -> None:
    with pytest.raises(HkdfLengthError):
        hkdf_sha256(b"ikm", length=length)


def test_zero_length_and_maximum() -> None:
    assert hkdf_sha256(b"ikm", length=0) == bytearray()
    assert len(hkdf_sha256(b"ikm", length=255 * 32)) == 255 * 32


@pytest.mark.parametrize("ikm", [b"", b"\x00" * 32, bytes(range(32)), b"x" * 100])
def test_fast32_equals_general_protocol_case(ikm: bytes) -> None:
    assert hkdf_sha256_fast32(ikm) == hkdf_sha256(ikm, salt=ZERO_SALT, info=b"", length=32)
    assert hkdf_sha256_fast32(ikm) == hkdf_sha256(ikm)
