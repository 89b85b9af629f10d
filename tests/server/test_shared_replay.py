"""The replay cache file shared by worker processes and kept across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from node.crypto.hostkey import HostKey
from node.server.shared_replay import SharedReplayCacheError, SqliteReplayCache
from tests.support.wire import SDK_HOST_KEY, running_node, wire_client


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_two_caches_on_one_file_refuse_each_others_replays(tmp_path: Path) -> None:
    clock = Clock()
    a = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=clock)
    b = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=clock)
    try:
        assert a.add(b"init-1")
        assert not b.add(b"init-1")  # seen by the other worker
        assert b.add(b"init-2")
        assert not a.add(b"init-2")
        clock.now += 900  # the window has passed: the pair may be used again
        assert a.add(b"init-1")
        assert not b.add(b"init-1")
    finally:
        a.close()
        b.close()
    # A restarted node still remembers pairs inside the window.
    c = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=clock)
    try:
        assert not c.add(b"init-1")
    finally:
        c.close()


def test_the_count_is_kept_by_the_file_for_every_worker(tmp_path: Path) -> None:
    clock = Clock()
    a = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, max_entries=3, clock=clock)
    b = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, max_entries=3, clock=clock)
    try:
        assert a.add(b"1")
        assert b.add(b"2")
        assert not a.add(b"2")  # a replay changes no count
        assert len(a) == len(b) == 2
        assert a.add(b"3")
        assert not b.has_room()  # b sees a's inserts without counting the table
        clock.now += 10
        assert b.has_room()  # expired entries are purged in a bounded batch
        assert len(a) == len(b) == 0
    finally:
        a.close()
        b.close()


def test_purging_is_bounded_per_call(tmp_path: Path) -> None:
    from node.server import shared_replay

    clock = Clock()
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, clock=clock)
    try:
        for i in range(shared_replay.PURGE_BATCH * 3):
            assert cache.add(b"k%d" % i)
        clock.now += 10
        assert cache.has_room()
        assert len(cache) == shared_replay.PURGE_BATCH * 2  # one batch per call
        assert cache.has_room()
        assert cache.has_room()
        assert len(cache) == 0
    finally:
        cache.close()


def test_a_file_from_before_the_counter_is_counted_once(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "r.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY, at REAL NOT NULL)")
    old.executemany(
        "INSERT INTO seen VALUES (?, ?)", [(b"%032d" % i, 1_800_000_000.0) for i in range(5)]
    )
    old.commit()
    old.close()
    cache = SqliteReplayCache(path, window_s=900, clock=Clock())
    try:
        assert len(cache) == 5
        assert cache.add(b"new")
        assert len(cache) == 6
    finally:
        cache.close()


def test_full_cache_refuses_instead_of_forgetting(tmp_path: Path) -> None:
    clock = Clock()
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, max_entries=2, clock=clock)
    try:
        assert cache.add(b"1")
        assert cache.add(b"2")
        assert not cache.has_room()
        assert not cache.add(b"3")
        clock.now += 10
        assert cache.has_room()
        assert cache.add(b"3")
    finally:
        cache.close()


def test_unusable_path_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SharedReplayCacheError, match="replay cache"):
        SqliteReplayCache(blocker / "r.sqlite3", window_s=10)


async def test_an_init_replayed_to_another_worker_is_refused(tmp_path: Path) -> None:
    """Two nodes (as two --workers processes would) sharing one cache file."""
    host = HostKey.parse(SDK_HOST_KEY)
    path = tmp_path / "replay-cache.sqlite3"
    first = SqliteReplayCache(path, window_s=900)
    second = SqliteReplayCache(path, window_s=900)
    try:
        async with (
            running_node(host_key=host, replay_cache=first) as (_a, url_a),
            running_node(host_key=host, replay_cache=second) as (_b, url_b),
        ):
            with trio.fail_after(20):
                async with wire_client(url_a) as client:
                    sent: list[str] = []
                    real_send = client.ws.send_message

                    async def capture(message: str | bytes) -> None:
                        assert isinstance(message, str)
                        sent.append(message)
                        await real_send(message)

                    client.ws.send_message = capture  # type: ignore[method-assign]
                    ack = await client.init_encrypted(host.public_key)
                    assert ack["type"] == "session_init_ack"
                async with wire_client(url_b) as attacker:
                    await attacker.ws.send_message(sent[0])
                    reply = await attacker.recv()
    finally:
        first.close()
        second.close()
    assert reply["type"] == "error"
    assert reply["code"] == "REPLAY_DETECTED"
    assert json.loads(sent[0])["type"] == "encrypted_session_init"
