"""Wycheproof secp256k1 ECDSA (P1363 r||s) turned into public-key recovery tests.

digest = SHA256(msg). A valid low-S case must recover the group's key with exactly one v
in {0, 1}; an invalid case must raise InvalidSignature or recover some other key; a high-S
case (s > n/2) must raise InvalidSignature even when the file calls it valid (EIP-2).
Every case runs through both recovery paths: ``recover_public_key`` (coincurve's objects)
and ``node.crypto.secp.recover_uncompressed`` (the init's, straight on libsecp256k1); they
must agree.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from node.crypto import secp
from node.crypto.curve import HALF_N, SECP256K1_N
from node.crypto.curve import recover_public_key as _recover_public_key
from node.crypto.errors import InvalidSignature
from tests.crypto._wycheproof import Case, load_cases, params

SECP256K1_P = 2**256 - 2**32 - 977

DATA, CASES = load_cases("ecdsa_secp256k1_sha256_p1363_test.json")


class _Recovered:
    def __init__(self, full: bytes) -> None:
        self.full = full

    def format(self, compressed: bool = True) -> bytes:
        if compressed:
            return bytes((2 | (self.full[64] & 1),)) + self.full[1:33]
        return self.full


def recover_public_key(digest: bytes, signature: bytes) -> _Recovered:
    """Both paths: the same key, or the same InvalidSignature message."""
    try:
        general = _recover_public_key(digest, signature).format(compressed=False)
    except InvalidSignature as exc:
        refusal = exc
    else:
        assert secp.recover_uncompressed(digest, signature) == general
        return _Recovered(general)
    with pytest.raises(InvalidSignature) as info:
        secp.recover_uncompressed(digest, signature)
    assert info.value.message == refusal.message
    raise refusal


def group_key(case: Case) -> bytes:
    return bytes.fromhex(case.group["publicKey"]["uncompressed"])


def digest(case: Case) -> bytes:
    return hashlib.sha256(case.hex("msg")).digest()


def try_recover(case: Case, sig: bytes, v: int) -> bool | None:
    """True: recovers the group key; False: another key; None: InvalidSignature."""
    try:
        key = recover_public_key(digest(case), sig + bytes((v,)))
    except InvalidSignature as exc:
        code = exc.code
    else:
        return key.format(compressed=False) == group_key(case)
    assert code == "INVALID_SIGNATURE"
    return None


def is_high_s(sig: bytes) -> bool:
    return len(sig) == 64 and int.from_bytes(sig[32:], "big") > HALF_N


def run_case(case: Case) -> str:
    sig = case.hex("sig")
    outcomes = [try_recover(case, sig, v) for v in (0, 1)]
    # The wallet forms 27/28 behave exactly like 0/1.
    assert [try_recover(case, sig, v) for v in (27, 28)] == outcomes
    if is_high_s(sig):
        assert outcomes == [None, None]
        if case.result == "valid":
            # The same signature in low-S form (s -> n - s, v flipped) is accepted ...
            s = int.from_bytes(sig[32:], "big")
            low = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big")
            low_outcomes = [try_recover(case, low, v) for v in (0, 1)]
            if True not in low_outcomes:
                # ... unless x(R) = r + n: that needs recovery id 2/3, which a 65-byte
                # Ethereum signature cannot express (only possible for r < p - n).
                assert int.from_bytes(sig[:32], "big") < SECP256K1_P - SECP256K1_N
                return "valid high-S: rejected (x(R) >= n, low-S form not recoverable)"
            assert low_outcomes.count(True) == 1
        return f"{case.result} high-S: rejected"
    if case.result == "valid":
        assert outcomes.count(True) == 1
        return f"valid low-S: recovers with v={outcomes.index(True)}"
    assert case.result == "invalid"
    assert True not in outcomes
    return "invalid: raised" if outcomes == [None, None] else "invalid: no match"


@pytest.mark.parametrize("case", params(CASES))
def test_case(case: Case) -> None:
    run_case(case)


def test_summary_counts() -> None:
    counts = Counter(run_case(case) for case in CASES)
    assert counts == {
        "valid low-S: recovers with v=0": 29,
        "valid low-S: recovers with v=1": 66,
        "valid high-S: rejected": 70,
        "valid high-S: rejected (x(R) >= n, low-S form not recoverable)": 2,  # tcId 115, 247
        "invalid high-S: rejected": 44,
        "invalid: raised": 35,
        "invalid: no match": 6,
    }


def test_tc1_is_high_s_and_rejected() -> None:
    assert CASES[0].tc_id == 1
    assert CASES[0].result == "valid"
    assert run_case(CASES[0]) == "valid high-S: rejected"


FIRST_LOW_S = next(c for c in CASES if c.result == "valid" and not is_high_s(c.hex("sig")))


def _good_v() -> int:
    sig = FIRST_LOW_S.hex("sig")
    return next(v for v in (0, 1) if try_recover(FIRST_LOW_S, sig, v))


def test_wallet_v_forms_27_28_accepted() -> None:
    sig = FIRST_LOW_S.hex("sig")
    v = _good_v()
    plain = recover_public_key(digest(FIRST_LOW_S), sig + bytes((v,)))
    wallet = recover_public_key(digest(FIRST_LOW_S), sig + bytes((v + 27,)))
    assert plain.format() == wallet.format()
    assert wallet.format(compressed=False) == group_key(FIRST_LOW_S)
    # the other parity, in either form, does not give the group key
    assert try_recover(FIRST_LOW_S, sig, 1 - v) in (False, None)
    assert try_recover(FIRST_LOW_S, sig, 28 - v) in (False, None)


@pytest.mark.parametrize("v", [2, 3, 4, 26, 29, 30, 35, 36, 255])
def test_other_v_values_rejected(v: int) -> None:
    with pytest.raises(InvalidSignature, match="v must be"):
        recover_public_key(digest(FIRST_LOW_S), FIRST_LOW_S.hex("sig") + bytes((v,)))


def _with(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    ("r_value", "s_value", "match"),
    [
        (0, 1, "r is out of range"),
        (1, 0, "s is out of range"),
        (SECP256K1_N, 1, "r is out of range"),
        (SECP256K1_N + 1, 1, "r is out of range"),
        (2**256 - 1, 1, "r is out of range"),
        (1, SECP256K1_N, "s is out of range"),
        (1, 2**256 - 1, "s is out of range"),
        (1, HALF_N + 1, "high-S"),
        (1, SECP256K1_N - 1, "high-S"),
    ],
)
@pytest.mark.parametrize("v", [0, 1, 27, 28])
def test_out_of_range_r_s_rejected(r_value: int, s_value: int, match: str, v: int) -> None:
    with pytest.raises(InvalidSignature, match=match):
        recover_public_key(digest(FIRST_LOW_S), _with(r_value, s_value) + bytes((v,)))


def test_s_equal_half_n_is_allowed_by_the_range_check() -> None:
    # s == n/2 (floor) is the largest low-S value; it must not be refused as high-S.
    sig = _with(int.from_bytes(FIRST_LOW_S.hex("sig")[:32], "big"), HALF_N)
    for v in (0, 1):
        message = ""
        try:
            recover_public_key(digest(FIRST_LOW_S), sig + bytes((v,)))
        except InvalidSignature as exc:
            message = exc.message
        assert "high-S" not in message
        assert "range" not in message


@pytest.mark.parametrize("size", [0, 32, 64, 66, 130])
def test_wrong_signature_size_rejected(size: int) -> None:
    with pytest.raises(InvalidSignature, match="65 bytes"):
        recover_public_key(digest(FIRST_LOW_S), b"\x01" * size)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_wrong_digest_size_rejected(size: int) -> None:
    with pytest.raises(InvalidSignature, match="digest"):
        recover_public_key(b"\x00" * size, FIRST_LOW_S.hex("sig") + b"\x00")


def test_r_with_no_point_on_curve_raises() -> None:
    # x = 5 has no point on secp256k1 (5^3 + 7 = 132 is a non-residue mod p).
    with pytest.raises(InvalidSignature, match="no public key"):
        recover_public_key(digest(FIRST_LOW_S), _with(5, 1) + b"\x00")
