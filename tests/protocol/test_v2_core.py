"""Protocol v2 core, both sides, without sockets: handshake, session, records, attacks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from coincurve import PrivateKey

from node.crypto.curve import HALF_N, SECP256K1_N, address_of
from node.crypto.errors import DecryptionFailed, ErrorCode
from node.crypto.hostkey import HostKey
from node.crypto.noise import SECP256K1, HandshakeState
from node.protocol.connection import (
    CancelRequest,
    Close,
    SessionEnded,
    SessionStarted,
    StartRequest,
)
from node.protocol.errors import ProtocolError
from node.protocol.v2 import records as r
from node.protocol.v2.client import (
    Chunk,
    ClientConnectionV2,
    Closed,
    End,
    ErrorReceived,
    HandshakeComplete,
    Pong,
    SessionAccepted,
    V2ClientError,
)
from node.protocol.v2.server import Send, ServerConnectionV2, V2Config
from node.protocol.v2.session import SessionTerms, sign_session

TERMS = SessionTerms(job_id=42, model="smollm2", price_per_token=1000, chain_id=84532)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sends(actions: list[Any]) -> list[bytes]:
    return [a.frame for a in actions if isinstance(a, Send)]


def _only_send(actions: list[Any]) -> bytes:
    frames = _sends(actions)
    assert len(frames) == 1, actions
    return frames[0]


def _closes(actions: list[Any]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def handshake(
    host: HostKey | None = None, padding: int = 0, config: V2Config | None = None
) -> tuple[ServerConnectionV2, ClientConnectionV2, HostKey]:
    host = host or HostKey.generate()
    server = ServerConnectionV2(host_key=host, clock=Clock(), config=config)
    client = ClientConnectionV2(host.public_key, padding=padding)
    events = client.receive(_only_send(server.receive(client.start())))
    assert isinstance(events[0], HandshakeComplete)
    return server, client, host


def established(
    padding: int = 0, key: PrivateKey | None = None, config: V2Config | None = None
) -> tuple[ServerConnectionV2, ClientConnectionV2, PrivateKey]:
    server, client, _ = handshake(padding=padding, config=config)
    key = key or PrivateKey()
    actions = server.receive(client.session(TERMS, key))
    assert isinstance(actions[0], SessionStarted)
    (accepted,) = client.receive(_only_send(actions))
    assert isinstance(accepted, SessionAccepted)
    return server, client, key


def _error_of(client: ClientConnectionV2, frame: bytes) -> ErrorReceived:
    (event,) = client.receive(frame)
    assert isinstance(event, ErrorReceived)
    return event


# --------------------------------------------------------------------- handshake


def test_handshake_agrees_on_keys_hash_and_parameters() -> None:
    host = HostKey.generate()
    server = ServerConnectionV2(host_key=host, clock=Clock())
    client = ClientConnectionV2(host.public_key, padding=32)
    msg1 = client.start()
    assert len(msg1) == 33 + len(b'{"padding":32}') + 16
    msg2 = _only_send(server.receive(msg1))
    (done,) = client.receive(msg2)
    assert done == HandshakeComplete(32, server.handshake_hash)
    assert server.padding == client.padding == 32
    assert server.keys_held == client.keys_held == 1
    assert server.state == "session"
    # the handshake hash is the Noise h of Noise_NK_secp256k1_ChaChaPoly_SHA256
    assert done.handshake_hash == client.handshake_hash


def test_default_payload_is_an_empty_object_and_unknown_keys_are_ignored() -> None:
    host = HostKey.generate()
    client = ClientConnectionV2(host.public_key)
    msg1 = client.start()
    assert len(msg1) == 33 + 2 + 16
    initiator = HandshakeState(
        "NK", initiator=True, dh=SECP256K1, prologue=r.PROLOGUE, rs=host.public_key
    )
    server = ServerConnectionV2(host_key=host, clock=Clock())
    assert _only_send(server.receive(initiator.write_message(b'{"future":1,"padding":16}')))
    assert server.padding == 16


def test_mitm_with_another_static_key_cannot_read_message_one() -> None:
    real, impostor = HostKey.generate(), HostKey.generate()
    client = ClientConnectionV2(real.public_key)
    mitm = ServerConnectionV2(host_key=impostor, clock=Clock())
    actions = mitm.receive(client.start())
    assert _sends(actions) == []
    assert _closes(actions) == [Close(1008, "handshake failed")]
    assert mitm.keys_held == 0


def test_mitm_cannot_forge_message_two() -> None:
    real, impostor = HostKey.generate(), HostKey.generate()
    client = ClientConnectionV2(real.public_key)
    msg1 = client.start()
    # The impostor answers as if it were the host, with its own key pre-hashed.
    fake = HandshakeState(
        "NK", initiator=False, dh=SECP256K1, prologue=r.PROLOGUE, s=impostor.noise_keypair()
    )
    with pytest.raises(Exception):  # noqa: B017, PT011 - it cannot even read msg1
        fake.read_message(msg1)
    forged = SECP256K1.generate_keypair().public + bytes(40)
    with pytest.raises(V2ClientError) as info:
        client.receive(forged)
    assert info.value.code == "HOST_VERIFICATION_FAILED"
    assert client.keys_held == 0


def test_replayed_first_message_gives_a_handshake_the_replayer_cannot_finish() -> None:
    _server, _client, key = established()
    host_conn_msg1: list[bytes] = []
    # record a fresh client's first message and its session record
    host = HostKey.generate()
    victim = ClientConnectionV2(host.public_key)
    msg1 = victim.start()
    host_conn_msg1.append(msg1)
    original = ServerConnectionV2(host_key=host, clock=Clock())
    victim.receive(_only_send(original.receive(msg1)))
    session_record = victim.session(TERMS, key)
    assert isinstance(original.receive(session_record)[0], SessionStarted)
    # the attacker replays both to the same node on a new connection
    replay = ServerConnectionV2(host_key=host, clock=Clock())
    msg2 = _only_send(replay.receive(host_conn_msg1[0]))
    assert msg2 != _only_send(
        ServerConnectionV2(host_key=host, clock=Clock()).receive(msg1)
    )  # a fresh node ephemeral each time
    actions = replay.receive(session_record)
    assert not any(isinstance(a, SessionStarted | StartRequest) for a in actions)
    assert _sends(actions) == []
    assert _closes(actions) == [Close(1008, "record authentication failed")]
    assert replay.keys_held == 0


def test_bad_first_messages_close_without_an_answer() -> None:
    host = HostKey.generate()
    cases = [
        b"\x02" * 10,  # too short
        b"\x02" * (r.MAX_HANDSHAKE_MESSAGE + 1),  # too long
        b"\x05" + bytes(32) + bytes(16),  # not a point
    ]
    for payload in (b"[1]", b"not json", b'{"padding":3}', b'{"padding":true}'):
        hs = HandshakeState(
            "NK", initiator=True, dh=SECP256K1, prologue=r.PROLOGUE, rs=host.public_key
        )
        cases.append(hs.write_message(payload))
    for frame in cases:
        server = ServerConnectionV2(host_key=host, clock=Clock())
        actions = server.receive(frame)
        assert _sends(actions) == []
        assert [c.code for c in _closes(actions)] == [1008]
        assert server.closed
        assert server.receive(frame) == []  # closed is final


def test_text_frames_timeouts_and_oversize_frames() -> None:
    host = HostKey.generate()
    server = ServerConnectionV2(host_key=host, clock=Clock())
    assert _closes(server.receive_text()) == [Close(1003, "v2 takes binary frames only")]
    assert server.receive_text() == []
    server = handshake()[0]
    assert [c.code for c in _closes(server.receive_text())] == [1008]
    server = handshake()[0]
    assert [c.code for c in _closes(server.timeout())] == [1008]
    assert server.keys_held == 0
    server = established()[0]
    assert server.timeout() == []  # the session arrived: no deadline any more
    actions = server.receive(bytes(r.MAX_FRAME + 1))
    assert [c.code for c in _closes(actions)] == [1009]
    assert any(isinstance(a, SessionEnded) for a in actions)


# --------------------------------------------------------------------- session


def test_session_starts_with_the_recovered_address() -> None:
    key = PrivateKey()
    server, client, _ = established(key=key)
    assert server.session is not None
    session = server.session
    assert session.client_address == address_of(key.public_key)
    assert (session.job_id, session.model_name, session.price_per_token, session.chain_id) == (
        42,
        "smollm2",
        1000,
        84532,
    )
    assert session.protocol == "v2"
    assert session.encrypted
    assert session.session_id == server.handshake_hash[:16].hex()  # type: ignore[index]
    assert client.state == server.state == "ready"


def test_signature_for_another_handshake_is_refused() -> None:
    key = PrivateKey()
    server, client, _ = handshake()
    _other_server, other_client, _ = handshake()
    assert other_client.handshake_hash is not None
    signature = sign_session(other_client.handshake_hash, TERMS, key)
    actions = server.receive(client.signed_session(TERMS, address_of(key.public_key), signature))
    assert not any(isinstance(a, SessionStarted) for a in actions)
    error = _error_of(client, _sends(actions)[0])
    assert error.code == "SESSION_AUTH_DENIED"
    assert [c.code for c in _closes(actions)] == [1008]
    assert server.keys_held == 0


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda o: o.update(address="0x" + "11" * 20), "SESSION_AUTH_DENIED"),
        (lambda o: o.update(job_id="43"), "SESSION_AUTH_DENIED"),  # other terms than signed
        (lambda o: o.update(job_id="042"), "INVALID_SESSION_DATA"),
        (lambda o: o.update(job_id=42), "INVALID_SESSION_DATA"),
        (lambda o: o.update(price_per_token="1" * 79), "INVALID_SESSION_DATA"),
        (lambda o: o.update(price_per_token=str(2**256)), "INVALID_SESSION_DATA"),
        (lambda o: o.update(model="a\nprice: 0"), "INVALID_SESSION_DATA"),
        (lambda o: o.update(model=""), "INVALID_SESSION_DATA"),
        (lambda o: o.update(chain_id=True), "INVALID_SESSION_DATA"),
        (lambda o: o.update(chain_id=0), "INVALID_SESSION_DATA"),
        (lambda o: o.update(recovery_key="0x02" + "00" * 32), "INVALID_SESSION_DATA"),
        (lambda o: o.update(recovery_key="0x04" + "00" * 32), "INVALID_SESSION_DATA"),
        (lambda o: o.update(vector_db="x" * 1025), "INVALID_SESSION_DATA"),
        (lambda o: o.update(address="0x1234"), "INVALID_SESSION_DATA"),
        (lambda o: o.update(signature="0x00"), "INVALID_SIGNATURE"),
        (lambda o: o.update(signature="0x" + "00" * 64 + "1b"), "INVALID_SIGNATURE"),
    ],
)
def test_bad_session_records_are_refused(mutate: Any, code: str) -> None:
    key = PrivateKey()
    server, client, _ = handshake()
    assert client.handshake_hash is not None
    signature = sign_session(client.handshake_hash, TERMS, key)
    from node.protocol.v2.session import session_record_object

    obj = session_record_object(TERMS, address_of(key.public_key), signature)
    mutate(obj)
    frame = client._record(r.DATA, obj)
    actions = server.receive(frame)
    assert _error_of(client, _sends(actions)[0]).code == code
    assert [c.code for c in _closes(actions)] == [1008]


def test_high_s_signature_is_refused() -> None:
    key = PrivateKey()
    server, client, _ = handshake()
    assert client.handshake_hash is not None
    sig = sign_session(client.handshake_hash, TERMS, key)
    s = int.from_bytes(sig[32:64], "big")
    assert s <= HALF_N
    flipped = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((sig[64] ^ 1,))
    actions = server.receive(client.signed_session(TERMS, address_of(key.public_key), flipped))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_SIGNATURE"


def test_recovery_key_and_vector_db_are_signed() -> None:
    key = PrivateKey()
    other = PrivateKey()
    terms = SessionTerms(1, "m", 0, 1, key.public_key.format(), "my-db")
    server, client, _ = handshake()
    actions = server.receive(client.session(terms, key))
    assert isinstance(actions[0], SessionStarted)
    assert actions[0].session.vector_database == {"name": "my-db"}
    # a recovery key that is not the signer's
    server, client, _ = handshake()
    terms = SessionTerms(1, "m", 0, 1, other.public_key.format(), None)
    actions = server.receive(client.session(terms, key))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_SIGNATURE"


def test_allowed_clients() -> None:
    key = PrivateKey()
    config = V2Config(allowed_clients=frozenset({"0x" + "ab" * 20}))
    server, client, _ = handshake(config=config)
    actions = server.receive(client.session(TERMS, key))
    assert _error_of(client, _sends(actions)[0]).code == "SESSION_AUTH_DENIED"
    config = V2Config(allowed_clients=frozenset({address_of(key.public_key).lower()}))
    established(key=key, config=config)


def test_first_record_must_be_the_session() -> None:
    server, client, _ = handshake()
    client.state = "ready"  # force the client to send a request first
    actions = server.receive(client.request("r1", prompt="hi"))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_MESSAGE"
    assert [c.code for c in _closes(actions)] == [1008]


# --------------------------------------------------------------------- requests


def test_full_answer_with_chunks_end_and_usage() -> None:
    server, client, _ = established()
    actions = server.receive(
        client.request("r1", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=3)
    )
    (start,) = actions
    assert isinstance(start, StartRequest)
    assert start.request_id == "r1"
    assert start.request.messages == (("user", "hi"),)
    assert start.request.max_tokens == 8
    assert start.request.seed == 3
    assert client.receive(server.chunk("r1", "Hel", 1)) == [Chunk("r1", "Hel", 1)]
    assert client.receive(server.chunk("r1", "lo \u00e9", 2)) == [Chunk("r1", "lo \u00e9", 2)]
    assert server.active is not None
    assert server.active.completion_tokens == 3
    (end,) = client.receive(server.finish("r1", "stop", prompt_tokens=5))
    assert isinstance(end, End)
    assert (end.finish_reason, end.usage.prompt_tokens, end.usage.completion_tokens) == (
        "stop",
        5,
        3,
    )
    assert end.usage.total_tokens == 8
    assert server.active is None
    assert client.open_requests == set()
    client.connection_lost()  # nothing open: no truncation


def test_request_validation_uses_v1_rules() -> None:
    server, client, _ = established()
    actions = server.receive(client.request("r1", prompt="hi", max_tokens=0))
    error = _error_of(client, _only_send(actions))
    assert (error.code, error.request_id) == ("INVALID_PAYLOAD", "r1")
    actions = server.receive(client.request("r2"))
    assert _error_of(client, _only_send(actions)).code == "INVALID_PAYLOAD"
    actions = server.receive(client._record(r.DATA, {"type": "request", "prompt": "x"}))
    assert _error_of(client, _only_send(actions)).code == "INVALID_MESSAGE"  # no request_id


def test_one_request_at_a_time_cancel_and_ping() -> None:
    server, client, _ = established()
    assert isinstance(server.receive(client.request("a", prompt="x"))[0], StartRequest)
    error = _error_of(client, _only_send(server.receive(client.request("b", prompt="y"))))
    assert (error.code, error.request_id) == ("REQUEST_IN_PROGRESS", "b")
    assert server.receive(client.cancel("b")) == []
    assert server.receive(client.cancel("a")) == [CancelRequest("client requested cancel")]
    assert server.receive(client.cancel("a")) == []  # once
    assert client.receive(_only_send(server.receive(client.ping()))) == [Pong()]
    (end,) = client.receive(server.finish("a", "cancelled", prompt_tokens=1))
    assert isinstance(end, End)
    assert end.finish_reason == "cancelled"


def test_fail_ends_the_answer_with_an_error_record() -> None:
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    frame = server.fail("r1", ProtocolError(ErrorCode.TOKEN_LIMIT_EXCEEDED, "too long", n=5))
    error = _error_of(client, frame)
    assert (error.code, error.request_id) == ("TOKEN_LIMIT_EXCEEDED", "r1")
    assert client.open_requests == set()
    assert server.active is None
    with pytest.raises(RuntimeError):
        server.chunk("r1", "late", 1)
    with pytest.raises(ValueError, match="finish reason"):
        server.finish("r1", "done", prompt_tokens=0)


def test_protocol_errors_are_counted_then_the_connection_closes() -> None:
    server, client, _ = established(config=V2Config(max_errors=3))
    bad = [
        client._record(r.DATA, {"type": "nope"}),
        client._record(r.DATA, {"no": "type"}),
    ]
    for frame in bad:
        actions = server.receive(frame)
        assert _error_of(client, _only_send(actions)).code == "INVALID_MESSAGE"
        assert _closes(actions) == []
    plain = r.encode_record(r.DATA, b"\xff not json")
    assert client._send is not None
    actions = server.receive(client._send.encrypt(plain))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_MESSAGE"
    assert [c.code for c in _closes(actions)] == [1008]


def test_second_session_record_is_refused_but_not_fatal() -> None:
    server, client, key = established()
    assert client.handshake_hash is not None
    from node.protocol.v2.session import session_record_object

    obj = session_record_object(
        TERMS, address_of(key.public_key), sign_session(client.handshake_hash, TERMS, key)
    )
    actions = server.receive(client._record(r.DATA, obj))
    assert _error_of(client, _only_send(actions)).code == "INVALID_MESSAGE"
    assert server.state == "ready"


@pytest.mark.parametrize("kind", [r.END, r.ERROR, 0x00, 0x09])
def test_records_a_client_may_not_send_close_the_connection(kind: int) -> None:
    server, client, _ = established()
    assert client._send is not None
    plain = bytearray(r.encode_record(r.DATA, b"{}"))
    plain[0] = kind
    actions = server.receive(client._send.encrypt(plain))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_MESSAGE"
    assert [c.code for c in _closes(actions)] == [1008]


# --------------------------------------------------------- tampering and ordering


def _record_stream(n: int) -> tuple[ServerConnectionV2, ClientConnectionV2, list[bytes]]:
    server, client, _ = established()
    return server, client, [client.ping() for _ in range(n)]


def _assert_fatal(server: ServerConnectionV2, actions: list[Any]) -> None:
    assert _sends(actions) == []  # no record after an authentication failure
    assert _closes(actions) == [Close(1008, "record authentication failed")]
    assert any(isinstance(a, SessionEnded) for a in actions)
    assert server.keys_held == 0
    assert server.receive(b"anything") == []


def test_tampered_record_is_fatal_and_wipes() -> None:
    server, _client, frames = _record_stream(1)
    assert server._recv is not None
    k, ck = server._recv.secrets_for_tests()
    frame = bytearray(frames[0])
    frame[3] ^= 0x40
    _assert_fatal(server, server.receive(bytes(frame)))
    assert k.is_all_zero()
    assert ck.is_all_zero()


def test_dropped_record_is_fatal() -> None:
    server, _client, frames = _record_stream(2)
    _assert_fatal(server, server.receive(frames[1]))


def test_reordered_records_are_fatal() -> None:
    server, _client, frames = _record_stream(2)
    _assert_fatal(server, server.receive(frames[1]))


def test_duplicated_record_is_fatal() -> None:
    server, _client, frames = _record_stream(1)
    assert _only_send(server.receive(frames[0]))
    _assert_fatal(server, server.receive(frames[0]))


def test_short_frame_is_an_authentication_failure() -> None:
    server, _client, _ = established()
    _assert_fatal(server, server.receive(b"\x00" * 20))


def test_active_request_is_cancelled_when_the_connection_dies() -> None:
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    actions = server.receive(b"\x00" * 40)
    assert isinstance(actions[0], CancelRequest)
    assert server.active is None


@pytest.mark.parametrize("attack", ["tamper", "drop", "reorder", "duplicate"])
def test_client_detects_attacks_on_the_answer(attack: str) -> None:
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    frames = [server.chunk("r1", f"part{i}", 1) for i in range(3)]
    if attack == "tamper":
        frames[0] = frames[0][:-1] + bytes((frames[0][-1] ^ 1,))
    elif attack == "drop":
        del frames[0]
    elif attack == "reorder":
        frames[0], frames[1] = frames[1], frames[0]
    else:
        client.receive(frames[0])
    with pytest.raises(V2ClientError) as info:
        client.receive(frames[0])
    assert info.value.code == "CHUNK_AUTHENTICATION_FAILED"
    assert client.keys_held == 0
    with pytest.raises(V2ClientError) as again:
        client.receive(frames[1])
    assert again.value.code == "SESSION_CLOSED"


def test_truncation_is_detected_by_the_client() -> None:
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    client.receive(server.chunk("r1", "partial", 1))
    with pytest.raises(V2ClientError) as info:
        client.connection_lost()
    assert info.value.code == "STREAM_TRUNCATED"
    assert client.keys_held == 0


def test_goodbye_records_both_ways() -> None:
    server, client, _ = established()
    frame = server.goodbye("maintenance")
    assert frame is not None
    assert client.receive(frame) == [Closed("maintenance")]
    assert client.goodbye_received
    client.connection_lost()  # a clean end
    server, client, _ = established()
    actions = server.receive(client.close("done"))
    assert _closes(actions) == [Close(1000, "client said goodbye")]
    assert server.goodbye() is None
    assert client.keys_held == server.keys_held == 0
    with pytest.raises(V2ClientError):
        client.ping()


def test_client_refuses_records_that_do_not_belong() -> None:
    server, client, _ = established()
    with pytest.raises(V2ClientError) as info:
        client.receive(server._data({"type": "chunk", "request_id": "zz", "text": "", "tokens": 0}))
    assert info.value.code == "UNEXPECTED_FRAME"
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    end = server._record(r.END, {"request_id": "r1", "finish_reason": "bored", "usage": {}})
    with pytest.raises(V2ClientError) as info:
        client.receive(end)
    assert info.value.code == "MALFORMED_FRAME"
    server, client, _ = established()
    with pytest.raises(V2ClientError) as info:
        client.receive(server._record(r.END, {"request_id": "x"}))
    assert info.value.code == "UNEXPECTED_FRAME"


# --------------------------------------------------------------------- padding


@pytest.mark.parametrize("block", [16, 64, 256])
def test_padding_hides_lengths_in_both_directions(block: int) -> None:
    server, client, _ = established(padding=block)
    frames = [client.request("r1", prompt="x" * n) for n in (1,)]
    server.receive(frames[0])
    sizes = set()
    for text in ("a", "ab", "abc" * 3):
        frame = server.chunk("r1", text, 1)
        assert (len(frame) - 16) % block == 0
        sizes.add(len(frame))
        client.receive(frame)
    if block == 256:
        assert len(sizes) == 1  # three lengths, one size on the wire
    ping = client.ping()
    assert (len(ping) - 16) % block == 0


def test_padding_is_checked() -> None:
    server, client, _ = established(padding=16)
    assert client._send is not None
    plain = r.encode_record(r.DATA, b'{"type":"ping"}', 16)
    plain[-1] = 1  # nonzero padding
    actions = server.receive(client._send.encrypt(plain))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_MESSAGE"
    assert [c.code for c in _closes(actions)] == [1008]
    server, client, _ = established(padding=16)
    assert client._send is not None
    actions = server.receive(client._send.encrypt(r.encode_record(r.DATA, b'{"type":"ping"}', 0)))
    assert [c.code for c in _closes(actions)] == [1008]


def test_client_refuses_a_node_that_ignores_padding() -> None:
    host = HostKey.generate()
    client = ClientConnectionV2(host.public_key, padding=64)
    responder = HandshakeState(
        "NK", initiator=False, dh=SECP256K1, prologue=r.PROLOGUE, s=host.noise_keypair()
    )
    responder.read_message(client.start())
    reply = {"protocol": r.PROTOCOL_ID, "max_record": r.MAX_BODY, "rekey_every": 1000, "padding": 0}
    with pytest.raises(V2ClientError) as info:
        client.receive(responder.write_message(json.dumps(reply).encode()))
    assert info.value.code == "UNEXPECTED_FRAME"


@pytest.mark.parametrize(
    "reply",
    [
        {"protocol": "llm-node/3", "max_record": 65536, "rekey_every": 1000},
        {"protocol": "llm-node/2", "max_record": 1, "rekey_every": 1000},
        {"protocol": "llm-node/2", "max_record": 65536, "rekey_every": 10},
        {"protocol": "llm-node/2", "max_record": 65536, "rekey_every": 1000, "padding": 5},
        [],
    ],
)
def test_client_checks_the_node_parameters(reply: Any) -> None:
    host = HostKey.generate()
    client = ClientConnectionV2(host.public_key)
    responder = HandshakeState(
        "NK", initiator=False, dh=SECP256K1, prologue=r.PROLOGUE, s=host.noise_keypair()
    )
    responder.read_message(client.start())
    with pytest.raises(V2ClientError):
        client.receive(responder.write_message(json.dumps(reply).encode()))
    assert client.keys_held == 0


# --------------------------------------------------------------------- rotation


def test_rotation_at_1000_records_per_direction() -> None:
    server, client, _ = established()
    assert server._recv is not None
    assert server._send is not None
    assert client._send is not None
    # the session record and its ack used nonce 0 in each direction
    for _ in range(998):
        client.receive(_only_send(server.receive(client.ping())))
    assert server._recv.n == 999
    assert server._recv.rotations == 0
    client.receive(_only_send(server.receive(client.ping())))  # record 1000 each way
    assert server._recv.rotations == server._send.rotations == 1
    assert client._send.rotations == 1
    assert server._recv.n == 0
    assert client.receive(_only_send(server.receive(client.ping()))) == [Pong()]
    assert server._recv.n == 1


# --------------------------------------------------------------------- wiping


def test_close_wipes_every_key_on_both_sides() -> None:
    server, client, _ = established()
    buffers = []
    for cipher in (server._send, server._recv, client._send, client._recv):
        assert cipher is not None
        buffers.extend(cipher.secrets_for_tests())
    ended = server.close("done")
    assert [type(e) for e in ended] == [SessionEnded]
    assert server.close("again") == []
    client.wipe()
    assert all(b.is_all_zero() for b in buffers)
    assert server.keys_held == client.keys_held == 0


def test_wipe_during_handshake_and_host_key_is_left_alone() -> None:
    host = HostKey.generate()
    server = ServerConnectionV2(host_key=host, clock=Clock())
    assert server.keys_held == 1
    server.close()
    assert server.keys_held == 0
    assert not host.wiped
    host.sign_challenge(b"still usable")


def test_records_and_limits() -> None:
    with pytest.raises(ValueError, match="record type"):
        r.encode_record(7, b"")
    with pytest.raises(ValueError, match="at most"):
        r.encode_record(r.DATA, bytes(r.MAX_BODY + 1))
    assert r.parse_record(r.encode_record(r.DATA, bytes(r.MAX_BODY), 256), 256)[1] == bytes(
        r.MAX_BODY
    )
    assert len(r.encode_record(r.DATA, bytes(r.MAX_BODY), 256)) <= r.MAX_RECORD
    assert r.MAX_FRAME == 65536 + 1 + 4 + 255 + 16
    for bad in (b"\x01\x00", b"\x01\x00\x01\x00\x01" + bytes(5), b"\x01\x00\x00\x00\x09abc"):
        with pytest.raises(ProtocolError):
            r.parse_record(bad, 0)
    with pytest.raises(ProtocolError):
        r.parse_record(bytes(r.MAX_RECORD + 1), 0)
    server, client, _ = established()
    server.receive(client.request("r1", prompt="x"))
    with pytest.raises(ValueError, match="at most"):
        server.chunk("r1", "x" * r.MAX_BODY, 1)
    with pytest.raises(ValueError, match="padding"):
        ClientConnectionV2(b"\x02" * 33, padding=8)


# --------------------------------------------------------------------- client edges


def _raw(server: ServerConnectionV2, kind: int, body: bytes, padding: int = 0) -> bytes:
    assert server._send is not None
    plain = r.encode_record(r.DATA, body, padding)
    plain[0] = kind  # any type byte, even one the encoder refuses
    return server._send.encrypt(plain)


def _client_error(client: ClientConnectionV2, frame: bytes) -> str:
    with pytest.raises(V2ClientError) as info:
        client.receive(frame)
    assert client.keys_held == 0
    assert "V2ClientError(code=" in repr(info.value)
    return info.value.code


def test_client_call_order_is_enforced() -> None:
    host = HostKey.generate()
    client = ClientConnectionV2(host.public_key)
    assert client.keys_held == 1
    with pytest.raises(RuntimeError, match="start"):
        client.receive(b"x" * 60)
    with pytest.raises(RuntimeError, match="handshake"):
        client.session_terms_text(TERMS)
    with pytest.raises(RuntimeError, match="handshake"):
        client.session(TERMS, PrivateKey())
    client.start()
    with pytest.raises(RuntimeError, match="once"):
        client.start()
    client = handshake()[1]
    assert client.handshake_hash is not None
    from node.protocol.v2.session import signed_text

    assert client.session_terms_text(TERMS) == signed_text(client.handshake_hash, TERMS)
    with pytest.raises(RuntimeError, match="accepted"):
        client.request("r1", prompt="x")
    client.session(TERMS, PrivateKey())
    with pytest.raises(RuntimeError, match="once"):
        client.session(TERMS, PrivateKey())
    _server, client, _ = established()
    with pytest.raises(ValueError, match="request_id"):
        client.request("", prompt="x")


@pytest.mark.parametrize("size", [10, r.MAX_HANDSHAKE_MESSAGE + 1])
def test_client_refuses_bad_handshake_sizes(size: int) -> None:
    client = ClientConnectionV2(HostKey.generate().public_key)
    client.start()
    assert _client_error(client, bytes(size)) == "HOST_VERIFICATION_FAILED"


def test_client_refuses_malformed_records() -> None:
    cases: list[tuple[int, bytes, str]] = [
        (r.DATA, b"not json", "MALFORMED_FRAME"),
        (0x07, b"{}", "UNEXPECTED_FRAME"),
        (r.DATA, b'{"type":"session_ack"}', "UNEXPECTED_FRAME"),  # not after the ack
        (r.DATA, b'{"type":"chunk","request_id":5}', "MALFORMED_FRAME"),
        (r.END, b'{"request_id":"r1","finish_reason":"stop","usage":[]}', "MALFORMED_FRAME"),
        (
            r.END,
            b'{"request_id":"r1","finish_reason":"stop","usage":{"prompt_tokens":-1}}',
            "MALFORMED_FRAME",
        ),
        (r.ERROR, b'{"code":"X","message":"m","request_id":7}', "MALFORMED_FRAME"),
    ]
    for kind, body, code in cases:
        server, client, _ = established()
        server.receive(client.request("r1", prompt="x"))
        assert _client_error(client, _raw(server, kind, body)) == code, body
    server, client, _ = established(padding=16)
    plain = r.encode_record(r.DATA, b'{"type":"pong"}', 16)
    plain[-1] = 9
    assert server._send is not None
    assert _client_error(client, server._send.encrypt(plain)) == "MALFORMED_FRAME"
    server, client, _ = established()
    assert _client_error(client, bytes(r.MAX_FRAME + 1)) == "MALFORMED_FRAME"
    with pytest.raises(V2ClientError) as info:
        client.receive(b"")
    assert info.value.code == "SESSION_CLOSED"


def test_error_without_request_id_is_an_event() -> None:
    server, client, _ = established()
    (event,) = client.receive(_raw(server, r.ERROR, b'{"code":"RATE_LIMITED","message":"m"}'))
    assert event == ErrorReceived("RATE_LIMITED", "m", None)


def test_lone_surrogates_are_refused() -> None:
    server, client, _ = established()
    assert client._send is not None
    body = b'{"type":"request","request_id":"\\ud800","prompt":"x"}'
    actions = server.receive(client._send.encrypt(r.encode_record(r.DATA, body)))
    assert _error_of(client, _only_send(actions)).code == "INVALID_MESSAGE"
    server, client, _key = handshake()[0], handshake()[1], PrivateKey()
    server, client, _ = handshake()
    assert client._send is not None
    body = json.dumps(
        {"type": "session", "job_id": "1", "model": "m\ud800"}, ensure_ascii=True
    ).encode()
    actions = server.receive(client._send.encrypt(r.encode_record(r.DATA, body)))
    assert _error_of(client, _sends(actions)[0]).code == "INVALID_SESSION_DATA"
    assert server.streaming is False


def test_json_constants_and_closed_connections() -> None:
    server, client, _ = established()
    assert client._send is not None
    frame = client._send.encrypt(r.encode_record(r.DATA, b'{"type":"ping","x":NaN}'))
    assert _error_of(client, _only_send(server.receive(frame))).code == "INVALID_MESSAGE"
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server._data({"type": "pong"})


def test_forward_secrecy_a_later_host_key_opens_v1_but_not_v2() -> None:
    """Record a v1 init and a v2 session; give the attacker the host private key."""
    from node.crypto.session_init import open_session_init, parse_init_payload, seal_session_init

    host = HostKey.generate()
    wallet = PrivateKey()
    # v1: the recorded init opens with the host key alone, and with it the session key
    v1_key = bytes(range(32))
    recorded_v1 = seal_session_init(
        host.public_key, wallet, v1_key, job_id=1, model_name="m", price_per_token=0
    )
    opened = open_session_init(host, parse_init_payload(recorded_v1))
    assert opened.session_key.reveal() == v1_key
    # v2: record the whole session
    server = ServerConnectionV2(host_key=host, clock=Clock())
    client = ClientConnectionV2(host.public_key)
    msg1 = client.start()
    msg2 = _only_send(server.receive(msg1))
    client.receive(msg2)
    recorded = [client.session(TERMS, wallet)]
    recorded.append(_only_send(server.receive(recorded[0])))  # session_ack, node -> client
    client.receive(recorded[1])
    recorded.append(client.request("r1", prompt="secret prompt"))
    server.receive(recorded[2])
    # the attacker, holding the host key, can play the node's side of message 1 ...
    attacker = HandshakeState(
        "NK", initiator=False, dh=SECP256K1, prologue=r.PROLOGUE, s=host.noise_keypair()
    )
    assert bytes(attacker.read_message(msg1)) == b"{}"  # payload1 is not forward secret
    # ... but message 2 needs the node's ephemeral key, long erased, so the transport
    # keys it can derive are not the session's: no recorded record opens.
    attacker.write_message(b"")
    their_send, their_recv = attacker.transport()
    for frame, cipher in zip(recorded, (their_recv, their_send, their_recv), strict=True):
        with pytest.raises(DecryptionFailed):
            cipher.decrypt(frame)
    assert server.keys_held == 1
    server.close()
    assert server.keys_held == 0


@pytest.mark.parametrize(
    "text", ["", "plain", 'quote " and \\ backslash', "ctrl \x00\x1f\n\t", "\u00e9\u4e2d\U0001f600"]
)
@pytest.mark.parametrize("request_id", ["r1", 'id "quoted" \u00e9'])
def test_chunk_fast_path_writes_the_canonical_json(text: str, request_id: str) -> None:
    server, client, _ = established(padding=32)
    server.receive(client.request(request_id, prompt="x"))
    frame = server.chunk(request_id, text, 7)
    assert client._recv is not None
    plain = client._recv.decrypt(frame)
    kind, body = r.parse_record(plain, 32)
    assert kind == r.DATA
    assert body == r.dump_json(
        {"type": "chunk", "request_id": request_id, "text": text, "tokens": 7}
    )


def test_client_checks_the_acknowledged_address() -> None:
    server, client, _ = handshake()
    client.session(TERMS, PrivateKey())  # not delivered: the node's first record is forged
    ack = server._data(
        {"type": "session_ack", "session_id": "x", "client_address": "0x" + "22" * 20, "model": "m"}
    )
    with pytest.raises(V2ClientError) as info:
        client.receive(ack)
    assert info.value.code == "UNEXPECTED_FRAME"
