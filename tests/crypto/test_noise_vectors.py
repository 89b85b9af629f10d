"""The Noise engine against published vectors (tests/vectors/noise/README.md).

- BOLT 8 Appendix A: ``Noise_XK_secp256k1_ChaChaPoly_SHA256`` with Lightning's act
  framing (a version byte, fixed act sizes) done here in the test helper, every
  initiator and responder test (success and failure) and the message-encryption test
  with key rotation (BOLT 8 spends two nonces per message: the encrypted length, then
  the body).
- cacophony and snow: ``Noise_{NN,NK,XK}_25519_ChaChaPoly_SHA256``, every message of
  every vector, and cacophony's handshake hash on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from node.crypto.errors import DecryptionFailed, InvalidPublicKey
from node.crypto.noise import (
    SECP256K1,
    X25519,
    CipherState,
    HandshakeState,
    NoiseMessageLengthError,
    TransportCipher,
)
from node.crypto.secret import SecretBytes

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "noise"
BOLT8 = json.loads((VECTORS / "bolt8.json").read_text())
CACOPHONY = json.loads((VECTORS / "noise-25519.json").read_text())["vectors"]
SNOW = json.loads((VECTORS / "noise-25519-snow.json").read_text())["vectors"]
ACT_LEN = {"one": 50, "two": 50, "three": 66}


def _kp(hex_priv: str, dh: Any = SECP256K1) -> Any:
    return dh.keypair(SecretBytes(bytes.fromhex(hex_priv)))


def _hex(secret: SecretBytes | None) -> str:
    assert secret is not None
    return secret.reveal().hex()


# --------------------------------------------------------------------- BOLT 8 acts


class Bolt8Error(Exception):
    """The BOLT 8 error names of Appendix A (test-only; not wire codes)."""


def _read_act(hs: HandshakeState, data: bytes, act: str) -> None:
    name = f"ACT{['one', 'two', 'three'].index(act) + 1}"
    if len(data) != ACT_LEN[act]:
        raise Bolt8Error(f"{name}_READ_FAILED")
    if data[0] != 0:
        raise Bolt8Error(f"{name}_BAD_VERSION")
    rs_before = hs.rs
    try:
        hs.read_message(data[1:])
    except InvalidPublicKey:
        raise Bolt8Error(f"{name}_BAD_PUBKEY") from None
    except DecryptionFailed:
        if act == "three" and hs.rs is rs_before:
            raise Bolt8Error(f"{name}_BAD_CIPHERTEXT") from None  # the encrypted static key
        raise Bolt8Error(f"{name}_BAD_TAG") from None


def _write_act(hs: HandshakeState) -> bytes:
    return b"\x00" + hs.write_message(b"")


def _last_h(act: dict[str, Any]) -> str | None:
    values = [t["value"] for t in act["trace"] if t.get("op") == "h"]
    return values[-1] if values else None


def _new_bolt8(test: dict[str, Any]) -> HandshakeState:
    initiator = test["role"] == "initiator"
    return HandshakeState(
        "XK",
        initiator=initiator,
        dh=SECP256K1,
        prologue=b"lightning",
        s=_kp(test["ls_priv"]),
        rs=bytes.fromhex(test["rs_pub"]) if initiator else None,
        e=_kp(test["e_priv"]),
    )


def _run_bolt8(test: dict[str, Any]) -> tuple[HandshakeState, list[str]]:
    """Play one Appendix A test; returns the state and the checks made."""
    hs = _new_bolt8(test)
    checks: list[str] = []
    assert hs.s is not None
    assert hs.s.public.hex() == test["ls_pub"]
    for act in test["acts"]:
        if "output" in act:
            assert _write_act(hs).hex() == act["output"], act["act"]
            checks.append(f"{act['act']} output")
        else:
            _read_act(hs, bytes.fromhex(act["input"]), act["act"])
            checks.append(f"{act['act']} input")
        h = _last_h(act)
        if h is not None and not hs.finished:
            assert hs.handshake_hash.hex() == h
    return hs, checks


BOLT8_TESTS = BOLT8["initiator_tests"] + BOLT8["responder_tests"]


def test_bolt8_vector_counts() -> None:
    assert len(BOLT8["initiator_tests"]) == 5
    assert len(BOLT8["responder_tests"]) == 10
    assert sum(t["expected_error"] is None for t in BOLT8_TESTS) == 2
    assert len(BOLT8["message_encryption_test"]["outputs"]) == 6
    assert len(BOLT8["message_encryption_test"]["rotations"]) == 2


@pytest.mark.parametrize("test", BOLT8_TESTS, ids=[t["name"] for t in BOLT8_TESTS])
def test_bolt8_handshake(test: dict[str, Any]) -> None:
    expected = test["expected_error"]
    if expected is not None:
        with pytest.raises(Bolt8Error) as info:
            _run_bolt8(test)
        assert str(info.value) == expected["code"]
        return
    hs, checks = _run_bolt8(test)
    assert len(checks) == 3
    assert hs.finished
    keys = test["final_keys"]
    ck = BOLT8["message_encryption_test"]["ck"]
    send, recv = hs.transport()
    k_send, ck_send = send.secrets_for_tests()
    k_recv, ck_recv = recv.secrets_for_tests()
    assert _hex(k_send) == keys["sk"]
    assert _hex(k_recv) == keys["rk"]
    assert _hex(ck_send) == ck == _hex(ck_recv)
    if test["role"] == "responder":
        assert hs.rs is not None
        assert hs.rs.hex() == BOLT8["initiator_tests"][0]["ls_pub"]


def test_bolt8_split_gives_initiator_key_first() -> None:
    hs, _ = _run_bolt8(BOLT8["responder_tests"][0])
    c1, c2 = hs.split()
    keys = BOLT8["responder_tests"][0]["final_keys"]
    assert _hex(c1.k) == keys["rk"]  # initiator -> responder
    assert _hex(c2.k) == keys["sk"]


def test_bolt8_message_encryption_and_rotation() -> None:
    spec = BOLT8["message_encryption_test"]
    ck = spec["ck"]
    sender = TransportCipher(
        SecretBytes(bytes.fromhex(spec["sk"])), SecretBytes(bytes.fromhex(ck)), 1000
    )
    receiver = TransportCipher(
        SecretBytes(bytes.fromhex(spec["sk"])), SecretBytes(bytes.fromhex(ck)), 1000
    )
    message = bytes.fromhex(spec["message_plaintext_hex"])
    wanted = {o["index"]: o["output"] for o in spec["outputs"]}
    rotations: list[tuple[str, str]] = []
    matched = 0
    for i in range(1002):
        before = sender.rotations
        out = sender.encrypt(len(message).to_bytes(2, "big")) + sender.encrypt(message)
        if sender.rotations != before:
            k, ck_now = sender.secrets_for_tests()
            rotations.append((_hex(ck_now), _hex(k)))
        if i in wanted:
            assert out.hex() == wanted[i], f"message {i}"
            matched += 1
        length = receiver.decrypt(out[:18])
        assert int.from_bytes(length, "big") == 5
        assert receiver.decrypt(out[18:]) == message
    assert matched == 6
    assert rotations == [(r["ck_out"], r["k_out"]) for r in spec["rotations"]]
    assert sender.rotations == receiver.rotations == 2
    assert sender.n == receiver.n == 4  # 2004 nonces = 2 x 1000 + 4


def test_bolt8_short_act_is_refused_by_the_engine_itself() -> None:
    test = BOLT8["responder_tests"][0]
    hs = _new_bolt8(test)
    act1 = bytes.fromhex(test["acts"][0]["input"])
    with pytest.raises(NoiseMessageLengthError):
        hs.read_message(act1[1:20])
    assert hs.symmetric.ck.wiped  # a failed handshake is wiped and unusable


# ---------------------------------------------------------------- X25519 vectors


def _play(vector: dict[str, Any]) -> tuple[int, HandshakeState, HandshakeState]:
    pattern = vector["protocol_name"].split("_")[1]

    def static(name: str) -> Any:
        return _kp(vector[name], X25519) if name in vector else None

    init = HandshakeState(
        pattern,
        initiator=True,
        dh=X25519,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=static("init_static"),
        rs=bytes.fromhex(vector["init_remote_static"]) if "init_remote_static" in vector else None,
        e=_kp(vector["init_ephemeral"], X25519),
    )
    resp = HandshakeState(
        pattern,
        initiator=False,
        dh=X25519,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=static("resp_static"),
        e=_kp(vector["resp_ephemeral"], X25519),
    )
    assert init.protocol_name == resp.protocol_name == vector["protocol_name"]
    ciphers: dict[bool, tuple[CipherState, CipherState]] = {}
    checked = 0
    for i, msg in enumerate(vector["messages"]):
        from_initiator = i % 2 == 0
        payload = bytes.fromhex(msg["payload"])
        if not init.finished:
            writer, reader = (init, resp) if from_initiator else (resp, init)
            out = writer.write_message(payload)
            got = reader.read_message(out)
            if init.finished:
                assert resp.finished
                assert init.handshake_hash == resp.handshake_hash
                if "handshake_hash" in vector:
                    assert init.handshake_hash.hex() == vector["handshake_hash"]
                c1, c2 = init.split()
                ciphers[True] = (c1, c2)
                d1, d2 = resp.split()
                ciphers[False] = (d2, d1)  # responder sends with c2
        else:
            send = ciphers[from_initiator][0]
            recv = ciphers[not from_initiator][1]
            out = send.encrypt_with_ad(b"", payload)
            got = recv.decrypt_with_ad(b"", out)
        assert out.hex() == msg["ciphertext"], f"{vector['protocol_name']} message {i}"
        assert got == payload
        checked += 1
    return checked, init, resp


def test_x25519_vector_counts() -> None:
    assert sorted(v["protocol_name"] for v in CACOPHONY) == [
        "Noise_NK_25519_ChaChaPoly_SHA256",
        "Noise_NN_25519_ChaChaPoly_SHA256",
        "Noise_XK_25519_ChaChaPoly_SHA256",
    ]
    assert [len(v["messages"]) for v in CACOPHONY] == [6, 6, 6]
    assert all("handshake_hash" in v for v in CACOPHONY)
    assert sorted(len(v["messages"]) for v in SNOW) == [4, 4, 5]


@pytest.mark.parametrize("vector", CACOPHONY, ids=[v["protocol_name"] for v in CACOPHONY])
def test_cacophony(vector: dict[str, Any]) -> None:
    checked, init, resp = _play(vector)
    assert checked == 6
    assert init.handshake_hash.hex() == resp.handshake_hash.hex() == vector["handshake_hash"]


@pytest.mark.parametrize("vector", SNOW, ids=[v["protocol_name"] for v in SNOW])
def test_snow(vector: dict[str, Any]) -> None:
    assert vector["init_psks"] == vector["resp_psks"] == []
    checked, _, _ = _play(vector)
    assert checked == len(vector["messages"])
