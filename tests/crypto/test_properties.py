"""Hypothesis properties of the crypto core (modest example counts: the suite stays fast)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from coincurve import PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.crypto import HostKey, SecretBytes, aead
from node.crypto.curve import SECP256K1_N, address_of, eip191_digest, recover_public_key
from node.crypto.errors import DecryptionFailed, InvalidSignature
from node.crypto.session_init import open_session_init, parse_init_payload, seal_session_init

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys32 = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=24, max_size=24)
scalars = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda i: i.to_bytes(32, "big"))


@FAST
@given(key=keys32, nonce=nonces, msg=st.binary(max_size=512), aad=st.binary(max_size=64))
def test_seal_open_round_trip(key: bytes, nonce: bytes, msg: bytes, aad: bytes) -> None:
    wire = aead.seal(key, nonce, msg, aad)
    assert len(wire) == len(msg) + aead.TAG_SIZE
    assert aead.open(key, nonce, wire, aad) == msg
    with aead.open_secret(SecretBytes(key), bytearray(nonce), memoryview(wire), aad) as out:
        assert out.equals(msg)


@FAST
@given(
    key=keys32,
    nonce=nonces,
    msg=st.binary(max_size=128),
    aad=st.binary(max_size=32),
    part=st.sampled_from(["nonce", "ciphertext", "tag", "aad"]),
    data=st.data(),
)
def test_any_single_bit_flip_fails(
    key: bytes, nonce: bytes, msg: bytes, aad: bytes, part: str, data: st.DataObject
) -> None:
    wire = aead.seal(key, nonce, msg, aad)
    fields = {"nonce": nonce, "ciphertext": wire[: len(msg)], "tag": wire[len(msg) :], "aad": aad}
    target = fields[part]
    if not target:  # empty ciphertext or AAD: flip a bit of the tag instead
        part, target = "tag", fields["tag"]
    bit = data.draw(st.integers(min_value=0, max_value=len(target) * 8 - 1), label="bit")
    flipped = bytearray(target)
    flipped[bit // 8] ^= 1 << (bit % 8)
    fields[part] = bytes(flipped)
    with pytest.raises(DecryptionFailed):
        aead.open(key, fields["nonce"], fields["ciphertext"] + fields["tag"], fields["aad"])


@SLOW
@given(scalar=scalars, digest=keys32)
def test_sign_recover_round_trip_all_v_forms(scalar: bytes, digest: bytes) -> None:
    host = HostKey(SecretBytes(scalar))
    sig = host.sign_digest(digest)
    assert len(sig) == 65
    assert sig[64] in (0, 1)
    assert int.from_bytes(sig[32:64], "big") <= SECP256K1_N // 2
    for v in (sig[64], sig[64] + 27):
        recovered = recover_public_key(digest, sig[:64] + bytes((v,)))
        assert recovered.format(compressed=True) == host.public_key
    other_v = 1 - sig[64]
    for v in (other_v, other_v + 27):
        try:
            wrong = recover_public_key(digest, sig[:64] + bytes((v,))).format()
        except InvalidSignature:
            pass
        else:
            assert wrong != host.public_key


@SLOW
@given(scalar=scalars, message=st.binary(max_size=200))
def test_personal_message_signature_recovers_address(scalar: bytes, message: bytes) -> None:
    host = HostKey(SecretBytes(scalar))
    sig = host.sign_personal_message(message)
    assert sig[64] in (27, 28)
    assert address_of(recover_public_key(eip191_digest(message), sig)) == host.address


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
prices = st.one_of(
    st.sampled_from([0, 2**53 - 1, 2**53, 2**53 + 1, 2**64 - 1, 2**128, 2**256 - 1]),
    st.integers(min_value=0, max_value=2**256 - 1),
)


@SLOW
@given(
    host_scalar=scalars,
    client_scalar=scalars,
    session_key=keys32,
    job_id=st.integers(min_value=0, max_value=2**64 - 1),
    job_as_bigint=st.booleans(),
    model_name=st.text(max_size=40),
    price=prices,
    price_form=st.sampled_from(["int", "str", "bigint"]),
    vector_database=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    include_recovery_key=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_session_init_round_trip(
    host_scalar: bytes,
    client_scalar: bytes,
    session_key: bytes,
    job_id: int,
    job_as_bigint: bool,
    model_name: str,
    price: int,
    price_form: str,
    vector_database: dict[str, Any] | None,
    include_recovery_key: bool,
    seed: int,
) -> None:
    host = HostKey(SecretBytes(host_scalar))
    client = PrivateKey(client_scalar)
    price_value: int | str = {"int": price, "str": str(price), "bigint": f"{price}n"}[price_form]
    rng = random.Random(seed)
    payload = seal_session_init(
        host.public_key_hex if seed % 2 else host.public_key,
        client,
        SecretBytes(session_key) if seed % 3 == 0 else session_key,
        job_id=f"{job_id}n" if job_as_bigint else job_id,
        model_name=model_name,
        price_per_token=price_value,
        vector_database=vector_database,
        include_recovery_key=include_recovery_key,
        rng=rng.randbytes,
    )
    # The payload survives the wire as JSON text.
    wire = json.loads(json.dumps({"type": "encrypted_session_init", "payload": payload}))
    init = parse_init_payload(wire["payload"])
    data = open_session_init(host, init)
    assert data.session_key.equals(session_key)
    assert data.job_id == job_id
    assert data.model_name == model_name
    assert data.price_per_token == price
    assert data.vector_database == vector_database
    client_public = client.public_key.format(compressed=True)
    assert data.client_public_key == client_public
    assert data.client_address == address_of(client_public)
    assert data.recovery_public_key == (client_public if include_recovery_key else None)
    assert session_key.hex() not in repr(data)
    # Anyone else's host key cannot open it.
    other = HostKey.generate(rng.randbytes)
    if other.public_key != host.public_key:
        with pytest.raises(DecryptionFailed):
            open_session_init(other, init)
