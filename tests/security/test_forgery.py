"""Forgery: an ``encrypted_session_init`` whose signature is not the client's own, valid,
low-S signature over the E2EEv1 digest is refused with INVALID_SIGNATURE, and no variant
yields an ack (PROTOCOL.md section 3, step 5).

Every variant decrypts fine (the attacker can always encrypt to the host key); only the
signature is wrong, so these tests prove that the signature check, not the AEAD, stops them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from coincurve import PrivateKey, PublicKey

from node.crypto.curve import SECP256K1_N, address_of, e2ee_v1_digest, sign_recoverable
from node.crypto.hostkey import HostKey
from node.crypto.kdf import ZERO_SALT
from node.protocol.messages import SessionInitAck

from ._support import (
    DEV_HOST_KEY_HEX,
    build_node,
    init_frame,
    memory_client,
    outputs,
    protocol_state,
    receive_text,
    refused_code,
    with_payload,
    ws_client,
)

HOST = HostKey.parse(DEV_HOST_KEY_HEX)
CLIENT = PrivateKey(bytes.fromhex("c1" * 32))
OTHER = PrivateKey(bytes.fromhex("0f" * 32))
N = SECP256K1_N
GUARD_S = 30


def _digest(payload: dict[str, Any]) -> bytes:
    return e2ee_v1_digest(
        bytes.fromhex(payload["ephPubHex"]),
        HOST.public_key,
        ZERO_SALT,
        bytes.fromhex(payload["nonceHex"]),
        b"",
        b"",
    )


def _int(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _split(signature: bytes) -> tuple[int, int, int]:
    return (
        int.from_bytes(signature[:32], "big"),
        int.from_bytes(signature[32:64], "big"),
        signature[64],
    )


Forge = Callable[[dict[str, Any], bytes], bytes]
_rng = random.Random(20_260_101)


def _high_s(payload: dict[str, Any], sig: bytes) -> bytes:
    r, s, v = _split(sig)
    return _int(r) + _int(N - s) + bytes((v ^ 1,))  # the malleated twin of a valid signature


def _other_init_signature(payload: dict[str, Any], sig: bytes) -> bytes:
    other, _ = init_frame(HOST.public_key, client_key=CLIENT)
    return bytes.fromhex(other["payload"]["signatureHex"])


FORGERIES: dict[str, Forge] = {
    "signed by another key": lambda p, sig: sign_recoverable(OTHER, _digest(p)),
    "random r, s": lambda p, sig: _rng.randbytes(64) + bytes((sig[64],)),
    "random r, s, v=1-v": lambda p, sig: _rng.randbytes(64) + bytes((sig[64] ^ 1,)),
    "all zero": lambda p, sig: bytes(65),
    "r = 0": lambda p, sig: bytes(32) + sig[32:],
    "s = 0": lambda p, sig: sig[:32] + bytes(32) + sig[64:],
    "r = n": lambda p, sig: _int(N) + sig[32:],
    "s = n": lambda p, sig: sig[:32] + _int(N) + sig[64:],
    "s = n + 1": lambda p, sig: sig[:32] + _int(N + 1) + sig[64:],
    "s = 2^256 - 1": lambda p, sig: sig[:32] + b"\xff" * 32 + sig[64:],
    "r = 2^256 - 1": lambda p, sig: b"\xff" * 32 + sig[32:],
    "high-S twin": _high_s,
    "s = n/2 + 1": lambda p, sig: sig[:32] + _int(N // 2 + 1) + sig[64:],
    "v flipped": lambda p, sig: sig[:64] + bytes((sig[64] ^ 1,)),
    **{f"v = {v}": (lambda p, sig, v=v: sig[:64] + bytes((v,))) for v in (2, 3, 26, 29, 30, 255)},
    "over SHA256(ciphertext), as the Rust node recovers": lambda p, sig: sign_recoverable(
        CLIENT, hashlib.sha256(bytes.fromhex(p["ciphertextHex"])).digest()
    ),
    "over the digest with another host key": lambda p, sig: sign_recoverable(
        CLIENT,
        e2ee_v1_digest(
            bytes.fromhex(p["ephPubHex"]),
            OTHER.public_key.format(),
            ZERO_SALT,
            bytes.fromhex(p["nonceHex"]),
            b"",
            b"",
        ),
    ),
    "the client's signature of another init": _other_init_signature,
}


def _forged(name: str, **seal: Any) -> dict[str, Any]:
    frame, _ = init_frame(HOST.public_key, client_key=CLIENT, **seal)
    signature = bytes.fromhex(frame["payload"]["signatureHex"])
    return with_payload(frame, signatureHex=FORGERIES[name](frame["payload"], signature))


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_signature_is_refused(name: str) -> None:
    state = protocol_state(HOST)
    frame = _forged(name)
    assert refused_code(receive_text(state, json.dumps(frame))) == "INVALID_SIGNATURE"
    assert state.sessions == {}
    assert state.keys_held == 0


def test_the_high_s_twin_is_a_real_signature_refused_by_policy_alone() -> None:
    """libsecp256k1 itself recovers the client's key from the twin: only the node's low-S
    rule stands between it and a second valid encoding of the same init."""
    frame, _ = init_frame(HOST.public_key, client_key=CLIENT)
    twin = _high_s(frame["payload"], bytes.fromhex(frame["payload"]["signatureHex"]))
    recovered = PublicKey.from_signature_and_message(twin, _digest(frame["payload"]), hasher=None)
    assert recovered.format() == CLIENT.public_key.format()


@pytest.mark.parametrize(
    "name", ["all zero", "r = 0", "s = 0", "s = n", "high-S twin", "v = 2", "v = 255"]
)
def test_malformed_signatures_are_refused_even_without_a_recovery_key(name: str) -> None:
    """The range, low-S and v rules hold on their own, not only through the key binding."""
    state = protocol_state(HOST)
    frame = _forged(name, include_recovery_key=False)
    assert refused_code(receive_text(state, json.dumps(frame))) == "INVALID_SIGNATURE"


@pytest.mark.parametrize("v_offset", [0, 27])
def test_the_genuine_signature_is_accepted_with_v_in_both_forms(v_offset: int) -> None:
    """The control: the same frames with the client's own signature get an ack."""
    state = protocol_state(HOST)
    frame, _ = init_frame(HOST.public_key, client_key=CLIENT)
    sig = bytes.fromhex(frame["payload"]["signatureHex"])
    frame = with_payload(frame, signatureHex=sig[:64] + bytes((sig[64] + v_offset,)))
    [ack] = outputs(receive_text(state, json.dumps(frame)))
    assert isinstance(ack, SessionInitAck)
    assert ack.client_address is not None
    assert ack.client_address.lower() == address_of(CLIENT.public_key).lower()


async def test_every_forgery_over_the_wire_is_refused_without_an_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = build_node(max_errors=1_000)
    with trio.fail_after(GUARD_S * 10):
        async with memory_client(node) as client:
            for i, name in enumerate(sorted(FORGERIES)):
                frame = _forged(name)
                frame["id"] = f"f{i}"
                await client.send(frame)
                await client.expect_error("INVALID_SIGNATURE", request_id=f"f{i}")
                await trio.sleep(1.0)  # (virtual time) stay under the init rate limit
            assert node.held_keys() == []
            await client.init(node.host_public_key, client_key=CLIENT)
    metrics = node.ctx.metrics
    assert metrics.inits_refused["INVALID_SIGNATURE"] == len(FORGERIES)
    assert metrics.inits_accepted["encrypted"] == 1


async def test_forgeries_over_tcp(node_factory: Any) -> None:
    node = await node_factory.start(max_errors=1_000)
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            for name in ("signed by another key", "high-S twin", "v = 29", "r = 0"):
                await client.send(_forged(name))
                await client.expect_error("INVALID_SIGNATURE")
            await client.ping()
    assert node.ctx.metrics.inits_accepted["encrypted"] == 0
