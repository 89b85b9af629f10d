"""Storage that stops taking writes (disk full, file removed, I/O errors).

Failures are injected at the SQLite layer of a real database file: ``PRAGMA query_only``
makes every write fail with SQLite's own error (as a read-only or vanished filesystem
does), and ``PRAGMA max_page_count`` makes the file full (``database or disk is full``);
switching them back is "the disk has room again". Before this was handled, an encrypted
init with a failing replay cache ended in ``INTERNAL_ERROR`` and close 1011, plaintext
prompts were served but not recorded, and ``/health`` said ok.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from node.crypto.hostkey import HostKey
from node.inference.base import GenerationResult
from node.protocol.connection import Session
from node.protocol.storage import StorageHealth
from node.server.shared_replay import SqliteReplayCache
from node.settlement import Ledger
from node.settlement.ledger import LedgerStore
from node.settlement.service import LedgerAccounting
from tests.server._support import RunningNode, init_frame, parse_prometheus, ws_client
from tests.server.conftest import NodeFactory
from tests.support.nodeproc import echo_node_process
from tests.support.wire import SDK_HOST_KEY, wire_client


@contextmanager
def failing(conn: sqlite3.Connection) -> Iterator[None]:
    """Every write on ``conn`` fails while inside the block."""
    conn.execute("PRAGMA query_only = ON")
    try:
        yield
    finally:
        conn.execute("PRAGMA query_only = OFF")


def _store_conn(store: LedgerStore) -> sqlite3.Connection:
    conn = store._conn
    assert conn is not None
    return conn


async def _health(node: RunningNode) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(node.url + "/health")
    assert response.status_code == 200  # liveness: the process is up
    body: dict[str, object] = response.json()
    return body


def _metrics(node: RunningNode) -> dict[str, float]:
    return parse_prometheus(node.ctx.metrics.render())


async def test_a_failing_replay_cache_refuses_inits_with_a_code(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = await node_factory.start()
    cache = SqliteReplayCache(tmp_path / "replay.sqlite3", window_s=900, health=node.ctx.storage)
    node.ctx.replay_cache = cache
    try:
        with trio.fail_after(20):
            async with ws_client(node) as client:
                with failing(cache._conn):
                    for _ in range(3):
                        await client.send(_init(node)[0])
                        await client.expect_error("STORAGE_UNAVAILABLE")
                    await client.ping()  # the connection is still fine (no 1011)
                    assert node.held_keys() == []  # refused inits keep no key
                    health = await _health(node)
                    assert (health["status"], health["replay_cache"]) == ("degraded", "failing")
                    metrics = _metrics(node)
                    assert metrics['llm_node_storage_failures_total{store="replay_cache"}'] == 3
                    assert metrics['llm_node_storage_failing{store="replay_cache"}'] == 1
                    assert metrics['llm_node_errors_total{code="STORAGE_UNAVAILABLE"}'] == 3
                    assert 'llm_node_errors_total{code="INTERNAL_ERROR"}' not in metrics
                # Writes work again: the next init goes through and health recovers.
                _, session = await client.init(node.host_public_key, session_id="2")
                assert (await client.ask(session, "back")).text == "back"
                health = await _health(node)
                assert (health["status"], health["replay_cache"]) == ("ok", "ok")
    finally:
        cache.close()


def _init(node: RunningNode, **kw: object) -> tuple[dict[str, object], object]:
    return init_frame(node.host_public_key, **kw)  # type: ignore[arg-type]


async def _ledger_node(
    node_factory: NodeFactory, tmp_path: Path, policy: str
) -> tuple[RunningNode, LedgerAccounting]:
    node = await node_factory.start()
    node.ctx.storage.on_ledger_failure = policy  # type: ignore[assignment]
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=node.ctx.host_key)
    accounting = LedgerAccounting(ledger, health=node.ctx.storage)
    node.ctx.accounting = accounting
    return node, accounting


async def test_serve_policy_keeps_serving_and_counts_what_it_cannot_record(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node, accounting = await _ledger_node(node_factory, tmp_path, "serve")
    store = accounting.ledger.store
    with trio.fail_after(20):
        async with ws_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="1")
            with failing(_store_conn(store)):
                assert (await client.ask(session, "not recorded")).text == "not recorded"
                assert accounting.write_failures == 1
                health = await _health(node)
                assert (health["status"], health["ledger"]) == ("degraded", "failing")
                metrics = _metrics(node)
                assert metrics['llm_node_storage_failures_total{store="ledger"}'] == 1
                assert metrics['llm_node_storage_failing{store="ledger"}'] == 1
                # serve: new sessions and requests are still accepted
                _, other = await client.init(node.host_public_key, session_id="2")
                assert (await client.ask(other, "still served")).text == "still served"
            assert (await client.ask(session, "recorded")).text == "recorded"
            health = await _health(node)
            assert (health["status"], health["ledger"]) == ("ok", "ok")
    accounting.ledger.close()


async def test_refuse_policy_stops_new_work_until_the_ledger_takes_writes(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node, accounting = await _ledger_node(node_factory, tmp_path, "refuse")
    store = accounting.ledger.store
    with trio.fail_after(20):
        async with ws_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="1")
            with failing(_store_conn(store)):
                await client.ask(session, "lost")  # the write that fails
                assert node.ctx.storage.failing("ledger")
                for _ in range(node.ctx.config.max_errors + 2):  # never charged
                    await client.send(_init(node, session_id="2")[0])
                    await client.expect_error("STORAGE_UNAVAILABLE")
                    await client.send(session.message_frame({"prompt": "x"}, request_id="q"))
                    await client.expect_error("STORAGE_UNAVAILABLE", request_id="q")
                assert await accounting.probe() is False  # still failing
                await client.ping()
                async with httpx.AsyncClient(timeout=10) as http:
                    ready = await http.get(node.url + "/ready")
                assert (ready.status_code, ready.json()["status"]) == (503, "storage_unavailable")
            assert await accounting.probe() is True  # the disk has room again
            async with httpx.AsyncClient(timeout=10) as http:
                assert (await http.get(node.url + "/ready")).status_code == 200
            _, again = await client.init(node.host_public_key, session_id="3")
            assert (await client.ask(again, "accepted")).text == "accepted"
    accounting.ledger.close()


async def test_refuse_policy_also_covers_plaintext(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node, accounting = await _ledger_node(node_factory, tmp_path, "refuse")
    node.ctx.storage.failed("ledger")
    with trio.fail_after(20):
        async with ws_client(node) as client:
            await client.send({"type": "session_init", "session_id": "8", "job_id": "1"})
            await client.expect_error("STORAGE_UNAVAILABLE")
            await client.send({"type": "prompt", "prompt": "hi", "id": 5})
            await client.expect_error("STORAGE_UNAVAILABLE", request_id=5)
    accounting.ledger.close()


async def test_a_full_ledger_file_is_a_counted_failure(tmp_path: Path) -> None:
    """A real "database or disk is full" from SQLite, not a raised exception of ours."""
    health = StorageHealth()
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=None, offload=False)
    accounting = LedgerAccounting(ledger, health=health)
    conn = _store_conn(ledger.store)
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(200):  # bounded: the first pages fill after a few dozen rows
        session = Session(f"s{i}", None, 0, encrypted=False, created_at=0.0)
        await accounting.session_started(session)
        await accounting.request_finished(session, i, GenerationResult("stop", 100, 100))
        if health.failing("ledger"):
            break
    assert health.failing("ledger")
    assert accounting.write_failures == 1
    assert health.failures["ledger"] == 1
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert await accounting.probe() is True
    assert not health.degraded
    ledger.close()


async def test_the_watch_probes_a_failing_ledger_about_once_a_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    health = StorageHealth(on_ledger_failure="refuse")
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=None, offload=False)
    accounting = LedgerAccounting(ledger, health=health)
    conn = _store_conn(ledger.store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accounting.watch)
        with failing(conn):
            health.failed("ledger")
            await trio.sleep(10)
            assert health.failing("ledger")  # probes fail while the ledger does
            assert health.failures["ledger"] >= 10
        await trio.sleep(1.5)
        assert not health.failing("ledger")
        health.admit()  # admits again
        nursery.cancel_scope.cancel()
    ledger.close()


def test_storage_health_policy_values() -> None:
    with pytest.raises(ValueError, match="unknown ledger failure policy"):
        StorageHealth(on_ledger_failure="maybe")  # type: ignore[arg-type]


def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i`` / ``-i``: a file even root cannot write (a real filesystem refusal)."""
    done = subprocess.run(
        ["chattr", "+i" if on else "-i", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


async def _http_health(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as client:
        body: dict[str, object] = (await client.get(url + "/health")).json()
    return body


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("chattr") is None,
    reason="needs root and chattr to make a file unwritable for the node",
)
async def test_a_real_node_refuses_while_its_ledger_cannot_be_written(tmp_path: Path) -> None:
    """``llm-node serve --on-ledger-failure refuse`` as a process, with its ledger's WAL
    file made immutable (every write gets EIO/EPERM from the kernel) and then writable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOST_PRIVATE_KEY", "LLM_"))}
    env["HOST_PRIVATE_KEY"] = SDK_HOST_KEY
    ledger = tmp_path / "ledger.sqlite3"
    wal = Path(str(ledger) + "-wal")
    host = HostKey.parse(SDK_HOST_KEY).public_key
    with echo_node_process(ledger, env, extra_args=("--on-ledger-failure", "refuse")) as (
        url,
        log,
    ):
        ws_url = url.replace("http://", "ws://") + "/v1/ws"
        with trio.fail_after(60):
            async with wire_client(ws_url) as client:
                assert (await client.init_encrypted(host))["type"] == "session_init_ack"
                assert (await client.ask_encrypted("recorded"))[0] == "recorded"
                if not _immutable(wal, True):
                    pytest.skip("this filesystem has no immutable attribute")
                try:
                    # Served (it had started), but its usage cannot be written.
                    assert (await client.ask_encrypted("lost", "r2"))[0] == "lost"
                    health = await _http_health(url)
                    assert (health["status"], health["ledger"]) == ("degraded", "failing")
                    reply = await client.init_encrypted(host, session_id="2")
                    assert reply["code"] == "STORAGE_UNAVAILABLE", reply
                finally:
                    assert _immutable(wal, False)
                for _ in range(250):  # the node probes about once a second
                    if (await _http_health(url))["ledger"] == "ok":
                        break
                    await trio.sleep(0.2)
                assert (await client.init_encrypted(host, session_id="3"))["type"] == (
                    "session_init_ack"
                )
    assert any("ledger write failed" in line for line in log)
    assert any("ledger writes work again" in line for line in log)
