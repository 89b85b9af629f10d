"""Every error branch of node/crypto/session_init.py, with its exact wire code.

Frames are built by tests/crypto/_frames.py, which encrypts arbitrary session JSON under
the real key schedule, so each check is reached with everything before it valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_account import Account

from node.crypto import aead, session_init
from node.crypto.curve import SECP256K1_N
from node.crypto.errors import CryptoError, ErrorCode, NodeError
from node.crypto.session_init import SessionData, open_session_init, parse_init_payload
from tests.crypto._frames import CLIENT, DELETE, HOST, NONCE, OTHER, SESSION_KEY, Frame, session

PayloadEdit = Callable[[dict[str, Any]], None]


def open_payload(payload: object) -> SessionData:
    return open_session_init(HOST, parse_init_payload(payload))


def expect(code: ErrorCode, payload: object) -> NodeError:
    with pytest.raises(CryptoError) as info:
        open_payload(payload)
    assert info.value.code == code, info.value.message
    text = str(info.value) + repr(info.value)
    assert SESSION_KEY.hex() not in text
    return info.value


def edited(edit: PayloadEdit, frame: Frame | None = None) -> dict[str, Any]:
    payload = (frame or Frame()).payload()
    edit(payload)
    return payload


def setter(name: str, value: Any) -> PayloadEdit:
    def edit(payload: dict[str, Any]) -> None:
        if value is DELETE:
            del payload[name]
        else:
            payload[name] = value

    return edit


# ---------------------------------------------------------------- the good path


def test_valid_frame_opens() -> None:
    data = open_payload(Frame().payload())
    assert data.session_key.equals(SESSION_KEY)
    assert data.job_id == 42
    assert data.model_name == "tiny-model"
    assert data.price_per_token == 1000
    assert data.client_public_key == CLIENT.public_key.format(compressed=True)
    assert data.recovery_public_key == data.client_public_key
    assert data.client_address == Account.from_key(CLIENT.secret).address
    assert data.vector_database is None
    assert SESSION_KEY.hex() not in repr(data)
    assert "redacted" in repr(data)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(setter("saltHex", DELETE), id="salt-absent"),
        pytest.param(setter("saltHex", ""), id="salt-empty"),
        pytest.param(setter("saltHex", None), id="salt-null"),
        pytest.param(setter("saltHex", "0x" + "00" * 32), id="salt-0x-zeros"),
        pytest.param(setter("info", DELETE), id="info-absent"),
        pytest.param(setter("info", None), id="info-null"),
        pytest.param(
            lambda p: p.update(nonceHex="0X" + p["nonceHex"].upper()), id="nonce-0X-upper"
        ),
        pytest.param(lambda p: p.update(ephPubHex="0x" + p["ephPubHex"]), id="eph-0x"),
        pytest.param(lambda p: p.update(signatureHex=p["signatureHex"].upper()), id="sig-upper"),
        pytest.param(setter("alg", "anything"), id="alg-ignored"),
        pytest.param(setter("recid", 99), id="recid-ignored"),
    ],
)
def test_accepted_payload_variants(edit: PayloadEdit) -> None:
    assert open_payload(edited(edit)).session_key.equals(SESSION_KEY)


def test_uncompressed_ephemeral_key_and_nonempty_aad() -> None:
    frame = Frame(uncompressed_eph=True, aad=b"bind-me")
    assert len(bytes.fromhex(frame.payload()["ephPubHex"])) == 65
    data = open_payload(frame.payload())
    assert data.client_address == Account.from_key(CLIENT.secret).address


# ---------------------------------------------------------------- steps 1-2: shape and hex

REQUIRED = ["ephPubHex", "ciphertextHex", "nonceHex", "signatureHex", "aadHex"]


@pytest.mark.parametrize("payload", [None])
def test_missing_payload(payload: object) -> None:
    expect(ErrorCode.MISSING_PAYLOAD, payload)


@pytest.mark.parametrize("payload", [[], "text", 5, True, ["ephPubHex"]])
def test_payload_not_an_object(payload: object) -> None:
    expect(ErrorCode.INVALID_PAYLOAD, payload)


@pytest.mark.parametrize("value", [DELETE, None, 5, ["00"], {"hex": "00"}, b"00"])
@pytest.mark.parametrize("name", REQUIRED)
def test_required_field_missing_or_not_string(name: str, value: Any) -> None:
    error = expect(ErrorCode.INVALID_PAYLOAD, edited(setter(name, value)))
    assert name in error.message


@pytest.mark.parametrize("name", [*REQUIRED, "saltHex"])
@pytest.mark.parametrize("bad", ["zz", "0", "0x0", "abc", "g0", "0x 0", " 00", "0\u0660"])
def test_bad_hex(name: str, bad: str) -> None:
    error = expect(ErrorCode.INVALID_HEX_ENCODING, edited(setter(name, bad)))
    assert name in error.message
    assert bad not in error.message


@pytest.mark.parametrize("size", [0, 8, 12, 23, 25, 32])
def test_nonce_size(size: int) -> None:
    expect(ErrorCode.INVALID_NONCE_SIZE, edited(setter("nonceHex", "ab" * size)))


@pytest.mark.parametrize("size", [0, 64, 66, 130])
def test_signature_size(size: int) -> None:
    expect(ErrorCode.INVALID_SIGNATURE, edited(setter("signatureHex", "01" * size)))


@pytest.mark.parametrize("size", [0, 32, 34, 64, 66])
def test_ephemeral_key_length(size: int) -> None:
    expect(ErrorCode.INVALID_PAYLOAD, edited(setter("ephPubHex", "02" * size)))


@pytest.mark.parametrize(
    "eph_hex",
    [
        pytest.param("05" + "11" * 32, id="compressed-bad-prefix"),
        pytest.param("04" + "11" * 32, id="33-bytes-prefix-04"),
        pytest.param("02" + "00" * 31 + "05", id="x-not-on-curve"),
        pytest.param("02" + "ff" * 32, id="x-above-p"),
        pytest.param("06" + "11" * 64, id="hybrid-prefix"),
        pytest.param("03" + "11" * 64, id="65-bytes-prefix-03"),
        pytest.param("04" + "11" * 64, id="off-curve"),
        pytest.param("04" + "00" * 64, id="zero-point"),
    ],
)
def test_ephemeral_key_not_a_point(eph_hex: str) -> None:
    error = expect(ErrorCode.INVALID_PAYLOAD, edited(setter("ephPubHex", eph_hex)))
    assert "ephPubHex" in error.message


@pytest.mark.parametrize("size", [0, 1, 15])
def test_ciphertext_shorter_than_tag(size: int) -> None:
    expect(ErrorCode.INVALID_PAYLOAD, edited(setter("ciphertextHex", "ab" * size)))


@pytest.mark.parametrize(
    "salt", ["01" * 32, "00" * 31, "00" * 33, "00" * 31 + "01", "00", "ff" * 16]
)
def test_unsupported_salt(salt: str) -> None:
    error = expect(ErrorCode.INVALID_PAYLOAD, edited(setter("saltHex", salt)))
    assert "salt" in error.message


@pytest.mark.parametrize("salt", [0, 1, [], {}, True])
def test_salt_not_a_string(salt: object) -> None:
    expect(ErrorCode.INVALID_PAYLOAD, edited(setter("saltHex", salt)))


@pytest.mark.parametrize("info", ["x", "E2EEv1", " ", 0, 1, False, [], {}])
def test_unsupported_info(info: object) -> None:
    error = expect(ErrorCode.INVALID_PAYLOAD, edited(setter("info", info)))
    assert "info" in error.message


def test_check_order_nonce_before_signature_before_eph() -> None:
    payload = Frame().payload()
    payload.update(nonceHex="00", signatureHex="00", ephPubHex="00", ciphertextHex="00")
    expect(ErrorCode.INVALID_NONCE_SIZE, payload)
    payload["nonceHex"] = NONCE.hex()
    expect(ErrorCode.INVALID_SIGNATURE, payload)


# ---------------------------------------------------------------- step 3: decryption


def _flip_hex(text: str, byte: int) -> str:
    raw = bytearray.fromhex(text)
    raw[byte] ^= 0x01
    return raw.hex()


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda p: p.update(ciphertextHex=_flip_hex(p["ciphertextHex"], 0)), id="ct"),
        pytest.param(lambda p: p.update(ciphertextHex=_flip_hex(p["ciphertextHex"], -1)), id="tag"),
        pytest.param(lambda p: p.update(nonceHex=_flip_hex(p["nonceHex"], 5)), id="nonce"),
        pytest.param(setter("aadHex", "00"), id="aad-added"),
        pytest.param(lambda p: p.update(ciphertextHex=p["ciphertextHex"][:-2]), id="truncated"),
    ],
)
def test_tampering_fails_decryption(edit: PayloadEdit) -> None:
    expect(ErrorCode.DECRYPTION_FAILED, edited(edit))


def test_frame_for_another_host_fails_decryption() -> None:
    other_host = OTHER.public_key.format(compressed=True)
    expect(ErrorCode.DECRYPTION_FAILED, Frame(host_public=other_host).payload())


def test_aad_removed_fails_decryption() -> None:
    expect(ErrorCode.DECRYPTION_FAILED, edited(setter("aadHex", ""), Frame(aad=b"abc")))


# ---------------------------------------------------------------- step 4: session data


def _plain(data: bytes | dict[str, Any]) -> dict[str, Any]:
    return Frame(plaintext=data).payload()


@pytest.mark.parametrize(
    "plaintext",
    [
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"sessionKey": "00"', id="truncated-json"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"true", id="bool"),
    ],
)
def test_session_data_not_a_json_object(plaintext: bytes) -> None:
    expect(ErrorCode.INVALID_SESSION_DATA, _plain(plaintext))


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(DELETE, id="missing"),
        pytest.param(None, id="null"),
        pytest.param(5, id="number"),
        pytest.param(list(SESSION_KEY), id="array"),
        pytest.param("", id="empty"),
        pytest.param("ab" * 31, id="31-bytes"),
        pytest.param("ab" * 33, id="33-bytes"),
        pytest.param("ab" * 31 + "a", id="63-digits"),
        pytest.param("0x" + "ab" * 31, id="0x-31-bytes"),
        pytest.param("0x0x" + "ab" * 31, id="double-0x-prefix"),
        pytest.param("0X0x" + "ab" * 31, id="double-0X-prefix"),
        pytest.param("zz" * 32, id="non-hex"),
        pytest.param("ab" * 31 + "g0", id="one-non-hex"),
        pytest.param(" " + "ab" * 31 + " ", id="spaces"),
        pytest.param("\u0660" * 64, id="non-ascii-digits"),
    ],
)
def test_bad_session_key(key: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(sessionKey=key)))
    assert "sessionKey" in error.message


BAD_DECIMALS = [
    pytest.param(None, id="null"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(-1, id="negative-int"),
    pytest.param(1.5, id="float"),
    pytest.param(1.0, id="float-integral"),
    pytest.param("", id="empty"),
    pytest.param("n", id="only-n"),
    pytest.param("1nn", id="double-n"),
    pytest.param("-1", id="negative-string"),
    pytest.param("+1", id="plus"),
    pytest.param("1.5", id="decimal-point"),
    pytest.param("1e3", id="exponent"),
    pytest.param(" 1", id="leading-space"),
    pytest.param("1 ", id="trailing-space"),
    pytest.param("0x10", id="hex"),
    pytest.param("1_000", id="underscore"),
    pytest.param("\u0661\u0662", id="arabic-indic-digits"),
    pytest.param("\u00b2", id="superscript-two"),
    pytest.param("1" * 79, id="79-digits"),
    pytest.param("9" * 78, id="78-digits-above-uint256"),
    pytest.param(2**256, id="int-above-uint256"),
    pytest.param("1" * 79 + "n", id="79-digits-n"),
    pytest.param([1], id="array"),
    pytest.param({"v": 1}, id="object"),
]


@pytest.mark.parametrize("value", [pytest.param(DELETE, id="missing"), *BAD_DECIMALS])
def test_bad_job_id(value: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(jobId=value)))
    assert "jobId" in error.message


@pytest.mark.parametrize("value", [pytest.param(DELETE, id="missing"), *BAD_DECIMALS])
def test_bad_price_per_token(value: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(pricePerToken=value)))
    assert "pricePerToken" in error.message


GOOD_DECIMALS = [
    ("0", 0),
    ("42", 42),
    ("42n", 42),
    ("007", 7),
    (str(2**64 - 1), 2**64 - 1),
    (f"{2**64 - 1}n", 2**64 - 1),
    (str(2**256 - 1), 2**256 - 1),
    (0, 0),
    (7, 7),
    (2**53 - 1, 2**53 - 1),
    (2**53 + 1, 2**53 + 1),
]


@pytest.mark.parametrize(("value", "expected"), GOOD_DECIMALS)
def test_good_job_id(value: Any, expected: int) -> None:
    assert open_payload(_plain(session(jobId=value))).job_id == expected


@pytest.mark.parametrize(("value", "expected"), GOOD_DECIMALS)
def test_good_price_per_token(value: Any, expected: int) -> None:
    assert open_payload(_plain(session(pricePerToken=value))).price_per_token == expected


@pytest.mark.parametrize("model", [DELETE, None, 5, ["m"], {"name": "m"}, True])
def test_bad_model_name(model: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(modelName=model)))
    assert "modelName" in error.message


@pytest.mark.parametrize("model", ["", "m", "модель-\u4e2d\u6587-\U0001f600", 'q"uote\\'])
def test_any_string_model_name(model: str) -> None:
    assert open_payload(_plain(session(modelName=model))).model_name == model


@pytest.mark.parametrize(
    "recovery",
    [
        pytest.param(5, id="number"),
        pytest.param(True, id="bool"),
        pytest.param(["02"], id="array"),
        pytest.param("zz", id="non-hex"),
        pytest.param("abc", id="odd-length"),
        pytest.param("", id="empty"),
        pytest.param("02" + "11" * 31, id="32-bytes"),
        pytest.param("05" + "11" * 32, id="bad-prefix"),
        pytest.param("02" + "00" * 31 + "05", id="x-not-on-curve"),
        pytest.param("04" + "11" * 64, id="off-curve"),
    ],
)
def test_bad_recovery_public_key(recovery: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(recoveryPublicKey=recovery)))
    assert "recoveryPublicKey" in error.message


@pytest.mark.parametrize("vdb", [[], ["x"], "db", 5, True])
def test_bad_vector_database(vdb: Any) -> None:
    error = expect(ErrorCode.INVALID_SESSION_DATA, _plain(session(vectorDatabase=vdb)))
    assert "vectorDatabase" in error.message


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"sessionKey": "0x" + SESSION_KEY.hex()}, lambda d: d.session_key.equals(SESSION_KEY)),
        (
            {"sessionKey": "0X" + SESSION_KEY.hex().upper()},
            lambda d: d.session_key.equals(SESSION_KEY),
        ),
        ({"recoveryPublicKey": DELETE}, lambda d: d.recovery_public_key is None),
        ({"recoveryPublicKey": None}, lambda d: d.recovery_public_key is None),
        (
            {"recoveryPublicKey": CLIENT.public_key.format(compressed=False).hex()},
            lambda d: d.recovery_public_key == CLIENT.public_key.format(compressed=True),
        ),
        ({"vectorDatabase": None}, lambda d: d.vector_database is None),
        ({"vectorDatabase": {}}, lambda d: d.vector_database == {}),
        ({"vectorDatabase": {"id": "v", "n": [1]}}, lambda d: d.vector_database["n"] == [1]),
        ({"unknownField": [1, 2, 3]}, lambda d: d.job_id == 42),
    ],
)
def test_accepted_session_variants(
    overrides: dict[str, Any], check: Callable[[SessionData], bool]
) -> None:
    assert check(open_payload(_plain(session(**overrides))))


# ---------------------------------------------------------------- step 5: signature


def test_signature_by_another_key_than_recovery_key() -> None:
    error = expect(ErrorCode.INVALID_SIGNATURE, Frame(signer=OTHER).payload())
    assert "recoveryPublicKey" in error.message


def _signer_forms() -> dict[str, str]:
    full = CLIENT.public_key.format(compressed=False)
    return {
        "hybrid": bytes((6 | (full[64] & 1),)).hex() + full[1:].hex(),
        "33-bytes-04": "04" + full[1:33].hex(),
        "wrong-parity": bytes((5 - (2 | (full[64] & 1)),)).hex() + full[1:33].hex(),
    }


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ("hybrid", ErrorCode.INVALID_SESSION_DATA),
        ("33-bytes-04", ErrorCode.INVALID_SESSION_DATA),
        ("wrong-parity", ErrorCode.INVALID_SIGNATURE),  # a valid point: -P, not the signer
    ],
)
def test_recovery_key_must_be_the_signer_in_a_valid_encoding(form: str, code: ErrorCode) -> None:
    """The recovery key is checked by comparing it with the recovered signer; encodings
    of the signer's x that are not a valid SEC1 key of that point are still refused."""
    expect(code, _plain(session(recoveryPublicKey=_signer_forms()[form])))


def test_uncompressed_recovery_key_of_another_client() -> None:
    other = OTHER.public_key.format(compressed=False).hex()
    error = expect(ErrorCode.INVALID_SIGNATURE, _plain(session(recoveryPublicKey=other)))
    assert "recoveryPublicKey" in error.message


@pytest.mark.parametrize("recovery", ["04" + "11" * 64, "02" + "00" * 31 + "05"])
def test_invalid_recovery_key_reported_before_a_bad_signature(recovery: str) -> None:
    frame = Frame(plaintext=session(recoveryPublicKey=recovery))
    error = expect(ErrorCode.INVALID_SESSION_DATA, edited(_high_s, frame))
    assert "recoveryPublicKey" in error.message


def test_without_recovery_key_the_signer_is_the_client() -> None:
    frame = Frame(plaintext=session(recoveryPublicKey=DELETE), signer=OTHER)
    data = open_payload(frame.payload())
    assert data.client_address == Account.from_key(OTHER.secret).address
    assert data.client_public_key == OTHER.public_key.format(compressed=True)


def _high_s(payload: dict[str, Any]) -> None:
    sig = bytes.fromhex(payload["signatureHex"])
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((sig[64] ^ 1,))
    payload["signatureHex"] = high.hex()


def _sig_part(start: int, end: int, value: bytes) -> PayloadEdit:
    def edit(payload: dict[str, Any]) -> None:
        sig = bytearray.fromhex(payload["signatureHex"])
        sig[start:end] = value
        payload["signatureHex"] = sig.hex()

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        pytest.param(_high_s, "high-S", id="high-s"),
        pytest.param(_sig_part(0, 32, bytes(32)), "r is out of range", id="r-zero"),
        pytest.param(_sig_part(32, 64, bytes(32)), "s is out of range", id="s-zero"),
        pytest.param(_sig_part(0, 32, b"\xff" * 32), "r is out of range", id="r-above-n"),
        pytest.param(_sig_part(64, 65, b"\x02"), "v must be", id="v-2"),
        pytest.param(_sig_part(64, 65, b"\x1d"), "v must be", id="v-29"),
        pytest.param(_sig_part(64, 65, b"\xff"), "v must be", id="v-255"),
        pytest.param(_sig_part(40, 41, b"\x00"), "recoveryPublicKey", id="s-changed"),
    ],
)
def test_bad_signature(edit: PayloadEdit, match: str) -> None:
    error = expect(ErrorCode.INVALID_SIGNATURE, edited(edit))
    assert match in error.message


def test_wrong_parity_v_gives_a_different_key() -> None:
    def flip_v(payload: dict[str, Any]) -> None:
        sig = bytearray.fromhex(payload["signatureHex"])
        sig[64] ^= 1
        payload["signatureHex"] = sig.hex()

    expect(ErrorCode.INVALID_SIGNATURE, edited(flip_v))


def test_high_s_rejected_even_without_recovery_key() -> None:
    frame = Frame(plaintext=session(recoveryPublicKey=DELETE))
    expect(ErrorCode.INVALID_SIGNATURE, edited(_high_s, frame))


@pytest.mark.parametrize("offset", [27])
def test_wallet_v_forms_accepted(offset: int) -> None:
    def wallet_v(payload: dict[str, Any]) -> None:
        sig = bytearray.fromhex(payload["signatureHex"])
        sig[64] += offset
        payload["signatureHex"] = sig.hex()

    assert open_payload(edited(wallet_v)).client_public_key == CLIENT.public_key.format()


def test_signature_must_cover_the_aad() -> None:
    expect(ErrorCode.INVALID_SIGNATURE, Frame(aad=b"chunk", signed_aad=b"").payload())
    expect(ErrorCode.INVALID_SIGNATURE, Frame(aad=b"chunk", signed_aad=b"chunk2").payload())


def test_signature_must_cover_the_host_key() -> None:
    other = OTHER.public_key.format(compressed=True)
    expect(ErrorCode.INVALID_SIGNATURE, Frame(signed_host=other).payload())


def test_signature_must_cover_the_ephemeral_key_compressed() -> None:
    # Signing over the 65-byte form of E instead of the 33-byte form must not verify.
    frame = Frame(uncompressed_eph=True, signed_eph_uncompressed=True)
    expect(ErrorCode.INVALID_SIGNATURE, frame.payload())


# ---------------------------------------------------------------- secrets are wiped


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Record the session-key buffer and the plaintext secret as they are created."""
    seen: dict[str, list[Any]] = {"keys": [], "plaintexts": []}
    real_decode = session_init.decode_hex_into_bytearray
    real_take = session_init._take_session_key
    real_open = aead.open_secret

    def decode(text: str, field: str) -> bytearray:
        out = real_decode(text, field)
        seen["keys"].append(out)
        return out

    def take(buf: bytearray) -> Any:
        out = real_take(buf)
        if out is not None:
            seen["keys"].append(out.buffer_for_tests())
        return out

    def open_secret(*args: Any) -> Any:
        out = real_open(*args)
        seen["plaintexts"].append(out)
        return out

    monkeypatch.setattr(session_init, "decode_hex_into_bytearray", decode)
    monkeypatch.setattr(session_init, "_take_session_key", take)
    monkeypatch.setattr(aead, "open_secret", open_secret)
    return seen


@pytest.mark.parametrize(
    ("payload_factory", "code"),
    [
        (lambda: _plain(session(modelName=DELETE)), ErrorCode.INVALID_SESSION_DATA),
        (lambda: _plain(session(vectorDatabase=[1])), ErrorCode.INVALID_SESSION_DATA),
        (lambda: Frame(signer=OTHER).payload(), ErrorCode.INVALID_SIGNATURE),
        (lambda: edited(_high_s), ErrorCode.INVALID_SIGNATURE),
    ],
)
def test_session_key_and_plaintext_wiped_on_failure(
    captured: dict[str, list[Any]],
    payload_factory: Callable[[], dict[str, Any]],
    code: ErrorCode,
) -> None:
    expect(code, payload_factory())
    (key_buffer,) = captured["keys"]
    (plaintext,) = captured["plaintexts"]
    assert len(key_buffer) == 32
    assert not any(key_buffer)
    assert plaintext.wiped
    assert plaintext.is_all_zero()


def test_plaintext_wiped_and_key_kept_on_success(captured: dict[str, list[Any]]) -> None:
    data = open_payload(Frame().payload())
    (key_buffer,) = captured["keys"]
    (plaintext,) = captured["plaintexts"]
    assert plaintext.wiped
    assert plaintext.is_all_zero()
    assert key_buffer is data.session_key.buffer_for_tests()
    assert bytes(key_buffer) == SESSION_KEY
    data.session_key.wipe()
    assert not any(key_buffer)


def test_plaintext_wiped_when_not_json(captured: dict[str, list[Any]]) -> None:
    expect(ErrorCode.INVALID_SESSION_DATA, _plain(b"secret words"))
    (plaintext,) = captured["plaintexts"]
    assert plaintext.is_all_zero()
    assert captured["keys"] == []


def test_replay_key_is_ephemeral_key_and_nonce() -> None:
    payload = Frame().payload()
    init = parse_init_payload(payload)
    assert init.replay_key() == bytes.fromhex(payload["ephPubHex"])[1:] + b"|" + NONCE
    other = parse_init_payload(Frame(nonce=bytes(24)).payload())
    assert other.replay_key() != init.replay_key()
    # The same point written uncompressed must map to the same cache entry.
    from coincurve import PublicKey

    long_form = PublicKey(bytes.fromhex(payload["ephPubHex"])).format(compressed=False)
    uncompressed = parse_init_payload({**payload, "ephPubHex": long_form.hex()})
    assert uncompressed.replay_key() == init.replay_key()
