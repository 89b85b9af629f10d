"""Tampering: every byte of an init's ephemeral key, nonce, ciphertext, tag and signature,
and of a message's nonce, ciphertext, tag and AAD, flipped in turn (eight single-bit masks
and 0xFF each), is refused; no variant yields an ack, a started request or any output.

The full sweep (several thousand variants) runs against the sans-I/O protocol core, fed
frame text exactly as the driver feeds it; a smaller sample goes through a real node over
the wire and must be answered the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Final

import trio
import trio.testing

from node.crypto.hostkey import HostKey
from node.inference.echo import EchoBackend
from node.protocol import InitReplayCache, StartRequest
from node.protocol.messages import SessionInitAck
from tests.server._support import CancelProbe

from ._support import (
    DEV_HOST_KEY_HEX,
    FixedClock,
    build_node,
    flip,
    init_frame,
    memory_client,
    outputs,
    protocol_state,
    receive_text,
    refused_code,
    with_payload,
)

HOST = HostKey.parse(DEV_HOST_KEY_HEX)
MASKS: Final = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF)
TAG: Final = 16
GUARD_S = 60

# What each field's damage may be answered with.
INIT_CODES: Final = {
    # Not a point / wrong prefix -> INVALID_PAYLOAD; another point -> DECRYPTION_FAILED;
    # the parity bit (02 <-> 03, i.e. -E) opens the same ciphertext, so the signature
    # binding is what refuses it.
    "ephPubHex": {"INVALID_PAYLOAD", "DECRYPTION_FAILED", "INVALID_SIGNATURE"},
    "nonceHex": {"DECRYPTION_FAILED"},
    "ciphertext": {"DECRYPTION_FAILED"},
    "tag": {"DECRYPTION_FAILED"},
    "signatureHex": {"INVALID_SIGNATURE"},
}
MESSAGE_CODES: Final = {
    "nonceHex": {"DECRYPTION_FAILED"},
    "ciphertext": {"DECRYPTION_FAILED"},
    "tag": {"DECRYPTION_FAILED"},
    # Another shape -> INVALID_AAD; another valid index (message_1 ...) -> the AEAD.
    "aadHex": {"INVALID_AAD", "DECRYPTION_FAILED"},
}


def _fields(payload: dict[str, Any], names: list[str]) -> dict[str, bytes]:
    """The payload's byte fields, with the ciphertext split into body and tag."""
    out = {name: bytes.fromhex(payload[name]) for name in names}
    sealed = bytes.fromhex(payload["ciphertextHex"])
    out["ciphertext"], out["tag"] = sealed[:-TAG], sealed[-TAG:]
    return out


def variants(
    frame: dict[str, Any], names: list[str], masks: tuple[int, ...] = MASKS
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(field, position, tampered frame) for every byte of every field and every mask."""
    fields = _fields(frame["payload"], names)
    for field, data in fields.items():
        for position in range(len(data)):
            for mask in masks:
                damaged = flip(data, position, mask)
                if field == "ciphertext":
                    update = {"ciphertextHex": damaged + fields["tag"]}
                elif field == "tag":
                    update = {"ciphertextHex": fields["ciphertext"] + damaged}
                else:
                    update = {field: damaged}
                yield field, position, with_payload(frame, **update)


def test_every_byte_flip_of_an_init_is_refused() -> None:
    clock = FixedClock()
    cache = InitReplayCache(window_s=900.0, clock=clock)
    frame, _ = init_frame(HOST.public_key)
    state = protocol_state(HOST, replay_cache=cache, clock=clock)
    seen: Counter[tuple[str, str]] = Counter()
    count = 0
    for field, position, variant in variants(frame, ["ephPubHex", "nonceHex", "signatureHex"]):
        code = refused_code(receive_text(state, json.dumps(variant)))
        assert code in INIT_CODES[field], (field, position, code)
        seen[field, code] += 1
        count += 1
    assert state.sessions == {}
    assert state.keys_held == 0
    assert len(cache) == 0  # nothing refused was remembered as "used"
    # The sweep covered every byte: 33 + 24 + 65 + ciphertext + tag, nine masks each.
    sealed = len(bytes.fromhex(frame["payload"]["ciphertextHex"]))
    assert count == (33 + 24 + 65 + sealed) * len(MASKS) > 2_500
    assert seen["ephPubHex", "INVALID_SIGNATURE"] == 1  # only 02 <-> 03 keeps the x
    # The untouched frame still opens: no variant burnt its replay-cache slot.
    [ack] = outputs(receive_text(state, json.dumps(frame)))
    assert isinstance(ack, SessionInitAck)


def test_a_nonempty_aad_on_an_init_is_refused() -> None:
    """The SDK sends aadHex ""; anything else changes both the AEAD and the digest."""
    state = protocol_state(HOST)
    frame, _ = init_frame(HOST.public_key)
    for aad in (b"\x00", b"message_0", b"x" * 40):
        variant = with_payload(frame, aadHex=aad)
        assert refused_code(receive_text(state, json.dumps(variant))) == "DECRYPTION_FAILED"


def test_every_byte_flip_of_a_message_is_refused() -> None:
    state = protocol_state(HOST)
    init, session = init_frame(HOST.public_key, session_id="5")
    assert isinstance(outputs(receive_text(state, json.dumps(init)))[-1], SessionInitAck)
    prompt = "the tamper target prompt"
    frame = session.message_frame({"prompt": prompt, "max_tokens": 8}, index=0)
    seen: Counter[tuple[str, str]] = Counter()
    count = 0
    for field, position, variant in variants(frame, ["nonceHex", "aadHex"]):
        code = refused_code(receive_text(state, json.dumps(variant)))
        assert code in MESSAGE_CODES[field], (field, position, code)
        seen[field, code] += 1
        count += 1
    assert count > 900
    assert seen["aadHex", "DECRYPTION_FAILED"] > 0  # message_1.. shapes reach the AEAD
    assert state.active is None
    assert state.sessions["5"].next_index == 0  # no refused frame moved the counter
    # The genuine frame is still accepted as message_0.
    actions = receive_text(state, json.dumps(frame))
    [start] = [a for a in actions if isinstance(a, StartRequest)]
    assert start.request.prompt == prompt


def _sample(frame: dict[str, Any], names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """A few variants per field for the wire: first, middle and last byte, low bit."""
    picked = []
    for field, position, variant in variants(frame, names, masks=(0x01,)):
        length = len(_fields(frame["payload"], names)[field])
        if position in {0, length // 2, length - 1}:
            picked.append((field, variant))
    return picked


async def test_a_sample_of_tampered_frames_over_the_wire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = CancelProbe(EchoBackend())
    node = build_node(backend=probe, max_errors=10_000)
    init, session = init_frame(node.host_public_key, session_id="5")
    message = session.message_frame({"prompt": "wire tamper target"}, index=0, request_id="m")
    init_variants = _sample(init, ["ephPubHex", "nonceHex", "signatureHex"])
    message_variants = _sample(message, ["nonceHex", "aadHex"])
    with trio.fail_after(GUARD_S * 100):
        async with memory_client(node) as client:
            for field, variant in init_variants:
                await client.send(variant)
                reply = await client.expect("error")
                assert reply["code"] in INIT_CODES[field], (field, reply)
                await trio.sleep(1.0)  # (virtual time) stay under the init rate limit
            assert node.held_keys() == []
            await client.send(init)
            await client.expect("session_init_ack")
            for field, variant in message_variants:
                await client.send(variant)
                reply = await client.expect("error")
                assert reply["code"] in MESSAGE_CODES[field], (field, reply)
            await client.ping()  # nothing but the errors came back
            assert probe.calls == []
            await client.send(message)
            result = await client.collect(session, request_id="m")
            assert result.text == "wire tamper target"
    assert len(init_variants) == 5 * 3
    assert len(message_variants) == 4 * 3
    assert node.ctx.metrics.inits_accepted["encrypted"] == 1
    assert [c.prompt for c in probe.calls] == ["wire tamper target"]
