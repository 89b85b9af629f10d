"""The replay cache file shared by worker processes and kept across restarts."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from node.crypto.errors import ErrorCode
from node.crypto.hostkey import HostKey
from node.protocol.replay import Refusal
from node.server import shared_replay
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


# ------------------------------------------------------- add_all: every key or none


@pytest.mark.parametrize("present", [0, 1])
def test_add_all_records_nothing_when_one_key_is_present(tmp_path: Path, present: int) -> None:
    clock = Clock()
    a = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=clock)
    b = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=clock)
    keys = (b"init", b"session-key|fp")
    try:
        assert a.add(keys[present])  # recorded by another worker
        assert b.add_all(keys) == Refusal(ErrorCode.REPLAY_DETECTED, present)
        assert len(a) == len(b) == 1  # the other key was rolled back
        assert a.add(keys[1 - present])  # ... so it is still new
        assert not b.conn_in_transaction()
    finally:
        a.close()
        b.close()


def test_add_all_records_both_and_needs_room_for_both(tmp_path: Path) -> None:
    clock = Clock()
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, max_entries=3, clock=clock)
    try:
        assert cache.add_all((b"i1", b"k1")) is None
        assert not cache.add(b"i1")
        assert not cache.add(b"k1")
        assert cache.has_room()  # one entry free, not two
        assert cache.add_all((b"i2", b"k2")) == Refusal(ErrorCode.RATE_LIMITED)
        # a replay is called a replay, full or not (and records nothing)
        assert cache.add_all((b"i1", b"k2")) == Refusal(ErrorCode.REPLAY_DETECTED, 0)
        assert cache.add_all((b"k2", b"k1")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
        assert cache.add_all((b"x", b"x")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
        assert not cache.conn_in_transaction()
        assert len(cache) == 2
        clock.now += 10  # both expire; the full path purges them
        assert cache.add_all((b"i1", b"k1")) is None
        assert cache.add_all((b"y", b"z")) == Refusal(ErrorCode.RATE_LIMITED)
        assert len(cache) == 2
    finally:
        cache.close()


def test_add_all_a_key_given_twice_records_nothing(tmp_path: Path) -> None:
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, clock=Clock())
    try:
        assert cache.add_all((b"same", b"same")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
        assert len(cache) == 0
    finally:
        cache.close()


def test_add_all_is_one_transaction_with_one_commit(tmp_path: Path) -> None:
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=10, clock=Clock())
    statements: list[str] = []
    cache._conn.set_trace_callback(statements.append)
    try:
        assert cache.add_all((b"i", b"k")) is None
    finally:
        cache._conn.set_trace_callback(None)
        cache.close()
    assert statements[0] == "BEGIN IMMEDIATE"
    assert statements[-1] == "COMMIT"
    assert sum(s.startswith(("BEGIN", "COMMIT")) for s in statements) == 2


def _race(path: Path, pairs: list[tuple[bytes, bytes]], start: threading.Barrier) -> list[bool]:
    cache = SqliteReplayCache(path, window_s=900, clock=time.time)
    try:
        start.wait(timeout=20)
        return [cache.add_all(pair) is None for pair in pairs]
    finally:
        cache.close()


def test_concurrent_workers_record_each_pair_exactly_once(tmp_path: Path) -> None:
    """Four connections (as four workers) race on the same pairs, some of which overlap.

    Every pair shares one key with the next, so a worker that recorded the init digest but
    not the session key (two separate writes) would show up as two winners, or as an
    entry left behind by a refused pair.
    """
    path = tmp_path / "r.sqlite3"
    SqliteReplayCache(path, window_s=900).close()
    rounds = 200
    pairs = [(b"init%d" % i, b"key%d" % (i // 2)) for i in range(rounds)]  # 2i, 2i+1 share
    workers = 4
    start = threading.Barrier(workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(_race, path, pairs if w % 2 == 0 else pairs[::-1], start)
            for w in range(workers)
        ]
        results = [f.result(timeout=60) for f in futures]
    per_worker = [r if w % 2 == 0 else r[::-1] for w, r in enumerate(results)]
    wins = [sum(r[i] for r in per_worker) for i in range(rounds)]
    # of each two pairs sharing a session key, exactly one was recorded, by one worker
    for i in range(0, rounds, 2):
        assert sorted(wins[i : i + 2]) == [0, 1]
    cache = SqliteReplayCache(path, window_s=900)
    try:
        assert len(cache) == rounds  # two entries for each winning pair, no others
        for i in range(rounds):
            assert cache.add(b"init%d" % i) is not bool(wins[i])
    finally:
        cache.close()


# ------------------------------------------------ checkpoints: off the init path


def _wal_frames_after_inits(path: Path, inits: int) -> tuple[int, int]:
    cache = SqliteReplayCache(path, window_s=900, clock=Clock())
    try:
        for i in range(inits):
            assert cache.add_all((b"init%d" % i, b"key%d" % i)) is None
        return cache.checkpoint()
    finally:
        cache.close()


def test_inits_leave_the_wal_to_the_checkpointer(tmp_path: Path) -> None:
    """SQLite's default would copy the WAL back (and fsync) inside the commit that takes
    it past 1,000 pages; here the inits only append, and checkpoint() copies it all."""
    frames, copied = _wal_frames_after_inits(tmp_path / "r.sqlite3", 600)
    assert 1000 < frames < shared_replay.BACKSTOP_CHECKPOINT_PAGES
    assert copied == frames
    # Copied, the WAL starts again from its beginning with the next write.
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=Clock())
    try:
        assert cache.add_all((b"one more", b"key")) is None
        assert not cache.add(b"init599")  # what the checkpoint copied is still there
        frames, copied = cache.checkpoint()
        assert 0 < frames < 20
        assert copied == frames
    finally:
        cache.close()


def test_the_init_connection_still_checkpoints_past_the_backstop(tmp_path: Path) -> None:
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900, clock=Clock())
    try:
        (pages,) = cache._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    finally:
        cache.close()
    assert pages == shared_replay.BACKSTOP_CHECKPOINT_PAGES


class _CheckpointRecorder:
    def __init__(self, fail_on: set[int]) -> None:
        self.calls = 0
        self.fail_on = fail_on

    def checkpoint(self) -> tuple[int, int]:
        self.calls += 1
        if self.calls in self.fail_on:
            raise sqlite3.OperationalError("disk I/O error")
        return (3, 3)


async def test_checkpoint_loop_checkpoints_every_interval_and_outlives_failures(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _CheckpointRecorder(fail_on={2, 3})
    threads: list[object] = []

    async def run_sync(fn: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        threads.append(fn)
        await trio.lowlevel.checkpoint()
        return fn()

    with caplog.at_level(logging.WARNING, logger="node.server"):
        with trio.move_on_after(4 * 0.5 + 0.25):
            await shared_replay.checkpoint_loop(
                cache,  # type: ignore[arg-type]
                interval_s=0.5,
                run_sync=run_sync,
            )
    assert cache.calls == 4  # at 0.5, 1.0, 1.5 and 2.0 s; the failures stopped nothing
    assert len(threads) == 4  # each one through the thread runner
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "replay cache checkpoint failed",  # once for two failures in a row
        "replay cache checkpoints work again",
    ]


async def test_checkpoint_loop_runs_in_a_worker_thread(tmp_path: Path) -> None:
    cache = SqliteReplayCache(tmp_path / "r.sqlite3", window_s=900)
    seen: list[tuple[int, tuple[int, int]]] = []
    done = trio.Event()
    real = cache.checkpoint

    def checkpoint() -> tuple[int, int]:
        result = real()
        seen.append((threading.get_ident(), result))
        trio.from_thread.run_sync(done.set)
        return result

    cache.checkpoint = checkpoint  # type: ignore[method-assign]
    try:
        assert cache.add_all((b"i", b"k")) is None
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(shared_replay.checkpoint_loop, cache, interval_s=0.001)
                )
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        cache.close()
    thread, (frames, copied) = seen[0]
    assert thread != threading.get_ident()  # not the event loop's thread
    assert frames > 0
    assert copied == frames


async def test_the_node_checkpoints_its_replay_cache_off_the_init_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``llm-node serve`` runs checkpoint_loop on the replay cache beside its ledger."""
    import gc
    import signal
    from collections.abc import AsyncGenerator

    from node import serve
    from node.config import NodeConfig

    started: list[object] = []
    running = trio.Event()

    async def fake_loop(cache: SqliteReplayCache) -> None:
        started.append(cache)
        running.set()
        await trio.sleep_forever()

    async def signals() -> AsyncGenerator[int]:
        await running.wait()
        yield signal.SIGTERM

    monkeypatch.setattr(serve, "checkpoint_loop", fake_loop)
    config = NodeConfig(port=0, backend="echo", ledger_path=str(tmp_path / "ledger.sqlite3"))
    threshold = gc.get_threshold()
    stop = signals()
    try:
        with trio.fail_after(30):
            await serve._run_node(config, None, serve.build_backend(config), stop)
    finally:
        await stop.aclose()
        gc.set_threshold(*threshold)  # the node tunes the collector for its own process
        gc.unfreeze()
    assert len(started) == 1
    assert isinstance(started[0], SqliteReplayCache)
    assert started[0].path == tmp_path / "replay-cache.sqlite3"
