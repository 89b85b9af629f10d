"""Behaviour of the Noise engine beyond the published vectors: misuse, limits, wiping."""

from __future__ import annotations

import hashlib
import pickle

import pytest
from coincurve import PrivateKey

from node.crypto.errors import DecryptionFailed, InvalidCiphertext, InvalidPublicKey
from node.crypto.noise import (
    MAX_NONCE,
    SECP256K1,
    X25519,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
    NoiseMessageLengthError,
    NoiseStateError,
    NonceExhausted,
    TransportCipher,
    chachapoly_decrypt,
    chachapoly_encrypt,
    hkdf2,
)
from node.crypto.secret import SecretBytes

KEY = bytes(range(32))


def _pair(pattern: str = "NK", dh: object = SECP256K1) -> tuple[HandshakeState, HandshakeState]:
    server_static = dh.generate_keypair()  # type: ignore[attr-defined]
    init = HandshakeState(
        pattern,
        initiator=True,
        dh=dh,  # type: ignore[arg-type]
        prologue=b"p",
        rs=server_static.public if pattern != "NN" else None,
        s=dh.generate_keypair() if pattern == "XK" else None,  # type: ignore[attr-defined]
    )
    resp = HandshakeState(pattern, initiator=False, dh=dh, prologue=b"p", s=server_static)  # type: ignore[arg-type]
    return init, resp


def _complete(init: HandshakeState, resp: HandshakeState) -> None:
    while not init.finished:
        a, b = (init, resp) if init.my_turn_to_write() else (resp, init)
        assert b.read_message(a.write_message(b"x")) == b"x"


def test_secp256k1_dh_is_sha256_of_the_compressed_point() -> None:
    a, b = SECP256K1.generate_keypair(), SECP256K1.generate_keypair()
    shared = SECP256K1.dh(a, SECP256K1.parse_public(b.public))
    point = PrivateKey(b.private.reveal()).public_key.multiply(a.private.reveal())
    assert shared.reveal() == hashlib.sha256(point.format(compressed=True)).digest()
    assert shared.reveal() == SECP256K1.dh(b, SECP256K1.parse_public(a.public)).reveal()
    assert len(a.public) == SECP256K1.public_key_len == 33
    assert len(shared) == SECP256K1.dh_len == 32


def test_secp256k1_refuses_bad_keys() -> None:
    a = SECP256K1.generate_keypair()
    for bad in (a.public[:32], b"\x04" + a.public[1:], b"\x02" + b"\xff" * 32):
        with pytest.raises(InvalidPublicKey):
            SECP256K1.parse_public(bad)
    for scalar in (bytes(32), (2**256 - 1).to_bytes(32, "big")):
        with pytest.raises(NoiseError):
            SECP256K1.keypair(SecretBytes(scalar))


def test_secp256k1_generate_skips_out_of_range_scalars() -> None:
    draws = iter([bytes(32), b"\xff" * 32, b"\x01" * 32])
    kp = SECP256K1.generate_keypair(lambda n: next(draws))
    assert kp.private.reveal() == b"\x01" * 32


def test_x25519_refuses_low_order_points_and_bad_sizes() -> None:
    kp = X25519.generate_keypair()
    with pytest.raises(InvalidPublicKey):
        X25519.dh(kp, X25519.parse_public(bytes(32)))
    with pytest.raises(InvalidPublicKey):
        X25519.parse_public(bytes(31))
    with pytest.raises(NoiseError):
        X25519.keypair(SecretBytes(bytes(31)))


@pytest.mark.parametrize("pattern", ["NN", "NK", "XK"])
@pytest.mark.parametrize("dh", [SECP256K1, X25519], ids=["secp256k1", "25519"])
def test_round_trip_and_wipe(pattern: str, dh: object) -> None:
    init, resp = _pair(pattern, dh)
    _complete(init, resp)
    assert init.handshake_hash == resp.handshake_hash
    i_send, i_recv = init.transport()
    r_send, r_recv = resp.transport()
    for _ in range(3):
        assert r_recv.decrypt(i_send.encrypt(b"ping")) == b"ping"
        assert i_recv.decrypt(r_send.encrypt(b"pong")) == b"pong"
    assert init.symmetric.ck.wiped
    assert init.e is not None
    assert init.e.private.wiped
    with pytest.raises(NoiseStateError):
        init.transport()  # keys are taken once
    for c in (i_send, i_recv, r_send, r_recv):
        k, ck = c.secrets_for_tests()
        c.wipe()
        assert c.wiped
        assert k.is_all_zero()
        assert ck.is_all_zero()


def test_turn_order_is_enforced() -> None:
    init, resp = _pair()
    with pytest.raises(NoiseStateError):
        resp.write_message(b"")
    init2, _ = _pair()
    with pytest.raises(NoiseStateError):
        init2.read_message(b"\x00" * 64)
    _complete(init, resp)
    with pytest.raises(NoiseStateError):
        init.write_message(b"")


def test_a_failed_handshake_is_wiped_and_sticky() -> None:
    init, resp = _pair()
    msg = bytearray(init.write_message(b"hello"))
    msg[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        resp.read_message(bytes(msg))
    assert resp.symmetric.ck.wiped
    fresh = HandshakeState("NK", initiator=True, dh=SECP256K1, prologue=b"p", rs=init.rs)
    with pytest.raises(NoiseStateError, match="failed"):
        resp.read_message(fresh.write_message(b""))  # even a good message now


def test_messages_too_short_or_too_long() -> None:
    init, resp = _pair()
    with pytest.raises(NoiseMessageLengthError):
        resp.read_message(b"\x02" * 40)  # key + less than a tag
    init, resp = _pair()
    with pytest.raises(NoiseMessageLengthError):
        resp.read_message(b"\x02" * 65536)
    init, resp = _pair()
    with pytest.raises(NoiseMessageLengthError):
        init.write_message(bytes(65535))
    init, resp = _pair("XK")
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    msg3 = init.write_message(b"")
    with pytest.raises(NoiseMessageLengthError):
        resp.read_message(msg3[:40])  # cut inside the encrypted static key


def test_pattern_needs_its_keys() -> None:
    with pytest.raises(ValueError, match="pre-message"):
        HandshakeState("NK", initiator=True, dh=SECP256K1)
    with pytest.raises(ValueError, match="pattern"):
        HandshakeState("IK", initiator=True, dh=SECP256K1)
    with pytest.raises(InvalidPublicKey):
        HandshakeState("NK", initiator=True, dh=SECP256K1, rs=b"\x05" * 33)
    # XK initiator without a static key fails at message 3
    server = SECP256K1.generate_keypair()
    init = HandshakeState("XK", initiator=True, dh=SECP256K1, rs=server.public)
    resp = HandshakeState("XK", initiator=False, dh=SECP256K1, s=server)
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    with pytest.raises(NoiseStateError):
        init.write_message(b"")
    # an NK responder needs its static key from the start (pre-message)
    with pytest.raises(ValueError, match="pre-message"):
        HandshakeState("NK", initiator=False, dh=SECP256K1)


def test_cipherstate_nonce_only_advances_on_success_and_is_bounded() -> None:
    a, b = CipherState(SecretBytes(KEY)), CipherState(SecretBytes(KEY))
    ct = a.encrypt_with_ad(b"ad", b"m")
    with pytest.raises(DecryptionFailed):
        b.decrypt_with_ad(b"other", ct)
    assert b.n == 0
    assert b.decrypt_with_ad(b"ad", ct) == b"m"
    assert b.n == 1
    c = CipherState(SecretBytes(KEY), n=MAX_NONCE)
    with pytest.raises(NonceExhausted):
        c.encrypt_with_ad(b"", b"")
    empty = CipherState()
    assert empty.encrypt_with_ad(b"", b"clear") == b"clear"
    assert empty.decrypt_with_ad(b"", b"clear") == b"clear"
    with pytest.raises(NoiseStateError):
        empty.rekey()


def test_rekey_matches_the_spec_definition() -> None:
    c = CipherState(SecretBytes(KEY), n=7)
    old = SecretBytes(KEY)
    expected = chachapoly_encrypt(old, MAX_NONCE, b"", bytes(32))[:32]
    c.rekey()
    assert c.k is not None
    assert c.k.reveal() == expected
    assert c.n == 7  # Rekey does not touch the nonce


def test_chachapoly_nonce_layout_and_short_ciphertext() -> None:
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    key = SecretBytes(KEY)
    n = 0x0102030405060708
    ours = chachapoly_encrypt(key, n, b"ad", b"text")
    nonce = bytes(4) + n.to_bytes(8, "little")
    assert ours == crypto_aead_chacha20poly1305_ietf_encrypt(b"text", b"ad", nonce, KEY)
    with pytest.raises(InvalidCiphertext):
        chachapoly_decrypt(key, 0, b"", b"short")
    assert chachapoly_decrypt(key, 1, b"", chachapoly_encrypt(key, 1, b"", b"")) == b""


def test_hkdf2_matches_rfc5869() -> None:
    from node.crypto.kdf import hkdf_sha256

    ck = SecretBytes(KEY)
    a, b = hkdf2(ck, b"ikm")
    assert a.reveal() + b.reveal() == bytes(hkdf_sha256(b"ikm", salt=KEY, length=64))


def test_transport_rotation_every_n_and_plain_mode() -> None:
    tx = TransportCipher(SecretBytes(KEY), SecretBytes(KEY), 3)
    rx = TransportCipher(SecretBytes(KEY), SecretBytes(KEY), 3)
    for i in range(7):
        assert rx.decrypt(tx.encrypt(b"%d" % i)) == b"%d" % i
    assert tx.rotations == rx.rotations == 2
    assert tx.n == 1
    plain = TransportCipher(SecretBytes(KEY), SecretBytes(KEY), None)
    with pytest.raises(NoiseMessageLengthError):
        plain.encrypt(bytes(65535))
    with pytest.raises(ValueError, match="rotate_every"):
        TransportCipher(SecretBytes(KEY), SecretBytes(KEY), 0)


def test_secrets_never_print_or_pickle() -> None:
    init, resp = _pair()
    _complete(init, resp)
    send, _ = init.transport()
    k, ck = send.secrets_for_tests()
    kp = SECP256K1.generate_keypair()
    for obj in (init, send, kp, CipherState(SecretBytes(KEY))):
        text = repr(obj)
        assert k.reveal().hex() not in text
        assert ck.reveal().hex() not in text
        assert kp.private.reveal().hex() not in text
    for obj in (init, send, kp):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_borrowed_static_key_is_not_wiped() -> None:
    scalar = SecretBytes(b"\x07" * 32)
    owned = SECP256K1.keypair(scalar)
    borrowed = KeyPair(owned.private, owned.public, owned=False)
    init = HandshakeState("NK", initiator=True, dh=SECP256K1, rs=owned.public)
    resp = HandshakeState("NK", initiator=False, dh=SECP256K1, s=borrowed)
    _complete(init, resp)
    resp.wipe()
    assert not scalar.wiped
    owned.wipe()
    assert scalar.wiped
    assert scalar.is_all_zero()


def test_wipe_zeroes_the_same_buffer_in_place() -> None:
    secret = SecretBytes(b"\x5a" * 32)
    buf = secret.buffer_for_tests()
    view = memoryview(buf)  # an export: the buffer cannot move while it exists
    secret.wipe()
    assert bytes(view) == bytes(32)
    assert secret.buffer_for_tests() is buf
    assert len(buf) == 32
    view.release()


def test_a_failed_handshake_leaves_the_callers_static_key_alone() -> None:
    server = SECP256K1.generate_keypair()
    client_static = SECP256K1.generate_keypair()
    init = HandshakeState("XK", initiator=True, dh=SECP256K1, rs=server.public, s=client_static)
    init.write_message(b"")
    with pytest.raises(NoiseMessageLengthError):
        init.read_message(b"\x02")
    assert init.e is not None
    assert init.e.private.wiped  # the ephemeral key is the handshake's own
    assert not client_static.private.wiped  # the static key is the caller's


def test_transport_nonce_exhaustion_and_use_after_wipe() -> None:
    plain = TransportCipher(SecretBytes(KEY), SecretBytes(KEY), None)
    plain._cipher.n = MAX_NONCE
    with pytest.raises(NonceExhausted):
        plain.encrypt(b"x")
    with pytest.raises(NonceExhausted):
        plain.decrypt(bytes(17))
    plain._cipher.n = 0
    plain.wipe()
    with pytest.raises(ValueError, match="wiped"):
        plain.encrypt(b"x")
