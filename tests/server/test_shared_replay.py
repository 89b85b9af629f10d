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
