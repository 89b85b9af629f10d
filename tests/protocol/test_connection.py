"""ConnectionState rules (PROTOCOL.md sections 3-6), one test per rule."""

from __future__ import annotations

import os

import attrs
import pytest
from coincurve import PrivateKey, PublicKey

from node.crypto.errors import DecryptionFailed, ErrorCode, NodeError
from node.crypto.session_init import InitPayload
from node.protocol import (
    CancelRequest,
    Close,
    HoldTimer,
    InitReplayCache,
    PlaintextDeprecated,
    SessionEnded,
    SessionStarted,
    StartRequest,
)
from node.protocol.connection import ENCRYPTED_ACK_TEXT, ConnectionState
from node.protocol.errors import CLOSE_POLICY_VIOLATION, ProtocolError
from node.protocol.messages import (
    ErrorMessage,
    InboundMessage,
    Ping,
    Pong,
    SessionInitAck,
    StreamCancel,
)
from tests.crypto._frames import DELETE, Frame, session
from tests.protocol._support import (
    CLIENT,
    CLIENT_ADDRESS,
    OTHER_ADDRESS,
    OTHER_CLIENT,
    Clock,
    error_code,
    frame,
    init_frame,
    init_payload,
    kinds,
    make_conn,
    make_init,
    message_frame,
    sends,
)

E = ErrorCode
K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = bytes(range(200, 232))


def fresh() -> bytes:
    """A new session key: each init needs its own."""
    return os.urandom(32)


def plain_init(
    session_id: str = "7", job_id: str = "7", request_id: object = None
) -> InboundMessage:
    return frame(
        {"type": "session_init", "session_id": session_id, "job_id": job_id, "id": request_id}
    )


def prompt(text: str = "hi", **extra: object) -> InboundMessage:
    return frame({"type": "prompt", "prompt": text, **extra})


def start(conn: ConnectionState, key: bytes, index: int, session_id: str = "42") -> StartRequest:
    actions = conn.receive(message_frame(key, index, session_id=session_id))
    assert kinds(actions) == ["StartRequest"], actions
    return actions[0]  # type: ignore[return-value]


def session_key_buffer(conn: ConnectionState, session_id: str = "42") -> object:
    key = conn.sessions[session_id].key
    assert key is not None
    return key


# ------------------------------------------------------------------------ modes


def test_fresh_connection_accepts_encrypted_init() -> None:
    conn = make_conn()
    actions = conn.receive(make_init(K1, vector_database={"manifestPath": "m"}))
    assert kinds(actions) == ["SessionStarted", "Send"]
    ack = sends(actions)[0]
    assert ack == SessionInitAck(
        session_id="42",
        job_id=42,
        chain_id=84532,
        message=ENCRYPTED_ACK_TEXT,
        client_address=CLIENT_ADDRESS,
        id="init-1",
    )
    session = conn.sessions["42"]
    assert session.encrypted
    assert session.key is not None
    assert session.key.equals(K1)
    assert (session.model_name, session.price_per_token) == ("tiny-model", 7)
    assert session.vector_database == {"manifestPath": "m"}
    assert session.next_index == 0
    assert conn.keys_held == 1
    assert "key" not in repr(session).lower().replace("keys", "")


def test_fresh_connection_accepts_plaintext_init_and_prompt() -> None:
    conn = make_conn()
    actions = conn.receive(plain_init(request_id="p1"))
    assert kinds(actions) == ["PlaintextDeprecated", "SessionStarted", "Send"]
    ack = sends(actions)[0]
    assert isinstance(ack, SessionInitAck)
    assert ack.client_address is None
    assert (ack.session_id, ack.job_id, ack.id) == ("7", 7, "p1")
    actions = conn.receive(prompt(session_id="7", id="r"))
    assert kinds(actions) == ["StartRequest"]
    assert actions[0].session is conn.sessions["7"]  # type: ignore[union-attr]
    assert actions[0].request_id == "r"  # type: ignore[union-attr]


def test_plaintext_deprecation_is_emitted_once_per_connection() -> None:
    conn = make_conn()
    seen = []
    seen += conn.receive(plain_init())
    seen += conn.receive(prompt(session_id="7"))
    conn.finish("stop", prompt_tokens=1)
    seen += conn.receive(plain_init("8", "8"))
    seen += conn.receive(prompt())
    assert sum(isinstance(a, PlaintextDeprecated) for a in seen) == 1
    assert isinstance(make_conn().receive(prompt())[0], PlaintextDeprecated)


def test_upgrade_plaintext_to_encrypted_is_allowed_then_no_downgrade() -> None:
    conn = make_conn()
    conn.receive(plain_init("42", "42"))
    actions = conn.receive(make_init(K1))
    assert kinds(actions) == ["SessionEnded", "SessionStarted", "Send"]
    assert actions[0].reason == "reinit"  # type: ignore[union-attr]
    assert conn.sessions["42"].encrypted
    assert error_code(conn.receive(prompt())) is E.MIXED_MODE_REJECTED
    assert error_code(conn.receive(plain_init("9", "9"))) is E.MIXED_MODE_REJECTED


def test_plaintext_after_encrypted_session_is_mixed_mode() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    for message in (prompt(id="z"), frame({"type": "inference", "prompt": "p"}), plain_init()):
        actions = conn.receive(message)
        assert error_code(actions) is E.MIXED_MODE_REJECTED
        assert not any(isinstance(a, StartRequest | SessionStarted) for a in actions)
    assert sends(conn.receive(prompt(id="z")))[0].id == "z"


def test_no_host_key_means_encryption_not_supported() -> None:
    conn = make_conn(host=None)
    assert error_code(conn.receive(make_init(K1))) is E.ENCRYPTION_NOT_SUPPORTED
    assert error_code(conn.receive(message_frame(K1, 0))) is E.ENCRYPTION_NOT_SUPPORTED
    assert conn.keys_held == 0
    assert kinds(conn.receive(prompt())) == [
        "PlaintextDeprecated",
        "SessionStarted",
        "StartRequest",
    ]


def test_require_encryption_refuses_plaintext() -> None:
    conn = make_conn(require_encryption=True)
    assert error_code(conn.receive(plain_init())) is E.ENCRYPTION_REQUIRED
    assert error_code(conn.receive(prompt())) is E.ENCRYPTION_REQUIRED
    assert conn.sessions == {}
    assert kinds(conn.receive(make_init(K1))) == ["SessionStarted", "Send"]


# ----------------------------------------------------------------------- re-init


def test_reinit_wipes_the_old_key_and_resets_the_counter() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    start(conn, K1, 0)
    conn.finish("stop", prompt_tokens=1)
    start(conn, K1, 4)
    conn.finish("stop", prompt_tokens=1)
    old = conn.sessions["42"]
    old_key = old.key
    assert old_key is not None
    assert old.next_index == 5
    actions = conn.receive(make_init(K2))
    assert kinds(actions) == ["Send"]  # same job: the session goes on under the new key
    assert old_key.wiped
    assert old_key.is_all_zero()
    new = conn.sessions["42"]
    assert new.key is not old_key
    assert new.next_index == 0
    assert new.key is not None
    assert new.key.equals(K2)
    start(conn, K2, 0)  # message_0 is fresh again under the new key
    conn.finish("stop", prompt_tokens=1)
    assert error_code(conn.receive(message_frame(K1, 7))) is E.DECRYPTION_FAILED
    assert conn.keys_held == 1


def test_reinit_with_another_job_ends_the_old_session() -> None:
    conn = make_conn()
    conn.receive(make_init(K1, job_id=1))
    old = conn.sessions["42"]
    actions = conn.receive(make_init(K2, job_id=2))
    assert kinds(actions) == ["SessionEnded", "SessionStarted", "Send"]
    ended, started = actions[0], actions[1]
    assert isinstance(ended, SessionEnded)
    assert ended.session is old
    assert ended.reason == "reinit"
    assert isinstance(started, SessionStarted)
    assert started.session.job_id == 2
    assert old.key is not None
    assert old.key.is_all_zero()


def test_plaintext_reinit_keeps_or_replaces_the_session() -> None:
    conn = make_conn()
    conn.receive(plain_init("7", "7"))
    first = conn.sessions["7"]
    assert kinds(conn.receive(plain_init("7", "7"))) == ["Send"]
    assert conn.sessions["7"] is first
    assert kinds(conn.receive(plain_init("7", "8"))) == ["SessionEnded", "SessionStarted", "Send"]
    assert conn.sessions["7"].job_id == 8


def test_two_sessions_on_one_connection_have_separate_counters() -> None:
    conn = make_conn()
    conn.receive(make_init(K1, session_id="1"))
    conn.receive(make_init(K2, session_id="2"))
    start(conn, K1, 3, session_id="1")
    conn.finish("stop", prompt_tokens=0)
    start(conn, K2, 0, session_id="2")
    conn.finish("stop", prompt_tokens=0)
    assert (conn.sessions["1"].next_index, conn.sessions["2"].next_index) == (4, 1)
    assert error_code(conn.receive(message_frame(K2, 0, session_id="1"))) is E.REPLAY_DETECTED


# --------------------------------------------------------------------- AAD rule


def test_inbound_aad_counter_rules() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    session = conn.sessions["42"]
    request = start(conn, K1, 0)
    assert request.request.prompt == "hello"
    assert session.next_index == 1
    conn.finish("stop", prompt_tokens=1)
    start(conn, K1, 5)  # skipping ahead is allowed
    assert session.next_index == 6
    conn.finish("stop", prompt_tokens=1)
    for stale in (0, 3, 5):
        actions = conn.receive(message_frame(K1, stale))
        assert error_code(actions) is E.REPLAY_DETECTED
        assert not any(isinstance(a, StartRequest) for a in actions)
    assert session.next_index == 6
    start(conn, K1, 6)
    assert session.next_index == 7


def test_exact_replay_of_a_frame_is_refused() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    message = message_frame(K1, 0, request_id="m0")
    conn.receive(message)
    conn.finish("stop", prompt_tokens=1)
    actions = conn.receive(message)
    assert error_code(actions) is E.REPLAY_DETECTED
    err = sends(actions)[0]
    assert (err.id, err.session_id) == ("m0", "42")


def test_failed_decryption_does_not_advance_the_counter() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    session = conn.sessions["42"]
    assert error_code(conn.receive(message_frame(K2, 9))) is E.DECRYPTION_FAILED  # wrong key
    good = message_frame(K1, 4)
    flipped = bytearray(good.payload.ciphertext)
    flipped[0] ^= 1
    tampered = attrs.evolve(good, payload=attrs.evolve(good.payload, ciphertext=bytes(flipped)))
    assert error_code(conn.receive(tampered)) is E.DECRYPTION_FAILED
    assert session.next_index == 0
    assert not conn.streaming
    start(conn, K1, 0)


def test_aad_is_bound_to_the_ciphertext() -> None:
    """A message sealed under message_0 but relabelled message_5 does not open."""
    conn = make_conn()
    conn.receive(make_init(K1))
    m = message_frame(K1, 0)
    relabelled = frame(
        {
            "type": "encrypted_message",
            "session_id": "42",
            "payload": {
                "ciphertextHex": m.payload.ciphertext.hex(),
                "nonceHex": m.payload.nonce.hex(),
                "aadHex": b"message_5".hex(),
            },
        }
    )
    assert error_code(conn.receive(relabelled)) is E.DECRYPTION_FAILED
    assert conn.sessions["42"].next_index == 0


def test_authenticated_but_unusable_plaintext_still_consumes_the_index() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    assert error_code(conn.receive(message_frame(K1, 0, b"\xff\xfe"))) is E.INVALID_PAYLOAD
    assert (
        error_code(conn.receive(message_frame(K1, 1, '{"action":"embed","prompt":"p"}')))
        is E.UNSUPPORTED_ACTION
    )
    assert error_code(conn.receive(message_frame(K1, 2, '{"max_tokens":0}'))) is E.INVALID_PAYLOAD
    assert conn.sessions["42"].next_index == 3
    assert not conn.streaming


# ------------------------------------------------------------- session lookup


def test_unknown_session_is_key_not_found() -> None:
    conn = make_conn()
    assert error_code(conn.receive(message_frame(K1, 0, session_id="9"))) is (
        E.SESSION_KEY_NOT_FOUND
    )
    conn.receive(make_init(K1))
    assert error_code(conn.receive(message_frame(K1, 0, session_id="43"))) is (
        E.SESSION_KEY_NOT_FOUND
    )


def test_plaintext_session_has_no_key() -> None:
    conn = make_conn()
    conn.receive(plain_init("42", "42"))
    assert error_code(conn.receive(message_frame(K1, 0))) is E.SESSION_KEY_NOT_FOUND


def test_session_from_another_connection_never_works() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=900, clock=clock)
    a = make_conn(clock=clock, cache=cache)
    b = make_conn(clock=clock, cache=cache)
    a.receive(make_init(K1))
    assert error_code(b.receive(message_frame(K1, 0))) is E.SESSION_KEY_NOT_FOUND
    start(a, K1, 0)


# ---------------------------------------------------------------- init checks


def test_init_replay_across_connections_sharing_one_cache() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=900, clock=clock)
    payload = init_payload(K1)
    a = make_conn(clock=clock, cache=cache)
    b = make_conn(clock=clock, cache=cache)
    assert kinds(a.receive(init_frame(payload))) == ["SessionStarted", "Send"]
    actions = b.receive(init_frame(payload, session_id="99"))
    assert error_code(actions) is E.REPLAY_DETECTED
    assert b.sessions == {}
    clock.advance(900)
    assert kinds(b.receive(init_frame(payload))) == ["SessionStarted", "Send"]


def test_init_replay_with_the_ephemeral_key_reencoded_uncompressed() -> None:
    """The same point in 65-byte form opens the same init: it must still be a replay."""
    payload = init_payload(K1)
    conn = make_conn()
    conn.receive(init_frame(payload))
    twin = dict(payload)
    twin["ephPubHex"] = PublicKey(bytes.fromhex(payload["ephPubHex"])).format(False).hex()
    assert error_code(conn.receive(init_frame(twin))) is E.REPLAY_DETECTED


def test_replay_key_is_the_same_for_both_encodings_of_a_point() -> None:
    parities = set()
    for seed in range(1, 40):
        point = PrivateKey(seed.to_bytes(32, "big")).public_key
        short, long = point.format(compressed=True), point.format(compressed=False)
        nonce = bytes([seed]) * 24
        a = InitPayload(short, b"c" * 16, nonce, b"s" * 65, b"").replay_key()
        b = InitPayload(long, b"c" * 16, nonce, b"s" * 65, b"").replay_key()
        assert a == b == short[1:] + b"|" + nonce  # x only: +/-E open the same init
        parities.add(short[0])
    assert parities == {2, 3}


def test_uncompressed_ephemeral_key_is_accepted_once() -> None:
    payload = init_payload(K1)
    payload["ephPubHex"] = PublicKey(bytes.fromhex(payload["ephPubHex"])).format(False).hex()
    conn = make_conn()
    assert kinds(conn.receive(init_frame(payload))) == ["SessionStarted", "Send"]
    assert error_code(conn.receive(init_frame(payload))) is E.REPLAY_DETECTED


def test_allow_list_denies_other_clients() -> None:
    conn = make_conn(allowed_clients=frozenset({OTHER_ADDRESS.lower()}))
    actions = conn.receive(make_init(K1))
    assert error_code(actions) is E.SESSION_AUTH_DENIED
    assert conn.sessions == {}
    assert kinds(conn.receive(make_init(K1, client=OTHER_CLIENT))) == ["SessionStarted", "Send"]
    assert conn.sessions["42"].client_address == OTHER_ADDRESS


def test_allow_list_with_the_client_admits_it() -> None:
    conn = make_conn(allowed_clients=frozenset({CLIENT_ADDRESS.lower()}))
    assert kinds(conn.receive(make_init(K1, client=CLIENT))) == ["SessionStarted", "Send"]


def test_init_rate_limit_and_refill() -> None:
    clock = Clock()
    conn = make_conn(clock=clock, init_burst=2, init_refill_per_s=0.5)
    assert kinds(conn.receive(make_init(fresh(), session_id="1"))) == ["SessionStarted", "Send"]
    assert kinds(conn.receive(make_init(fresh(), session_id="2"))) == ["SessionStarted", "Send"]
    assert error_code(conn.receive(make_init(fresh(), session_id="3"))) is E.RATE_LIMITED
    clock.advance(1.0)  # half an init back: still refused
    assert error_code(conn.receive(make_init(fresh(), session_id="3"))) is E.RATE_LIMITED
    clock.advance(1.0)
    assert kinds(conn.receive(make_init(fresh(), session_id="3"))) == ["SessionStarted", "Send"]
    clock.advance(1000.0)  # the allowance refills only up to the burst
    for sid in ("4", "5"):
        assert kinds(conn.receive(make_init(fresh(), session_id=sid))) == ["SessionStarted", "Send"]
    assert error_code(conn.receive(make_init(fresh(), session_id="6"))) is E.RATE_LIMITED


def test_failed_inits_spend_the_allowance_too() -> None:
    conn = make_conn(init_burst=1, init_refill_per_s=0.001)
    garbage = init_payload(K1, host_public=PublicKey.from_secret(b"\x05" * 32).format())
    assert error_code(conn.receive(init_frame(garbage))) is E.DECRYPTION_FAILED
    assert error_code(conn.receive(make_init(K1))) is E.RATE_LIMITED


def test_full_replay_cache_refuses_new_inits() -> None:
    clock = Clock()
    # An accepted init takes two entries: its (ephemeral key, nonce) and its session key.
    cache = InitReplayCache(window_s=60, max_entries=2, clock=clock)
    conn = make_conn(clock=clock, cache=cache)
    assert kinds(conn.receive(make_init(K1, session_id="1"))) == ["SessionStarted", "Send"]
    assert len(cache) == 2
    assert error_code(conn.receive(make_init(K2, session_id="2"))) is E.RATE_LIMITED
    clock.advance(60)
    assert kinds(conn.receive(make_init(K2, session_id="2"))) == ["SessionStarted", "Send"]


def test_a_cache_with_room_for_the_init_only_refuses_it() -> None:
    """The session-key entry needs room too: no init is accepted without it."""
    cache = InitReplayCache(window_s=60, max_entries=1, clock=Clock())
    conn = make_conn(cache=cache)
    assert error_code(conn.receive(make_init(K1))) is E.RATE_LIMITED
    assert conn.sessions == {}


def test_crypto_failures_of_an_init_keep_their_codes() -> None:
    conn = make_conn(max_errors=100)
    payload = init_payload(K1)
    sig = bytearray(bytes.fromhex(payload["signatureHex"]))
    sig[64] = 5
    bad_v = {**payload, "signatureHex": sig.hex()}
    assert error_code(conn.receive(init_frame(bad_v))) is E.INVALID_SIGNATURE
    not_json = Frame(plaintext=b"not json", nonce=os.urandom(24)).payload()
    assert error_code(conn.receive(init_frame(not_json))) is E.INVALID_SESSION_DATA
    no_key = Frame(plaintext=session(sessionKey=DELETE), nonce=os.urandom(24)).payload()
    assert error_code(conn.receive(init_frame(no_key))) is E.INVALID_SESSION_DATA
    off_curve = {**payload, "ephPubHex": "02" + "00" * 32}
    assert error_code(conn.receive(init_frame(off_curve))) is E.INVALID_PAYLOAD
    assert conn.sessions == {}
    assert conn.keys_held == 0


# ------------------------------------------------------------------ expiry


def test_session_ttl_expires_on_use() -> None:
    clock = Clock()
    conn = make_conn(clock=clock, session_ttl_s=10.0)
    conn.receive(make_init(K1))
    key = conn.sessions["42"].key
    assert key is not None
    clock.advance(9.99)
    start(conn, K1, 0)
    conn.finish("stop", prompt_tokens=0)
    clock.advance(0.01)
    actions = conn.receive(message_frame(K1, 1, request_id="late"))
    assert kinds(actions) == ["SessionEnded", "Send"]
    assert actions[0].reason == "ttl_expired"  # type: ignore[union-attr]
    err = sends(actions)[0]
    assert isinstance(err, ErrorMessage)
    assert (err.code, err.id, err.session_id) == ("SESSION_EXPIRED", "late", "42")
    assert key.wiped
    assert key.is_all_zero()
    assert "42" not in conn.sessions
    # The id is remembered as expired (the key is gone): later use says so again.
    assert error_code(conn.receive(message_frame(K1, 2))) is E.SESSION_EXPIRED
    assert error_code(conn.receive(message_frame(K1, 2, session_id="43"))) is (
        E.SESSION_KEY_NOT_FOUND
    )


def test_reinit_restarts_the_ttl() -> None:
    clock = Clock()
    conn = make_conn(clock=clock, session_ttl_s=10.0)
    conn.receive(make_init(K1))
    clock.advance(8)
    conn.receive(make_init(K2))
    clock.advance(8)
    start(conn, K2, 0)


def test_expire_sessions_drops_only_idle_expired_encrypted_sessions() -> None:
    clock = Clock()
    conn = make_conn(clock=clock, session_ttl_s=10.0)
    conn.receive(make_init(K1, session_id="1"))
    clock.advance(5)
    conn.receive(make_init(K2, session_id="2"))
    conn.receive(make_init(K3, session_id="3"))
    start(conn, K3, 0, session_id="3")  # streaming: kept until it ends
    clock.advance(5)
    first_key = conn.sessions["1"].key
    actions = conn.expire_sessions()
    assert [(type(a).__name__, a.session.session_id, a.reason) for a in actions] == [  # type: ignore[union-attr]
        ("SessionEnded", "1", "ttl_expired")
    ]
    assert first_key is not None
    assert first_key.is_all_zero()
    assert set(conn.sessions) == {"2", "3"}
    assert conn.expire_sessions() == []
    clock.advance(5)
    assert [a.session.session_id for a in conn.expire_sessions()] == ["2"]  # type: ignore[union-attr]
    conn.finish("stop", prompt_tokens=0)
    assert [a.session.session_id for a in conn.expire_sessions()] == ["3"]  # type: ignore[union-attr]
    assert conn.keys_held == 0


def test_plaintext_sessions_do_not_expire() -> None:
    clock = Clock()
    conn = make_conn(clock=clock, session_ttl_s=1.0)
    conn.receive(plain_init())
    clock.advance(100)
    assert conn.expire_sessions() == []
    assert "7" in conn.sessions


# --------------------------------------------------------- one request in flight


def test_ping_is_answered_while_streaming() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    start(conn, K1, 0)
    assert conn.receive(Ping("p")) == conn.receive(frame({"type": "ping", "id": "p"}))
    assert sends(conn.receive(Ping("p"))) == [Pong("p")]
    assert conn.streaming


def test_stream_cancel_cancels_once() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    start(conn, K1, 0)
    actions = conn.receive(StreamCancel(session_id="42", reason="user stop"))
    assert actions == [CancelRequest("user stop")]
    # A second cancel waits for the first one's stream to end (it may be meant for the
    # next request), then finds nothing to cancel.
    assert conn.receive(StreamCancel(session_id="42")) == [HoldTimer(10.0)]
    assert conn.streaming  # the driver ends the stream with finish("cancelled")
    assert conn.release_held() is None
    frames = conn.finish("cancelled", prompt_tokens=2)
    assert frames[-1].reason == "cancelled"  # type: ignore[union-attr]
    assert conn.release_held() == (StreamCancel(session_id="42"), [])
    assert conn.release_held() is None
    assert conn.receive(StreamCancel()) == []  # nothing in flight: nothing to cancel
    start(conn, K1, 1)
    assert conn.receive(StreamCancel()) == [CancelRequest("client requested cancel")]


def test_other_requests_while_streaming_are_in_progress() -> None:
    conn = make_conn()
    conn.receive(make_init(K1))
    conn.receive(make_init(K2, session_id="2"))
    start(conn, K1, 0)
    for message in (
        message_frame(K1, 1, request_id="m1"),
        message_frame(K2, 0, session_id="2", request_id="m2"),
        make_init(K1, session_id="5"),
        prompt(id="m3"),
        plain_init(),
    ):
        actions = conn.receive(message)
        assert error_code(actions) is E.REQUEST_IN_PROGRESS
        assert sends(actions)[0].id == message.id
    assert conn.sessions["42"].next_index == 1  # the refused message_1 is still fresh
    assert conn.sessions["2"].next_index == 0
    assert "5" not in conn.sessions
    conn.finish("stop", prompt_tokens=0)
    start(conn, K1, 1)


# ------------------------------------------------------------------ error budget


def test_too_many_errors_close_with_1008() -> None:
    conn = make_conn(max_errors=3)
    first = conn.reject(ProtocolError(E.INVALID_MESSAGE, "x"))
    second = conn.receive(message_frame(K1, 0, session_id="1"))  # SESSION_KEY_NOT_FOUND
    assert kinds(first) == kinds(second) == ["Send"]
    assert conn.error_count == 2
    third = conn.reject(ProtocolError(E.INVALID_MESSAGE, "y"), "rid")
    assert kinds(third) == ["Send", "Close"]  # the error is sent before the close
    assert third[1] == Close(CLOSE_POLICY_VIOLATION, third[1].reason)  # type: ignore[union-attr]
    assert CLOSE_POLICY_VIOLATION == 1008
    assert sends(third)[0].id == "rid"


def test_successful_requests_do_not_reset_the_error_budget() -> None:
    conn = make_conn(max_errors=2)
    conn.receive(make_init(K1))
    assert kinds(conn.receive(message_frame(K1, 0, session_id="1"))) == ["Send"]
    start(conn, K1, 0)
    conn.finish("stop", prompt_tokens=0)
    assert kinds(conn.receive(message_frame(K1, 0))) == ["Send", "Close"]  # replay


def test_node_side_errors_do_not_count() -> None:
    conn = make_conn(max_errors=1)
    conn.receive(make_init(K1))
    start(conn, K1, 0)
    actions = conn.fail(NodeError("backend crashed", code=E.INFERENCE_FAILED), prompt_tokens=1)
    assert not any(isinstance(a, Close) for a in actions)
    start(conn, K1, 1)
    assert not any(
        isinstance(a, Close) for a in conn.fail(NodeError("bug"), prompt_tokens=1)
    )  # INTERNAL_ERROR is the node's fault too
    assert conn.error_count == 0
    assert any(isinstance(a, Close) for a in conn.reject(DecryptionFailed("x")))


def test_reject_echoes_the_id_and_extra_fields() -> None:
    conn = make_conn()
    err = ProtocolError(E.TOKEN_LIMIT_EXCEEDED, "too long", prompt_tokens=9)
    assert sends(conn.reject(err, 5)) == [
        ErrorMessage("TOKEN_LIMIT_EXCEEDED", "too long", 5, None, {"prompt_tokens": 9})
    ]


# ----------------------------------------------------------------------- close


def test_close_wipes_every_key_and_ends_every_session() -> None:
    conn = make_conn()
    conn.receive(make_init(K1, session_id="1"))
    conn.receive(make_init(K2, session_id="2"))
    keys = [conn.sessions[s].key for s in ("1", "2")]
    start(conn, K1, 0, session_id="1")
    ended = conn.close()
    assert sorted((e.session.session_id, e.reason) for e in ended) == [
        ("1", "closed"),
        ("2", "closed"),
    ]
    for key in keys:
        assert key is not None
        assert key.wiped
        assert key.is_all_zero()
        assert not any(key.buffer_for_tests())
    assert conn.sessions == {}
    assert conn.keys_held == 0
    assert not conn.streaming
    assert conn.receive(Ping()) == []
    assert conn.receive(make_init(K1, session_id="3")) == []
    assert conn.reject(ProtocolError(E.INVALID_MESSAGE, "x")) == []
    assert conn.close() == []


def test_close_reports_the_anonymous_plaintext_session() -> None:
    conn = make_conn()
    conn.receive(prompt())
    conn.finish("stop", prompt_tokens=0)
    conn.receive(plain_init())
    ended = conn.close("shutdown")
    assert sorted(e.session.session_id for e in ended) == ["", "7"]
    assert {e.reason for e in ended} == {"shutdown"}


def test_piece_and_finish_need_an_active_request() -> None:
    conn = make_conn()
    with pytest.raises(RuntimeError):
        conn.piece("x", 1)
    with pytest.raises(RuntimeError):
        conn.finish("stop", prompt_tokens=0)
    with pytest.raises(RuntimeError):
        conn.fail(NodeError("x"))
    conn.receive(prompt())
    with pytest.raises(ValueError, match="finish reason"):
        conn.finish("done", prompt_tokens=0)


def test_actions_and_sessions_never_show_key_material() -> None:
    conn = make_conn()
    actions = conn.receive(make_init(K1))
    actions += conn.receive(message_frame(K1, 0))
    text = repr(actions) + repr(conn.sessions) + repr(conn.sessions["42"].key)
    assert K1.hex() not in text
    assert repr(K1) not in text


def test_sessions_per_connection_are_capped() -> None:
    """One connection cannot pile up sessions (and keys) without bound."""
    clock = Clock()
    conn = make_conn(clock=clock, max_sessions=3, init_burst=100)
    for sid in ("1", "2", "3"):
        assert kinds(conn.receive(make_init(fresh(), session_id=sid))) == ["SessionStarted", "Send"]
    refused = conn.receive(make_init(fresh(), session_id="4"))
    assert error_code(refused) is E.RATE_LIMITED
    assert conn.keys_held == 3
    # Re-initialising a session it already holds is still fine.
    again = conn.receive(make_init(K2, session_id="2"))
    assert isinstance(sends(again)[-1], SessionInitAck)
    plain = make_conn(clock=clock, max_sessions=1)
    plain.receive(frame({"type": "session_init", "session_id": "1", "job_id": "1"}))
    assert error_code(
        plain.receive(frame({"type": "prompt", "prompt": "p", "session_id": "9"}))
    ) is (E.RATE_LIMITED)
    assert error_code(
        plain.receive(frame({"type": "session_init", "session_id": "8", "job_id": "8"}))
    ) is (E.RATE_LIMITED)
