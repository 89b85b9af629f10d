"""Shared helpers for the protocol tests: fixed keys, a settable clock, a counting rng,
and client-side builders for encrypted frames (made with the crypto core's client helpers,
then run through ``encode``-free JSON text and ``decode`` like a real frame)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from coincurve import PrivateKey
from hypothesis import HealthCheck, settings

from node.crypto import HostKey, SecretBytes, aead, seal_session_init
from node.crypto.curve import address_of
from node.crypto.errors import ErrorCode
from node.protocol import (
    Action,
    ConnectionState,
    InitReplayCache,
    ProtocolConfig,
    Send,
    decode,
)
from node.protocol.messages import (
    EncryptedMessage,
    EncryptedSessionInit,
    ErrorMessage,
    InboundMessage,
)

HOST_SCALAR = bytes.fromhex("7e" * 32)
CLIENT = PrivateKey(bytes.fromhex("c1" * 32))
OTHER_CLIENT = PrivateKey(bytes.fromhex("0f" * 32))
CLIENT_ADDRESS = address_of(CLIENT.public_key)
OTHER_ADDRESS = address_of(OTHER_CLIENT.public_key)

# Hypothesis budget. CI runs the numbers below; multiply them with
# PROTOCOL_FUZZ_SCALE (for example PROTOCOL_FUZZ_SCALE=50) for a longer local run.
FUZZ_SCALE = float(os.environ.get("PROTOCOL_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int, **extra: Any) -> settings:
    return settings(
        max_examples=max(1, int(examples * FUZZ_SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        **extra,
    )


def host_key() -> HostKey:
    return HostKey(SecretBytes(HOST_SCALAR))


HOST = host_key()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingRng:
    """Deterministic, never-repeating bytes; remembers every output."""

    def __init__(self) -> None:
        self.outputs: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        counter = len(self.outputs) + 1
        out = (b"%08d" % counter * (n // 8 + 1))[:n]
        self.outputs.append(out)
        return out


def make_conn(
    *,
    host: HostKey | None = HOST,
    clock: Clock | None = None,
    cache: InitReplayCache | None = None,
    rng: CountingRng | None = None,
    **config: Any,
) -> ConnectionState:
    clock = clock or Clock()
    return ConnectionState(
        host_key=host,
        # not ``cache or ...``: an empty InitReplayCache is falsy (it has __len__)
        replay_cache=cache if cache is not None else InitReplayCache(window_s=900.0, clock=clock),
        clock=clock,
        config=ProtocolConfig(**config),
        rng=rng if rng is not None else CountingRng(),
    )


def frame(obj: dict[str, Any]) -> InboundMessage:
    return decode(json.dumps(obj))


def init_payload(
    session_key: bytes,
    *,
    job_id: int | str = 42,
    client: PrivateKey = CLIENT,
    host_public: bytes | None = None,
    model_name: str = "tiny-model",
    vector_database: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return seal_session_init(
        host_public if host_public is not None else HOST.public_key,
        client,
        session_key,
        job_id=job_id,
        model_name=model_name,
        price_per_token=7,
        vector_database=vector_database,
    )


def init_frame(
    payload: dict[str, Any], *, session_id: str = "42", request_id: Any = "init-1"
) -> EncryptedSessionInit:
    msg = frame(
        {
            "type": "encrypted_session_init",
            "session_id": session_id,
            "job_id": session_id,
            "chain_id": 84532,
            "payload": payload,
            "id": request_id,
        }
    )
    assert isinstance(msg, EncryptedSessionInit)
    return msg


def make_init(
    session_key: bytes, *, session_id: str = "42", job_id: int | str = 42, **kwargs: Any
) -> EncryptedSessionInit:
    return init_frame(init_payload(session_key, job_id=job_id, **kwargs), session_id=session_id)


def message_frame(
    key: bytes,
    index: int,
    plaintext: str | bytes = '{"prompt":"hello","max_tokens":8}',
    *,
    session_id: str = "42",
    request_id: Any = None,
    nonce: bytes | None = None,
    aad: bytes | None = None,
) -> EncryptedMessage:
    data = plaintext.encode("utf-8") if isinstance(plaintext, str) else plaintext
    nonce = nonce if nonce is not None else os.urandom(24)
    aad = aad if aad is not None else b"message_%d" % index
    obj: dict[str, Any] = {
        "type": "encrypted_message",
        "session_id": session_id,
        "payload": {
            "ciphertextHex": aead.seal(key, nonce, data, aad).hex(),
            "nonceHex": nonce.hex(),
            "aadHex": aad.hex(),
        },
    }
    if request_id is not None:
        obj["id"] = request_id
    msg = frame(obj)
    assert isinstance(msg, EncryptedMessage)
    return msg


def sends(actions: Iterable[Action]) -> list[Any]:
    return [a.message for a in actions if isinstance(a, Send)]


def errors(actions: Iterable[Action]) -> list[ErrorMessage]:
    return [m for m in sends(actions) if isinstance(m, ErrorMessage)]


def error_code(actions: list[Action]) -> ErrorCode:
    """The one error code in ``actions`` (fails when there is not exactly one)."""
    found = errors(actions)
    assert len(found) == 1, actions
    return ErrorCode(found[0].code)


def kinds(actions: Iterable[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def open_payload(key: bytes, payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """(aad, plaintext) of an encoded chunk/response payload."""
    aad = bytes.fromhex(payload["aadHex"])
    plain = aead.open(
        key, bytes.fromhex(payload["nonceHex"]), bytes.fromhex(payload["ciphertextHex"]), aad
    )
    return aad, plain
