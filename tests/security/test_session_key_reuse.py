"""A session key serves one init only.

A re-init restarts the session's message counter at 0. If a client re-initialised with a
key the node had already accepted, every ``encrypted_message`` recorded under that key
(``message_0`` first) would be accepted a second time. So within the replay window the
node refuses an init whose session key it has already accepted, on any connection, with
REPLAY_DETECTED. It remembers a keyed fingerprint (HMAC under a key derived from the host
key), never the session key itself. The SDK takes a fresh key for every init, so its flow
(re-init before every prompt) is not affected.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio
import trio.testing

from node.crypto import HostKey, SecretBytes
from node.crypto.errors import ErrorCode
from node.protocol import InitReplayCache, StartRequest
from node.protocol.connection import SESSION_KEY_ENTRY
from node.server.shared_replay import SqliteReplayCache
from tests.protocol._support import (
    HOST,
    Clock,
    error_code,
    host_key,
    kinds,
    make_conn,
    make_init,
    message_frame,
)
from tests.server._support import ws_client
from tests.server.conftest import NodeFactory

from ._support import build_node, init_frame, memory_client

GUARD_S = 30
E = ErrorCode


# ------------------------------------------------------------- the state machine


def test_a_reinit_with_the_same_key_is_refused_and_the_recorded_message_stays_dead() -> None:
    conn = make_conn()
    key = os.urandom(32)
    assert kinds(conn.receive(make_init(key))) == ["SessionStarted", "Send"]
    recorded = message_frame(key, 0, request_id="m0")
    assert kinds(conn.receive(recorded)) == ["StartRequest"]
    conn.finish("stop", prompt_tokens=1)
    # The attack: a second init (new ephemeral key and nonce) carrying the same key ...
    refused = conn.receive(make_init(key))
    assert error_code(refused) is E.REPLAY_DETECTED
    assert conn.sessions["42"].next_index == 1  # ... does not reset the counter ...
    # ... so the recorded message_0 is still refused.
    assert error_code(conn.receive(recorded)) is E.REPLAY_DETECTED
    assert kinds(conn.receive(message_frame(key, 1))) == ["StartRequest"]


def test_the_same_key_is_refused_node_wide_and_for_any_session() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=900.0, clock=clock)
    key = os.urandom(32)
    first = make_conn(clock=clock, cache=cache)
    first.receive(make_init(key, session_id="1"))
    first.close()
    other = make_conn(clock=clock, cache=cache)
    assert error_code(other.receive(make_init(key, session_id="1"))) is E.REPLAY_DETECTED
    assert error_code(other.receive(make_init(key, session_id="2", job_id=9))) is (
        E.REPLAY_DETECTED
    )
    assert other.sessions == {}


def test_workers_sharing_the_replay_file_refuse_the_key_too(tmp_path: Path) -> None:
    """Two worker processes: their own HostKey objects, one replay-cache file."""
    key = os.urandom(32)
    path = tmp_path / "replay-cache.sqlite3"
    caches = [SqliteReplayCache(path, window_s=900.0) for _ in range(2)]
    try:
        one, two = (make_conn(host=host_key(), cache=cache) for cache in caches)
        assert kinds(one.receive(make_init(key))) == ["SessionStarted", "Send"]
        assert error_code(two.receive(make_init(key))) is E.REPLAY_DETECTED
        assert kinds(two.receive(make_init(os.urandom(32)))) == ["SessionStarted", "Send"]
    finally:
        for cache in caches:
            cache.close()


def test_an_init_refused_for_its_key_leaves_no_entry_behind() -> None:
    """Both entries of an init are recorded together or not at all."""
    clock = Clock()
    cache = InitReplayCache(window_s=900.0, clock=clock)
    conn = make_conn(clock=clock, cache=cache)
    key = os.urandom(32)
    conn.receive(make_init(key))
    assert len(cache) == 2  # the init's digest and the key's fingerprint
    reused = make_init(key)
    assert error_code(conn.receive(reused)) is E.REPLAY_DETECTED
    assert len(cache) == 2
    assert not cache.seen(reused.payload.replay_key())  # the init's pair was not kept


def test_a_full_cache_refuses_when_there_is_room_for_one_entry_only() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=900.0, max_entries=3, clock=clock)
    conn = make_conn(clock=clock, cache=cache, init_burst=10)
    assert kinds(conn.receive(make_init(os.urandom(32)))) == ["SessionStarted", "Send"]
    assert error_code(conn.receive(make_init(os.urandom(32)))) is E.RATE_LIMITED
    assert len(cache) == 2


def test_the_key_is_remembered_for_the_replay_window() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=60.0, clock=clock)
    conn = make_conn(clock=clock, cache=cache)
    key = os.urandom(32)
    conn.receive(make_init(key))
    clock.advance(59.0)
    assert error_code(conn.receive(make_init(key))) is E.REPLAY_DETECTED
    clock.advance(1.0)
    assert kinds(conn.receive(make_init(key))) == ["Send"]


def test_a_refused_init_leaves_the_session_and_its_key_alone() -> None:
    conn = make_conn()
    key = os.urandom(32)
    conn.receive(make_init(key))
    held = conn.sessions["42"].key
    assert error_code(conn.receive(make_init(key))) is E.REPLAY_DETECTED
    assert conn.sessions["42"].key is held
    assert held is not None
    assert held.equals(key)


def test_fresh_keys_for_every_init_work_as_the_sdk_does() -> None:
    conn = make_conn(init_burst=100)
    for i in range(20):
        key = os.urandom(32)
        assert kinds(conn.receive(make_init(key))) == (
            ["SessionStarted", "Send"] if i == 0 else ["Send"]
        )
        actions = conn.receive(message_frame(key, 0, request_id=f"r{i}"))
        assert [type(a) for a in actions] == [StartRequest]
        conn.finish("stop", prompt_tokens=1)
    assert conn.error_count == 0


def test_the_cache_holds_a_keyed_fingerprint_never_the_key() -> None:
    clock = Clock()
    cache = InitReplayCache(window_s=900.0, clock=clock)
    conn = make_conn(clock=clock, cache=cache)
    key = os.urandom(32)
    conn.receive(make_init(key))
    stored = set(cache._seen)
    with SecretBytes(key) as secret:
        fingerprint = HOST.fingerprint(secret)
    assert hashlib.sha256(SESSION_KEY_ENTRY + fingerprint).digest() in stored
    for plain in (key, hashlib.sha256(key).digest(), SESSION_KEY_ENTRY + key):
        assert plain not in stored
        assert hashlib.sha256(plain).digest() not in stored
    assert all(key not in entry for entry in stored)


def test_fingerprints_are_keyed_by_the_host_key() -> None:
    key = SecretBytes(os.urandom(32))
    other = HostKey.generate()
    assert HOST.fingerprint(key) == HOST.fingerprint(key)  # stable: workers agree
    assert HOST.fingerprint(key) != other.fingerprint(key)
    assert HOST.fingerprint(key) != HOST.fingerprint(SecretBytes(os.urandom(32)))
    assert len(HOST.fingerprint(key)) == 32
    assert key.reveal() not in HOST.fingerprint(key)
    # The derived fingerprint key dies with the host key.
    derived = other._fingerprint_key
    other.wipe()
    assert derived.wiped
    assert derived.is_all_zero()


# ------------------------------------------------------------------- the node


async def test_key_reuse_is_refused_over_the_node(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node()
    key = os.urandom(32)
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            frame, session = init_frame(node.host_public_key, session_id="5", session_key=key)
            await client.send(frame)
            await client.expect("session_init_ack")
            recorded = session.message_frame({"prompt": "pay me once"}, request_id="m0")
            await client.send(recorded)
            assert (await client.collect(session, request_id="m0")).text == "pay me once"
            again, _ = init_frame(
                node.host_public_key, session_id="5", session_key=key, request_id="again"
            )
            await client.send(again)
            await client.expect_error("REPLAY_DETECTED", request_id="again")
            await client.send(recorded)
            await client.expect_error("REPLAY_DETECTED", request_id="m0")
            await client.ping()
        async with memory_client(node) as other:  # another connection: the same
            await other.send(init_frame(node.host_public_key, session_id="6", session_key=key)[0])
            await other.expect_error("REPLAY_DETECTED")
    assert node.ctx.metrics.inits_refused["REPLAY_DETECTED"] == 2
    assert len(node.accounting.finished) == 1  # the prompt was served once


async def test_the_sdk_flow_with_a_fresh_key_per_init_over_a_socket(
    node_factory: NodeFactory,
) -> None:
    node = await node_factory.start()
    with trio.fail_after(GUARD_S):
        async with ws_client(node) as client:
            _, first = await client.init(node.host_public_key, session_id="8")
            for i in range(5):
                _, session = await client.init(
                    node.host_public_key, session_id="8", client_key=first.client_key
                )
                answer = await client.ask(session, f"prompt {i}", request_id=f"r{i}")
                assert answer.text == f"prompt {i}"
                assert answer.errors == []
    assert sum(node.ctx.metrics.errors.values()) == 0
    assert node.ctx.metrics.inits_accepted["encrypted"] == 6
