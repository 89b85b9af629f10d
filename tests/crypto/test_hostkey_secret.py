"""HOST_PRIVATE_KEY loading, HostKey behaviour, and the SecretBytes container."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
from eth_account import Account

from node.crypto import HostKey, SecretBytes, constant_time_equal
from node.crypto.curve import SECP256K1_N, parse_public_key, recover_public_key
from node.crypto.errors import ErrorCode, HostKeyError, NodeError
from node.crypto.hostkey import ENV_VAR

VALID_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
N_MINUS_1 = f"{SECP256K1_N - 1:064x}"


# ------------------------------------------------------------------ loading table

BAD_VALUES = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="whitespace-only"),
    pytest.param(VALID_HEX, id="no-0x"),
    pytest.param("00" + VALID_HEX, id="00-instead-of-0x"),
    pytest.param("0x", id="prefix-only"),
    pytest.param("0x" + VALID_HEX[:-2], id="short-62"),
    pytest.param("0x" + VALID_HEX[:-1], id="short-63-odd"),
    pytest.param("0x" + VALID_HEX + "00", id="long-66"),
    pytest.param("0x" + VALID_HEX + "0", id="long-65"),
    pytest.param("0x" + VALID_HEX[:-1] + "g", id="non-hex-g"),
    pytest.param("0x" + VALID_HEX[:-1] + "\u0660", id="non-ascii-digit"),
    pytest.param("0x" + VALID_HEX[:30] + "  " + VALID_HEX[32:], id="inner-space"),
    pytest.param("0x" + VALID_HEX[:-2] + "0x", id="inner-0x"),
    pytest.param("0x" + "00" * 32, id="zero"),
    pytest.param(f"0x{SECP256K1_N:064x}", id="equal-n"),
    pytest.param(f"0x{SECP256K1_N + 1:064x}", id="n-plus-1"),
    pytest.param("0x" + "ff" * 32, id="all-ff"),
]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_host_key_values(value: str) -> None:
    with pytest.raises(HostKeyError) as info:
        HostKey.from_env({ENV_VAR: value})
    error = info.value
    assert isinstance(error, NodeError)
    assert error.code == ErrorCode.INTERNAL_ERROR
    assert ENV_VAR in error.message
    text = str(error) + repr(error) + error.message
    stripped = value.strip()
    if len(stripped) > 2:  # "" / "0x" are substrings of any text; the rest must not appear
        assert stripped not in text
        assert stripped[2:] not in text
    assert VALID_HEX[:16] not in text


def test_missing_means_plaintext_only() -> None:
    assert HostKey.from_env({}) is None
    assert HostKey.from_env({"OTHER": "0x" + VALID_HEX}) is None


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert HostKey.from_env() is None
    monkeypatch.setenv(ENV_VAR, "0x" + VALID_HEX)
    key = HostKey.from_env()
    assert key is not None
    assert key.address == Account.from_key("0x" + VALID_HEX).address


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0x" + VALID_HEX, id="lower"),
        pytest.param("0X" + VALID_HEX.upper(), id="upper-0X"),
        pytest.param("  0x" + VALID_HEX + "\n", id="surrounding-whitespace"),
        pytest.param("0x" + N_MINUS_1, id="n-minus-1"),
        pytest.param("0x" + "00" * 31 + "01", id="one"),
    ],
)
def test_good_host_key_values(value: str) -> None:
    key = HostKey.from_env({ENV_VAR: value})
    assert key is not None
    expected = Account.from_key(bytes.fromhex(value.strip()[2:]))
    assert key.address == expected.address
    assert len(key.public_key) == 33
    assert key.public_key_hex == key.public_key.hex()
    assert key.private_key_hex() == "0x" + value.strip()[2:].lower()


@pytest.mark.parametrize("scalar", [0, SECP256K1_N, 2**256 - 1])
def test_constructor_rejects_out_of_range_and_wipes(scalar: int) -> None:
    secret = SecretBytes(scalar.to_bytes(32, "big"))
    with pytest.raises(HostKeyError):
        HostKey(secret)
    assert secret.wiped
    assert secret.is_all_zero()


# ------------------------------------------------------------------ HostKey behaviour


@pytest.fixture
def host() -> HostKey:
    return HostKey.parse("0x" + VALID_HEX)


def test_host_key_repr_is_redacted(host: HostKey) -> None:
    for text in (repr(host), str(host), f"{host}", f"{host!r}"):
        assert VALID_HEX not in text.lower()
        assert VALID_HEX[:8] not in text.lower()
        assert "redacted" in text
        assert host.address in text


def test_host_key_cannot_be_pickled_or_copied(host: HostKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(host)
    with pytest.raises(TypeError):
        copy.copy(host)


def test_sign_challenge_recovers_to_host(host: HostKey) -> None:
    challenge = b"nonce-from-client"
    sig = host.sign_challenge(challenge)
    recovered = recover_public_key(hashlib.sha256(challenge).digest(), sig)
    assert recovered.format() == host.public_key


def test_sign_digest_rejects_wrong_length(host: HostKey) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        host.sign_digest(b"\x00" * 31)


def test_wipe(host: HostKey) -> None:
    buffer = host._scalar.buffer_for_tests()
    assert not host.wiped
    host.wipe()
    assert host.wiped
    assert not any(buffer)
    with pytest.raises(HostKeyError, match="wiped"):
        host.sign_digest(b"\x00" * 32)
    with pytest.raises(HostKeyError, match="wiped"):
        host.ecdh_x(parse_public_key(HostKey.generate().public_key))
    host.wipe()  # idempotent


def test_generate_skips_out_of_range_candidates() -> None:
    draws = [bytes(32), SECP256K1_N.to_bytes(32, "big"), b"\xff" * 32, bytes.fromhex(VALID_HEX)]
    key = HostKey.generate(lambda n: draws.pop(0))
    assert draws == []
    assert key.private_key_hex() == "0x" + VALID_HEX


def test_generate_gives_distinct_keys() -> None:
    assert HostKey.generate().address != HostKey.generate().address


# ------------------------------------------------------------------ SecretBytes


SECRET = bytes.fromhex(VALID_HEX)


def test_secret_repr_is_redacted() -> None:
    secret = SecretBytes(SECRET)
    for text in (repr(secret), str(secret), f"{secret}", f"{[secret]}"):
        assert VALID_HEX not in text
        assert VALID_HEX[:8] not in text
        assert "redacted" in text
        assert "len=32" in text
    secret.wipe()
    assert "wiped" in repr(secret)


def test_wipe_zeroes_the_bytearray() -> None:
    secret = SecretBytes(SECRET)
    buffer = secret.buffer_for_tests()
    assert bytes(buffer) == SECRET
    secret.wipe()
    assert secret.wiped
    assert buffer == bytearray(32)
    assert secret.is_all_zero()
    secret.wipe()  # idempotent
    assert len(secret) == 32


def test_wipe_overwrites_the_same_storage() -> None:
    """The zeros land in the memory that held the secret (no reallocation that would leave
    the old bytes behind in freed memory), also while a view of it is alive."""
    import ctypes

    secret = SecretBytes(SECRET)
    buffer = secret.buffer_for_tests()
    view = memoryview(buffer)
    address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    secret.wipe()
    assert ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer)) == address
    assert ctypes.string_at(address, 32) == bytes(32)
    assert view.tobytes() == bytes(32)
    view.release()


def test_context_manager_wipes_even_on_error() -> None:
    with SecretBytes(SECRET) as secret:
        buffer = secret.buffer_for_tests()
        assert secret.reveal() == SECRET
    assert secret.wiped
    assert not any(buffer)
    with pytest.raises(RuntimeError), SecretBytes(SECRET) as other:
        raise RuntimeError("boom")
    assert other.wiped
    assert other.is_all_zero()


def test_reveal_and_view_after_wipe_raise() -> None:
    secret = SecretBytes(SECRET)
    assert secret.view().tobytes() == SECRET
    with pytest.raises(TypeError):
        secret.view()[0] = 1  # read-only
    secret.wipe()
    with pytest.raises(ValueError, match="wiped"):
        secret.reveal()
    with pytest.raises(ValueError, match="wiped"):
        secret.view()


def test_pickle_copy_and_bytes_refused() -> None:
    secret = SecretBytes(SECRET)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        copy.deepcopy(secret)
    with pytest.raises(TypeError):
        bytes(secret)


def test_eq_raises_and_hash_refused() -> None:
    secret = SecretBytes(SECRET)
    with pytest.raises(TypeError, match="equals"):
        _ = secret == SecretBytes(SECRET)
    with pytest.raises(TypeError):
        _ = secret == SECRET
    with pytest.raises(TypeError):
        _ = secret != SECRET
    with pytest.raises(TypeError):
        hash(secret)


def test_equals_is_correct() -> None:
    secret = SecretBytes(SECRET)
    assert secret.equals(SECRET)
    assert secret.equals(bytearray(SECRET))
    assert secret.equals(SecretBytes(SECRET))
    assert not secret.equals(SECRET[:-1] + b"\x00")
    assert not secret.equals(SECRET[:-1])
    assert not secret.equals(SecretBytes(b""))


def test_take_adopts_without_copying() -> None:
    buffer = bytearray(SECRET)
    secret = SecretBytes.take(buffer)
    assert secret.buffer_for_tests() is buffer
    secret.wipe()
    assert not any(buffer)


def test_constructor_copies() -> None:
    source = bytearray(SECRET)
    secret = SecretBytes(source)
    source[0] ^= 0xFF
    assert secret.equals(SECRET)


def test_empty_secret_wipes() -> None:
    with SecretBytes(b"") as empty:
        assert len(empty) == 0
    assert empty.wiped


def test_constant_time_equal() -> None:
    assert constant_time_equal(b"abc", bytearray(b"abc"))
    assert constant_time_equal(memoryview(b"abc"), b"abc")
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"ab")


# ------------------------------------------------------------------ error hierarchy


def test_node_error_code_and_repr() -> None:
    error = NodeError("boom")
    assert error.code == ErrorCode.INTERNAL_ERROR
    narrowed = NodeError("bad frame", code=ErrorCode.INVALID_MESSAGE)
    assert narrowed.code == ErrorCode.INVALID_MESSAGE
    assert NodeError.code == ErrorCode.INTERNAL_ERROR
    assert repr(narrowed) == "NodeError(code='INVALID_MESSAGE', message='bad frame')"
    assert str(narrowed) == "bad frame"
