"""Findings 8, 12 and 13 of issue 14: lone surrogates, plaintext under an allow-list, and
the tests a mutation audit showed missing (each fails when its line breaks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from coincurve import PrivateKey

from node.cli import build_parser, config_from_args
from node.crypto.errors import ErrorCode
from node.crypto.secret import SecretBytes
from node.protocol import connection as connection_module
from node.protocol.connection import SessionEnded, SessionMemory, SessionStarted
from node.protocol.messages import SessionInitAck
from node.protocol.replay import InitReplayCache
from tests.crypto._frames import Frame, session
from tests.protocol._support import (
    CLIENT,
    CLIENT_ADDRESS,
    OTHER_CLIENT,
    Clock,
    error_code,
    frame,
    init_frame,
    init_payload,
    make_conn,
    message_frame,
    sends,
)
from tests.server._support import build_node, memory_client, parse_prometheus

GUARD_S = 30

# ------------------------------------------------- finding 8: lone surrogates


def test_a_lone_surrogate_in_model_name_is_invalid_session_data() -> None:
    from node.crypto.errors import CryptoError
    from node.crypto.session_init import open_session_init, parse_init_payload
    from tests.crypto._frames import HOST

    payload = Frame(plaintext=session(modelName="a\ud800b")).payload()
    with pytest.raises(CryptoError, match="modelName is not valid Unicode") as info:
        open_session_init(HOST, parse_init_payload(payload))
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA


async def test_a_lone_surrogate_in_model_name_leaves_the_connection_up(tmp_path: Path) -> None:
    """The review's case: with the real ledger, the init used to raise inside
    SessionIdentity (INTERNAL_ERROR, close 1011)."""
    from node.crypto.hostkey import HostKey
    from node.settlement import Ledger
    from node.settlement.service import LedgerAccounting
    from tests.server._support import DEV_HOST_KEY_HEX

    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=HostKey.parse(DEV_HOST_KEY_HEX))
    node = build_node()
    node.ctx.accounting = LedgerAccounting(ledger)
    try:
        with trio.fail_after(GUARD_S):
            async with memory_client(node) as client:
                from tests.server._support import init_frame as server_init

                bad, _ = server_init(node.host_public_key, model_name="\ud800")
                await client.send(bad)
                await client.expect_error("INVALID_SESSION_DATA")
                await client.ping()
                good, _ = server_init(node.host_public_key, session_id="2", model_name="echo")
                await client.send(good)
                await client.expect("session_init_ack")
    finally:
        ledger.close()
    assert node.ctx.metrics.errors["INTERNAL_ERROR"] == 0


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"type":"ping","id":"\\ud800"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"prompt","prompt":"hi","model":"\\udfff"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"stream_cancel","reason":"\\ud800"}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_lone_surrogates_in_envelope_strings_are_refused(text: str, code: ErrorCode) -> None:
    from node.protocol.errors import ProtocolError
    from node.protocol.messages import decode

    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code is code


def test_a_lone_surrogate_in_the_decrypted_request_model_is_invalid_payload() -> None:
    conn = make_conn()
    key = b"\x01" * 32
    conn.receive(init_frame(init_payload(key)))
    actions = conn.receive(message_frame(key, 0, '{"prompt":"hi","model":"\\ud800"}'))
    assert error_code(actions) is ErrorCode.INVALID_PAYLOAD


def test_our_client_refuses_a_frame_with_a_lone_surrogate() -> None:
    from node.client.errors import MalformedFrame
    from node.client.frames import parse_server_frame

    with pytest.raises(MalformedFrame, match="not valid Unicode"):
        parse_server_frame('{"type":"connected","message":"\\ud800"}')


# ----------------------------------------- finding 12: plaintext under an allow-list

ALLOW = frozenset({CLIENT_ADDRESS.lower()})


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"session_init","session_id":"5"}',
        '{"type":"prompt","prompt":"hi"}',
        '{"type":"prompt","prompt":"hi","session_id":"6"}',
    ],
)
def test_an_allow_list_refuses_plaintext_unless_allowed(text: str) -> None:
    refusing = make_conn(allowed_clients=ALLOW)
    actions = refusing.receive(frame_of(text))
    assert error_code(actions) is ErrorCode.ENCRYPTION_REQUIRED
    assert "allow-listed" in sends(actions)[0].message
    assert not refusing.sessions
    assert not refusing.streaming
    allowing = make_conn(allowed_clients=ALLOW, allow_plaintext_with_allowlist=True)
    assert not [m for m in sends(allowing.receive(frame_of(text))) if m.type == "error"]
    open_node = make_conn()  # no allow-list: plaintext as before
    assert not [m for m in sends(open_node.receive(frame_of(text))) if m.type == "error"]


def frame_of(text: str) -> Any:
    from node.protocol.messages import decode

    return decode(text)


def test_an_allow_listed_client_still_opens_encrypted_sessions() -> None:
    conn = make_conn(allowed_clients=ALLOW)
    ack = sends(conn.receive(init_frame(init_payload(b"\x01" * 32, client=CLIENT))))[0]
    assert isinstance(ack, SessionInitAck)


async def test_version_stops_offering_plaintext_under_an_allow_list() -> None:
    import httpx

    from tests.server.conftest import NodeFactory

    async with trio.open_nursery() as nursery:
        factory = NodeFactory(nursery)
        strict = await factory.start(allowed_clients=ALLOW)
        lenient = await factory.start(allowed_clients=ALLOW, allow_plaintext_with_allowlist=True)
        async with httpx.AsyncClient(timeout=10) as http:
            strict_features = (await http.get(strict.url + "/v1/version")).json()["features"]
            lenient_features = (await http.get(lenient.url + "/v1/version")).json()["features"]
        factory.stop_all()
    assert "plaintext-deprecated" not in strict_features
    assert "plaintext-deprecated" in lenient_features


def test_allow_plaintext_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_from_args(
        build_parser().parse_args(["serve", "--allowed-clients", "0x" + "ab" * 20])
    )
    assert config.allow_plaintext_with_allowlist is False
    args = build_parser().parse_args(["serve", "--allow-plaintext-with-allowlist"])
    assert config_from_args(args).allow_plaintext_with_allowlist is True
    monkeypatch.setenv("LLM_NODE_ALLOW_PLAINTEXT_WITH_ALLOWLIST", "yes")
    assert config_from_args(build_parser().parse_args(["serve"])).allow_plaintext_with_allowlist


# ------------------------- finding 13 (a): the key gauge counts encrypted keys only


async def test_the_key_gauge_counts_only_encrypted_sessions() -> None:
    node = build_node()
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            await client.send({"type": "session_init", "session_id": "1"})
            await client.expect("session_init_ack")
            await client.init(node.host_public_key, session_id="2")
            await client.send({"type": "session_init", "session_id": "3"})
            await client.expect_error("MIXED_MODE_REJECTED")
            metrics = parse_prometheus(node.ctx.metrics.render())
            assert len(node.only_driver().state.sessions) == 2
            assert metrics["llm_node_session_keys"] == 1
            assert metrics["llm_node_session_key_bytes"] == 32
            assert metrics['llm_node_sessions{mode="encrypted"}'] == 1
            assert metrics['llm_node_sessions{mode="plaintext"}'] == 1
        await node.wait_no_connections()
    assert parse_prometheus(node.ctx.metrics.render())["llm_node_session_keys"] == 0


# -------------------- finding 13 (b): a re-init with other terms is a new session


def _init(key: bytes, **kw: Any) -> Any:
    chain = kw.pop("chain_id", 84532)
    msg = frame(
        {
            "type": "encrypted_session_init",
            "session_id": "42",
            "chain_id": chain,
            "payload": init_payload(key, **kw),
        }
    )
    return msg


@pytest.mark.parametrize(
    "change",
    [
        {"client": OTHER_CLIENT},
        {"job_id": 43},
        {"model_name": "another-model"},
        {"price": 8},
        {"chain_id": 1},
    ],
    ids=["client", "job", "model", "price", "chain"],
)
def test_a_reinit_with_other_terms_ends_the_old_session(change: dict[str, Any]) -> None:
    from node.crypto.session_init import seal_session_init
    from tests.protocol._support import HOST

    conn = make_conn(init_burst=100)
    first = conn.receive(_init(b"\x01" * 32))
    (old,) = [a.session for a in first if isinstance(a, SessionStarted)]
    if "price" in change:
        payload = seal_session_init(
            HOST.public_key,
            CLIENT,
            b"\x02" * 32,
            job_id=42,
            model_name="tiny-model",
            price_per_token=change["price"],
        )
        msg = frame({"type": "encrypted_session_init", "session_id": "42", "payload": payload})
    else:
        msg = _init(b"\x02" * 32, **change)
    actions = conn.receive(msg)
    ended = [a for a in actions if isinstance(a, SessionEnded)]
    started = [a.session for a in actions if isinstance(a, SessionStarted)]
    assert [(e.session, e.reason) for e in ended] == [(old, "reinit")]
    assert len(started) == 1
    assert started[0] is not old
    new = started[0]
    assert conn.sessions["42"] is new
    assert old.key is not None
    assert old.key.wiped
    expected = {
        "client": ("client_address", new.client_address != old.client_address),
        "job": ("job_id", new.job_id == 43),
        "model": ("model_name", new.model_name == "another-model"),
        "price": ("price_per_token", new.price_per_token == 8),
        "chain": ("chain_id", new.chain_id == 1),
    }
    label = {"client": "client", "job_id": "job", "model_name": "model"}.get(
        next(iter(change)), next(iter(change)).replace("_id", "")
    )
    name, ok = expected[label]
    assert ok, name


def test_a_reinit_with_the_same_terms_continues_the_session() -> None:
    conn = make_conn(init_burst=100)
    first = conn.receive(_init(b"\x01" * 32))
    (old,) = [a.session for a in first if isinstance(a, SessionStarted)]
    actions = conn.receive(_init(b"\x02" * 32))
    assert not [a for a in actions if isinstance(a, SessionEnded | SessionStarted)]
    assert conn.sessions["42"] is old
    assert old.key is not None
    assert old.key.equals(b"\x02" * 32)


def test_an_encrypted_init_over_a_plaintext_session_starts_a_new_one() -> None:
    conn = make_conn()
    first = conn.receive(frame({"type": "session_init", "session_id": "42", "job_id": "42"}))
    (old,) = [a.session for a in first if isinstance(a, SessionStarted)]
    actions = conn.receive(_init(b"\x01" * 32))
    assert [(a.session, a.reason) for a in actions if isinstance(a, SessionEnded)] == [
        (old, "reinit")
    ]
    assert conn.sessions["42"].encrypted


# ------ finding 13 (c): a key decrypted for a refused init is wiped before the reply


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[SecretBytes]:
    """Every session key ``open_session_init`` hands to the protocol core."""
    keys: list[SecretBytes] = []
    real = connection_module.open_session_init

    def recording(*args: Any) -> Any:
        data = real(*args)
        keys.append(data.session_key)
        return data

    monkeypatch.setattr(connection_module, "open_session_init", recording)
    return keys


def _assert_refused_and_wiped(actions: list[Any], code: ErrorCode, keys: list[SecretBytes]) -> None:
    assert error_code(actions) is code
    assert keys, "the init was not even decrypted"
    key = keys[-1]
    assert key.wiped
    assert key.is_all_zero()
    assert len(key) == 32


def test_a_replayed_init_key_is_wiped(opened: list[SecretBytes]) -> None:
    conn = make_conn()
    payload = init_payload(b"\x01" * 32)
    conn.receive(init_frame(payload))
    assert not opened[0].wiped  # the accepted one is kept
    _assert_refused_and_wiped(
        conn.receive(init_frame(payload, session_id="43")), ErrorCode.REPLAY_DETECTED, opened
    )


def test_a_key_of_a_client_not_on_the_allow_list_is_wiped(opened: list[SecretBytes]) -> None:
    conn = make_conn(allowed_clients=frozenset({"0x" + "00" * 20}))
    _assert_refused_and_wiped(
        conn.receive(init_frame(init_payload(b"\x01" * 32))),
        ErrorCode.SESSION_AUTH_DENIED,
        opened,
    )


def test_a_key_refused_by_a_full_replay_cache_is_wiped(opened: list[SecretBytes]) -> None:
    clock = Clock()
    conn = make_conn(clock=clock, cache=InitReplayCache(window_s=900, max_entries=1, clock=clock))
    conn.receive(init_frame(init_payload(b"\x01" * 32)))
    _assert_refused_and_wiped(
        conn.receive(init_frame(init_payload(b"\x02" * 32), session_id="43")),
        ErrorCode.RATE_LIMITED,
        opened,
    )


def test_a_key_refused_by_the_memory_budget_is_wiped(opened: list[SecretBytes]) -> None:
    conn = make_conn()
    conn.memory = SessionMemory(1)
    _assert_refused_and_wiped(
        conn.receive(init_frame(init_payload(b"\x01" * 32))), ErrorCode.RATE_LIMITED, opened
    )


def test_a_fresh_client_key_is_used_by_the_tests() -> None:
    # the helpers above must sign with different keys for "another client"
    assert PrivateKey(CLIENT.secret).public_key != OTHER_CLIENT.public_key


@pytest.mark.parametrize("allow", [False, True])
async def test_a_node_with_an_allow_list_serves_plaintext_only_when_told(allow: bool) -> None:
    node = build_node(allowed_clients=ALLOW, allow_plaintext_with_allowlist=allow)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            await client.send({"type": "session_init", "session_id": "5"})
            if allow:
                await client.expect("session_init_ack")
            else:
                await client.expect_error("ENCRYPTION_REQUIRED")
            await client.init(node.host_public_key, session_id="6", client_key=CLIENT)
