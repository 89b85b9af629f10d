"""Edges of the primitives: points, addresses, EIP-191, AEAD sizes, hex decoding."""

from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey
from Crypto.Hash import keccak
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address as eth_checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from node.crypto import HostKey, SecretBytes, aead, derive_shared_key
from node.crypto.curve import (
    address_of,
    address_of_uncompressed,
    compress_sec1,
    e2ee_v1_digest,
    ecdh_x,
    eip191_digest,
    keccak256,
    parse_public_key,
    recover_public_key,
    sign_recoverable,
    to_checksum_address,
)
from node.crypto.encoding import decode_hex, decode_hex_into_bytearray, encode_hex
from node.crypto.errors import (
    DecryptionFailed,
    ErrorCode,
    InvalidCiphertext,
    InvalidHexEncoding,
    InvalidKeySize,
    InvalidNonceSize,
    InvalidPublicKey,
)
from tests.crypto._frames import e2ee_digest

KEY = PrivateKey(bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"))

# ------------------------------------------------------------------ points


def test_parse_public_key_both_forms_same_point() -> None:
    compressed = KEY.public_key.format(compressed=True)
    uncompressed = KEY.public_key.format(compressed=False)
    assert parse_public_key(compressed).format() == compressed
    assert parse_public_key(bytearray(uncompressed)).format() == compressed


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "33 or 65 bytes"),
        (b"\x02" * 32, "33 or 65 bytes"),
        (b"\x04" * 64, "33 or 65 bytes"),
        (b"\x04" + b"\x01" * 32, "start with 02 or 03"),
        (b"\x00" * 33, "start with 02 or 03"),
        (b"\x02" + b"\x01" * 64, "start with 04"),
        (b"\x06" + b"\x01" * 64, "start with 04"),
        (b"\x07" + b"\x01" * 64, "start with 04"),
        (b"\x04" + b"\x01" * 64, "not a point"),
        (b"\x02" + b"\xff" * 32, "not a point"),
    ],
)
def test_parse_public_key_rejects(data: bytes, match: str) -> None:
    with pytest.raises(InvalidPublicKey, match=match) as info:
        parse_public_key(data, field="peerKey")
    assert info.value.message.startswith("peerKey: ")
    assert info.value.code == ErrorCode.INVALID_PAYLOAD


def test_hybrid_encoding_of_valid_point_refused() -> None:
    uncompressed = KEY.public_key.format(compressed=False)
    hybrid = bytes((6 + (uncompressed[-1] & 1),)) + uncompressed[1:]
    with pytest.raises(InvalidPublicKey):
        parse_public_key(hybrid)


def test_ecdh_is_symmetric_and_unhashed() -> None:
    other = PrivateKey(bytes.fromhex("11" * 32))
    ours = ecdh_x(KEY.secret, other.public_key)
    theirs = ecdh_x(bytearray(other.secret), KEY.public_key)
    assert ours.equals(theirs)
    # x-coordinate of d*P, not libsecp256k1's default hashed ECDH
    assert ours.equals(other.public_key.multiply(KEY.secret).format()[1:])
    assert not ours.equals(KEY.ecdh(other.public_key.format()))


def test_derive_shared_key_agrees_both_ways() -> None:
    a, b = HostKey.generate(), HostKey.generate()
    with derive_shared_key(b.public_key, a) as k1, derive_shared_key(b.public_key, a) as k2:
        assert k1.equals(k2)
        assert k1.equals(derive_shared_key(a.public_key, b))


# ------------------------------------------------------------------ addresses, EIP-191


@pytest.mark.parametrize("seed", range(8))
def test_address_matches_eth_account(seed: int) -> None:
    key = PrivateKey(hashlib.sha256(bytes([seed])).digest())
    expected = Account.from_key(key.secret).address
    assert address_of(key.public_key) == expected
    assert address_of(key.public_key.format(compressed=True)) == expected
    assert address_of(key.public_key.format(compressed=False)) == expected


@pytest.mark.parametrize("raw", [bytes(20), b"\xff" * 20, bytes(range(20)), b"\xab" * 20])
def test_checksum_matches_eth_utils(raw: bytes) -> None:
    assert to_checksum_address(raw) == eth_checksum("0x" + raw.hex())


@settings(max_examples=300)
@given(raw=st.binary(min_size=20, max_size=20))
def test_checksum_matches_eth_utils_everywhere(raw: bytes) -> None:
    assert to_checksum_address(raw) == eth_checksum("0x" + raw.hex())


@pytest.mark.parametrize("size", [19, 21, 0])
def test_checksum_needs_20_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        to_checksum_address(bytes(size))


@settings(max_examples=200)
@given(data=st.binary(max_size=400))
def test_keccak256_matches_pycryptodome(data: bytes) -> None:
    """The reused per-thread state gives the library's digest for any length (several
    blocks of 136 bytes too), and for bytearray input."""
    expected = keccak.new(digest_bits=256, data=data).digest()
    assert keccak256(data) == expected
    assert keccak256(bytearray(data)) == expected
    assert keccak256(data) == expected  # the state was reset, not carried over


def test_keccak256_per_thread() -> None:
    import threading

    got: list[bytes] = []
    worker = threading.Thread(target=lambda: got.append(keccak256(b"abc")))
    worker.start()
    worker.join()
    assert got == [keccak.new(digest_bits=256, data=b"abc").digest()] == [keccak256(b"abc")]


def test_address_helpers_agree() -> None:
    full = KEY.public_key.format(compressed=False)
    assert compress_sec1(full) == KEY.public_key.format(compressed=True)
    assert address_of_uncompressed(full) == address_of(KEY.public_key)
    assert address_of(KEY.public_key) == Account.from_key(KEY.secret).address


def test_keccak256_known_answer() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


@pytest.mark.parametrize("message", [b"", b"hello", "héllo ✓".encode(), b"x" * 1000])
def test_personal_message_signature_matches_eth_account(message: bytes) -> None:
    host = HostKey(SecretBytes(KEY.secret))
    sig = host.sign_personal_message(message)
    assert Account.recover_message(encode_defunct(primitive=message), signature=sig) == host.address
    expected = Account.sign_message(encode_defunct(primitive=message), KEY.secret)
    assert sig == bytes(expected.signature)
    assert address_of(recover_public_key(eip191_digest(message), sig)) == host.address


def test_sign_recoverable_needs_32_byte_digest() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        sign_recoverable(KEY, b"\x00" * 33)


@pytest.mark.parametrize("aad", [b"", b"a", b"message_0"])
def test_e2ee_v1_digest_matches_protocol_text(aad: bytes) -> None:
    eph, host, nonce = b"\x02" + b"\x01" * 32, b"\x03" + b"\x02" * 32, b"\x05" * 24
    ours = e2ee_v1_digest(eph, host, bytes(32), nonce, b"", aad)
    assert ours == e2ee_digest(eph, host, nonce, aad)
    if aad:
        assert ours != e2ee_v1_digest(eph, host, bytes(32), nonce, b"", b"")


# ------------------------------------------------------------------ AEAD sizes

K, N = bytes(range(32)), bytes(range(24))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_aead_key_size(size: int) -> None:
    with pytest.raises(InvalidKeySize) as info:
        aead.seal(b"\x01" * size, N, b"m")
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    with pytest.raises(InvalidKeySize):
        aead.open(SecretBytes(b"\x01" * size), N, b"\x00" * 20)


@pytest.mark.parametrize("size", [0, 1, 15])
def test_aead_ciphertext_shorter_than_tag(size: int) -> None:
    with pytest.raises(InvalidCiphertext) as info:
        aead.open(K, N, b"\x00" * size)
    assert info.value.code == ErrorCode.INVALID_PAYLOAD


def test_aead_empty_message_is_just_a_tag() -> None:
    wire = aead.seal(SecretBytes(K), N, b"")
    assert len(wire) == 16
    assert aead.open(K, N, wire) == b""
    with aead.open_secret(K, N, wire) as out:
        assert len(out) == 0


def test_aead_nonce_size_checked_before_anything() -> None:
    with pytest.raises(InvalidNonceSize):
        aead.open(K, N[:-1], b"")
    with pytest.raises(InvalidNonceSize):
        aead.seal(K, N + b"\x00", b"m")


def test_aead_wrong_key_or_aad() -> None:
    wire = aead.seal(K, N, b"secret words", b"chunk_0")
    with pytest.raises(DecryptionFailed) as info:
        aead.open(bytes(32), N, wire, b"chunk_0")
    assert "secret words" not in info.value.message
    with pytest.raises(DecryptionFailed):
        aead.open(K, N, wire, b"chunk_1")


# ------------------------------------------------------------------ hex


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("0x", b""), ("00ff", b"\x00\xff"), ("0X00FF", b"\x00\xff"), ("aBcD", b"\xab\xcd")],
)
def test_decode_hex_accepts(text: str, expected: bytes) -> None:
    assert decode_hex(text, "f") == expected
    out = decode_hex_into_bytearray(text, "f")
    assert isinstance(out, bytearray)
    assert out == expected


@pytest.mark.parametrize("text", ["0", "0x0", "zz", "0x0x00", " 00", "00 ", "0\u0660", "+0"])
def test_decode_hex_rejects(text: str) -> None:
    for decode in (decode_hex, decode_hex_into_bytearray):
        with pytest.raises(InvalidHexEncoding) as info:
            decode(text, "someField")
        assert info.value.code == ErrorCode.INVALID_HEX_ENCODING
        assert info.value.message.startswith("someField: ")


def test_encode_hex_lowercase_no_prefix() -> None:
    assert encode_hex(b"\xab\xcd") == "abcd"
    assert encode_hex(bytearray(b"\x01")) == "01"
    assert encode_hex(memoryview(b"")) == ""
