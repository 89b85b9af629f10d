"""node.crypto.secp: the init's elliptic-curve steps straight on libsecp256k1.

The Wycheproof files run every ECDH and recovery case through these functions and the
general ones side by side (test_wycheproof_*); here: the encodings refused before the
library sees them, agreement on random keys, and the wiping of what held the shared point.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from coincurve import PrivateKey, PublicKey

from node.crypto import secp
from node.crypto.errors import InvalidPublicKey, InvalidSignature
from node.crypto.hostkey import HostKey


def _scalar() -> bytearray:
    return bytearray(PrivateKey().secret)


@pytest.mark.parametrize("compressed", [True, False])
def test_ecdh_agrees_with_coincurve(compressed: bool) -> None:
    for _ in range(20):
        scalar = _scalar()
        peer = PrivateKey().public_key
        x, form = secp.ecdh_x(scalar, peer.format(compressed=compressed))
        with x:
            expected = peer.multiply(bytes(scalar)).format(compressed=True)[1:]
            assert x.equals(expected)
        assert form == peer.format(compressed=True)


def test_host_key_ecdh_matches_the_client_side() -> None:
    host = HostKey.generate()
    client = PrivateKey()
    x, form = host.ecdh_x_sec1(client.public_key.format(compressed=False))
    with x:
        assert x.equals(PublicKey(host.public_key).multiply(client.secret).format()[1:])
    assert form == client.public_key.format()


def _point(prefix: int) -> bytes:
    full = PrivateKey().public_key.format(compressed=False)
    return bytes((prefix,)) + full[1:]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "must be 33 or 65 bytes, got 0"),
        (b"\x02" * 32, "got 32"),
        (b"\x02" * 34, "got 34"),
        (b"\x04" * 64, "got 64"),
        (b"\x04" * 66, "got 66"),
        (b"\x04" + PrivateKey().public_key.format()[1:], "must start with 02 or 03"),
        (b"\x00" * 33, "must start with 02 or 03"),
        (PrivateKey().public_key.format()[:1] + bytes(31) + b"\x05", "not a point"),
    ],
)
def test_bad_encodings_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidPublicKey, match=match) as info:
        secp.ecdh_x(_scalar(), data, field="ephPubHex")
    assert info.value.message.startswith("ephPubHex: ")


@pytest.mark.parametrize("prefix", [2, 3, 5, 6, 7])
def test_only_04_opens_a_65_byte_key(prefix: int) -> None:
    # 06/07 (hybrid) would parse in libsecp256k1 when the parity matches: refused first.
    full = PrivateKey().public_key.format(compressed=False)
    for hybrid in (6 | (full[64] & 1), prefix):
        with pytest.raises(InvalidPublicKey, match="must start with 04"):
            secp.ecdh_x(_scalar(), bytes((hybrid,)) + full[1:])


def test_not_on_the_curve_uncompressed() -> None:
    full = bytearray(PrivateKey().public_key.format(compressed=False))
    full[64] ^= 1  # y changed: off the curve
    with pytest.raises(InvalidPublicKey, match="not a point on secp256k1"):
        secp.ecdh_x(_scalar(), bytes(full))


class _Recorder:
    """coincurve's ffi, recording every buffer ``new`` makes."""

    def __init__(self, ffi: Any) -> None:
        self._ffi = ffi
        self.made: list[tuple[str, Any]] = []

    def new(self, kind: str, *args: Any) -> Any:
        obj = self._ffi.new(kind, *args)
        self.made.append((kind, obj))
        return obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ffi, name)


def test_the_shared_point_and_its_bytes_are_wiped(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(secp._ffi)
    monkeypatch.setattr(secp, "_ffi", recorder)
    x, _ = secp.ecdh_x(_scalar(), PrivateKey().public_key.format())
    x.wipe()
    held = [(kind, obj) for kind, obj in recorder.made if kind != "size_t *"]
    assert {kind for kind, _ in held} == {"secp256k1_pubkey *", "unsigned char[33]"}
    for kind, obj in held:
        size = recorder._ffi.sizeof(obj[0]) if kind.endswith("*") else len(obj)
        assert bytes(recorder._ffi.buffer(obj, size)) == bytes(size), kind


def test_the_scalar_is_read_in_place_not_changed() -> None:
    scalar = _scalar()
    before = bytes(scalar)
    secp.ecdh_x(scalar, PrivateKey().public_key.format())[0].wipe()
    assert scalar == before


def test_recover_agrees_with_coincurve() -> None:
    for _ in range(20):
        key = PrivateKey()
        digest = os.urandom(32)
        sig = key.sign_recoverable(digest, hasher=None)
        assert secp.recover_uncompressed(digest, sig) == key.public_key.format(compressed=False)
        wallet = sig[:64] + bytes((sig[64] + 27,))
        assert secp.recover_uncompressed(digest, wallet) == key.public_key.format(compressed=False)


def test_recover_refuses_a_bad_digest_size() -> None:
    sig = PrivateKey().sign_recoverable(bytes(32), hasher=None)
    with pytest.raises(InvalidSignature, match="digest must be 32 bytes"):
        secp.recover_uncompressed(bytes(31), sig)
