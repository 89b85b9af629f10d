"""Property tests for the v2 core: whatever arrives, the node answers with actions (never an
exception), the record parser raises only ProtocolError, and the client raises only
V2ClientError. Budgets scale with PROTOCOL_FUZZ_SCALE like the v1 fuzz tests."""

from __future__ import annotations

import json
from typing import Any

from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from node.crypto.hostkey import HostKey
from node.crypto.secret import SecretBytes
from node.protocol.connection import Close
from node.protocol.errors import ProtocolError
from node.protocol.v2 import records as r
from node.protocol.v2.client import ClientConnectionV2, V2ClientError
from node.protocol.v2.server import Send, ServerConnectionV2
from node.protocol.v2.session import SessionTerms
from tests.protocol._support import fuzz_settings

HOST = HostKey(SecretBytes(b"\x42" * 32))
WALLET = PrivateKey(b"\x43" * 32)
TERMS = SessionTerms(7, "m", 1, 1)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "type",
    "request_id",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "stop",
    "seed",
    "model",
    "job_id",
    "chain_id",
    "address",
    "signature",
    "price_per_token",
]
DATA_OBJECTS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=6).map(
    lambda d: d if "type" in d else {**d, "type": "request"}
)


def _ready() -> tuple[ServerConnectionV2, ClientConnectionV2]:
    server = ServerConnectionV2(host_key=HOST, clock=lambda: 0.0)
    client = ClientConnectionV2(HOST.public_key)
    sent = [a.frame for a in server.receive(client.start()) if isinstance(a, Send)]
    client.receive(sent[0])
    ack = [a.frame for a in server.receive(client.session(TERMS, WALLET)) if isinstance(a, Send)]
    client.receive(ack[0])
    return server, client


def _check(actions: list[Any]) -> None:
    assert isinstance(actions, list)
    closes = [a for a in actions if isinstance(a, Close)]
    assert len(closes) <= 1


@fuzz_settings(300)
@given(st.binary(max_size=300))
def test_any_first_message(frame: bytes) -> None:
    server = ServerConnectionV2(host_key=HOST, clock=lambda: 0.0)
    _check(server.receive(frame))


@fuzz_settings(300)
@given(st.binary(max_size=200), st.sampled_from([0, 16, 256]))
def test_record_parser_raises_only_protocol_error(data: bytes, padding: int) -> None:
    try:
        kind, body = r.parse_record(data, padding)
    except ProtocolError:
        return
    assert len(body) <= r.MAX_BODY
    assert kind == data[0]


@fuzz_settings(100)
@given(st.lists(DATA_OBJECTS, min_size=1, max_size=4))
def test_any_authentic_data_records(objects: list[dict[str, Any]]) -> None:
    server, client = _ready()
    for obj in objects:
        try:
            body = json.dumps(obj).encode()
        except (TypeError, ValueError):
            continue
        if len(body) > r.MAX_BODY:
            continue
        assert client._send is not None
        _check(server.receive(client._send.encrypt(r.encode_record(r.DATA, body))))
        if server.closed:
            break


@fuzz_settings(150)
@given(st.integers(0, 255), st.binary(max_size=64))
def test_any_record_type_and_body_to_the_client(kind: int, body: bytes) -> None:
    server, client = _ready()
    assert server._send is not None
    plain = bytearray(5 + len(body))
    plain[0] = kind
    plain[1:5] = len(body).to_bytes(4, "big")
    plain[5:] = body
    try:
        events = client.receive(server._send.encrypt(plain))
    except V2ClientError:
        assert client.keys_held == 0
        return
    assert isinstance(events, list)
