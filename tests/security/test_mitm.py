"""Man in the middle: an attacker on the path replaces the client's ephemeral key with its
own, so that it knows the init key, re-encrypts session data of its choosing to the host
(here the client's own session JSON, or one with a session key the attacker knows), and
keeps the client's signature to borrow the client's identity. The signature covers the
ephemeral key, so it no longer recovers ``recoveryPublicKey``: INVALID_SIGNATURE.
"""

from __future__ import annotations

import json
import os
from typing import Any

import trio
from coincurve import PrivateKey

from node.crypto import aead
from node.crypto.curve import address_of, parse_public_key
from node.crypto.hostkey import HostKey
from node.crypto.kdf import hkdf_sha256_fast32
from node.crypto.session_init import seal_session_init
from node.protocol.messages import SessionInitAck

from ._support import (
    DEV_HOST_KEY_HEX,
    build_node,
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
GUARD_S = 30


def client_init(session_key: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The client's genuine frame and the session JSON inside it (which the test knows
    because it plays the client; the attacker only needs to choose its own)."""
    payload = seal_session_init(HOST.public_key, CLIENT, session_key, job_id=9, model_name="m")
    session = {
        "sessionKey": session_key.hex(),
        "jobId": "9",
        "modelName": "m",
        "pricePerToken": 0,
        "recoveryPublicKey": "0x" + CLIENT.public_key.format().hex(),
    }
    frame = {"type": "encrypted_session_init", "session_id": "9", "job_id": "9", "payload": payload}
    return frame, session


def attacker_rewrap(frame: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """Encrypt ``session`` to the host under the attacker's own ephemeral key, keeping the
    client's nonce and signature."""
    attacker = PrivateKey()
    host_point = parse_public_key(HOST.public_key)
    shared = host_point.multiply(attacker.secret).format(compressed=True)[1:]
    key = bytes(hkdf_sha256_fast32(shared))
    nonce = bytes.fromhex(frame["payload"]["nonceHex"])
    sealed = aead.seal(key, nonce, json.dumps(session).encode(), b"")
    return with_payload(
        frame, ephPubHex=attacker.public_key.format(compressed=True), ciphertextHex=sealed
    )


def test_swapped_ephemeral_key_with_the_clients_session_data_is_refused() -> None:
    frame, session = client_init(os.urandom(32))
    state = protocol_state(HOST)
    assert refused_code(receive_text(state, json.dumps(attacker_rewrap(frame, session)))) == (
        "INVALID_SIGNATURE"
    )
    # The genuine frame, which the attacker held back, still works afterwards.
    [ack] = outputs(receive_text(state, json.dumps(frame)))
    assert isinstance(ack, SessionInitAck)
    assert ack.client_address == address_of(CLIENT.public_key)


def test_swapped_ephemeral_key_with_an_attacker_session_key_is_refused() -> None:
    frame, session = client_init(os.urandom(32))
    known_to_attacker = dict(session, sessionKey=os.urandom(32).hex())
    state = protocol_state(HOST)
    rewrapped = attacker_rewrap(frame, known_to_attacker)
    assert refused_code(receive_text(state, json.dumps(rewrapped))) == "INVALID_SIGNATURE"
    assert state.keys_held == 0


def test_without_a_recovery_key_the_attacker_gets_no_borrowed_identity() -> None:
    """An init without ``recoveryPublicKey`` binds nothing, so the rewrapped one opens; but
    the address it is accounted to is a random key's, never the client's."""
    frame, session = client_init(os.urandom(32))
    del session["recoveryPublicKey"]
    state = protocol_state(HOST)
    [ack] = outputs(receive_text(state, json.dumps(attacker_rewrap(frame, session))))
    assert isinstance(ack, SessionInitAck)
    assert ack.client_address != address_of(CLIENT.public_key)


async def test_mitm_rewrap_over_the_wire(node_factory: Any) -> None:
    node = await node_factory.start()
    frame, session = client_init(os.urandom(32))
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            await client.send(attacker_rewrap(frame, session))
            await client.expect_error("INVALID_SIGNATURE")
            assert node.held_keys() == []
            await client.send(frame)
            ack = await client.expect("session_init_ack")
    assert ack["client_address"] == address_of(CLIENT.public_key)


async def test_mitm_rewrap_over_memory_streams() -> None:
    node = build_node()
    frame, session = client_init(os.urandom(32))
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            await client.send(attacker_rewrap(frame, dict(session, sessionKey="ab" * 32)))
            await client.expect_error("INVALID_SIGNATURE")
            await client.ping()
    assert node.ctx.metrics.inits_accepted["encrypted"] == 0
