"""Wycheproof secp256k1 ECDH (JWK keys), every case through both ECDH paths: the general
one (parse_public_key + ecdh_x over coincurve's objects) and the init's own
(node.crypto.secp.ecdh_x, straight on libsecp256k1).

Our API takes raw SEC1 points, so each JWK public key is turned into ``04||x||y`` and into
its compressed form. The JWK ``crv`` label is checked here, at the JWK boundary, because a
SEC1 point carries no curve name.
"""

from __future__ import annotations

from collections import Counter

import pytest

from node.crypto import HostKey, SecretBytes, derive_shared_key, secp
from node.crypto.curve import ecdh_x, parse_public_key
from node.crypto.errors import InvalidPublicKey
from node.crypto.kdf import ZERO_SALT, hkdf_sha256
from tests.crypto._wycheproof import Case, b64url, load_cases, params

DATA, CASES = load_cases("ecdh_secp256k1_webcrypto_test.json")


def sec1_forms(case: Case) -> tuple[bytes, bytes]:
    """(uncompressed, compressed) SEC1 encodings of the case's JWK public key."""
    jwk = case.test["public"]
    x, y = b64url(jwk["x"]), b64url(jwk["y"])
    compressed = bytes((2 + (y[-1] & 1),)) + x
    return b"\x04" + x + y, compressed


def scalar(case: Case) -> bytes:
    d = b64url(case.test["private"]["d"])
    assert len(d) <= 32
    return d.rjust(32, b"\x00")


def attempt(case: Case, point_bytes: bytes) -> str:
    """'reject' (InvalidPublicKey), 'match' or 'mismatch' for one encoding; both paths
    must give the same answer."""
    try:
        point = parse_public_key(point_bytes)
    except InvalidPublicKey as exc:
        code = exc.code
    else:
        code = None
    if code is not None:  # the other path refuses it too, with the same code
        with pytest.raises(InvalidPublicKey) as info:
            secp.ecdh_x(bytearray(scalar(case)), point_bytes)
        assert info.value.code == code == "INVALID_PAYLOAD"
        return "reject"
    direct, compressed = secp.ecdh_x(bytearray(scalar(case)), point_bytes)
    assert compressed == point.format(compressed=True)
    with ecdh_x(scalar(case), point) as shared, direct:
        assert len(shared) == 32
        assert shared.equals(direct)
        return "match" if shared.equals(bytes.fromhex(case.test["shared"])) else "mismatch"


def run_case(case: Case) -> str:
    uncompressed, compressed = sec1_forms(case)
    got_u, got_c = attempt(case, uncompressed), attempt(case, compressed)
    crv_ok = case.test["public"]["crv"] == "P-256K"
    if case.result == "valid":
        assert crv_ok
        assert (got_u, got_c) == ("match", "match")
        return "valid: both encodings match"
    assert case.result == "invalid"
    if not crv_ok:
        # Refused at the JWK layer whatever the point is. Record what the point alone gives.
        return f"invalid: JWK crv refused (point alone: {got_u}/{got_c})"
    # The uncompressed point is what the file tests; it must never yield the shared secret.
    assert got_u in ("reject", "mismatch")
    # Compressing an off-curve (x, y) keeps only x; a valid point with that x is a different
    # point, so it must not give the expected secret either.
    assert got_c in ("reject", "mismatch")
    return f"invalid: {got_u}/{got_c}"


@pytest.mark.parametrize("case", params(CASES))
def test_case(case: Case) -> None:
    run_case(case)


def test_summary_counts() -> None:
    counts = Counter(run_case(case) for case in CASES)
    assert counts == {
        "valid: both encodings match": 473,
        # every on-curve-labelled invalid point is refused by parse_public_key
        "invalid: reject/reject": 13,
        "invalid: reject/mismatch": 5,
        # tcId 490: crv P-256 but the point happens to lie on secp256k1 too
        "invalid: JWK crv refused (point alone: match/match)": 1,
        "invalid: JWK crv refused (point alone: reject/mismatch)": 1,
        "invalid: JWK crv refused (point alone: reject/reject)": 3,
    }


VALID = [case for case in CASES if case.result == "valid"]
SAMPLE = VALID[:: len(VALID) // 12][:12]


@pytest.mark.parametrize("case", params(SAMPLE))
@pytest.mark.parametrize("form", ["uncompressed", "compressed"])
def test_derive_shared_key_is_hkdf_of_x_coordinate(case: Case, form: str) -> None:
    uncompressed, compressed = sec1_forms(case)
    host = HostKey(SecretBytes(scalar(case)))
    peer = uncompressed if form == "uncompressed" else compressed
    expected = hkdf_sha256(bytes.fromhex(case.test["shared"]), salt=ZERO_SALT, info=b"")
    with derive_shared_key(peer, host) as key:
        assert len(key) == 32
        assert key.equals(expected)


def test_derive_shared_key_refuses_invalid_point() -> None:
    host = HostKey(SecretBytes(scalar(VALID[0])))
    bad = next(case for case in CASES if "InvalidCurveAttack" in case.flags)
    with pytest.raises(InvalidPublicKey):
        derive_shared_key(sec1_forms(bad)[0], host)
