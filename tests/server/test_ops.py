"""What an operator relies on: readiness, who-connected logging, file modes, the
restart policy and the knobs that became flags."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from node.config import NodeConfig
from node.serve import RestartPolicy, build_backend
from node.server.metrics import NodeMetrics
from node.server.remote import parse_trusted_proxies, remote_address
from node.server.shared_replay import SqliteReplayCache
from node.settlement.ledger import Ledger
from tests.server._support import RunningNode, init_frame
from tests.server.conftest import NodeFactory

# ------------------------------------------------------------------- readiness


class SlowLoadingBackend:
    """A backend whose ``ready`` waits for :attr:`loaded` (a model being loaded)."""

    name = "slow"

    def __init__(self) -> None:
        self.loaded = trio.Event()
        self.ok = True

    def models(self) -> list[object]:
        return []

    async def ready(self) -> bool:
        await self.loaded.wait()
        return self.ok

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _get(node: RunningNode, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        return await client.get(path)


@pytest.mark.parametrize("path", ["/ready", "/v1/ready"])
async def test_ready_is_503_while_loading_200_when_loaded(
    node_factory: NodeFactory, path: str
) -> None:
    backend = SlowLoadingBackend()
    node = await node_factory.start(backend=backend)
    node.ctx.backend_loading = True  # what serve.py sets during the startup load
    with trio.fail_after(10):
        answer = await _get(node, path)
        assert answer.status_code == 503
        assert answer.json() == {"ready": False, "status": "loading"}
        health = await _get(node, "/health")  # liveness answers at once, 200
        assert health.status_code == 200
        assert health.json()["ready"] is False
        backend.loaded.set()
        node.ctx.backend_loading = False
        answer = await _get(node, path)
    assert answer.status_code == 200
    assert answer.json() == {"ready": True, "status": "ok"}


async def test_ready_is_503_when_the_backend_cannot_serve(node_factory: NodeFactory) -> None:
    backend = SlowLoadingBackend()
    backend.ok = False
    backend.loaded.set()
    node = await node_factory.start(backend=backend)
    with trio.fail_after(10):
        answer = await _get(node, "/ready")
        assert (answer.status_code, answer.json()["status"]) == (503, "backend_not_ready")
        backend.ok = True  # the upstream came back: asked again at the next probe
        answer = await _get(node, "/ready")
    assert answer.status_code == 200


async def test_ready_is_503_from_the_start_of_shutdown(node_factory: NodeFactory) -> None:
    node = await node_factory.start()
    with trio.fail_after(20):
        assert (await _get(node, "/ready")).status_code == 200
        node.ctx.shutting_down = True  # what serve() sets first when shutdown begins
        answer = await _get(node, "/ready")
        assert answer.status_code == 503
        assert answer.json() == {"ready": False, "status": "shutting_down"}
        assert (await _get(node, "/health")).status_code == 200


# ------------------------------------------------------------ who connected


def test_remote_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    trusted = parse_trusted_proxies("127.0.0.1, 10.0.0.0/8")
    assert remote_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"
    assert remote_address("192.0.2.1", "203.0.113.9", trusted) == "192.0.2.1"
    assert remote_address("127.0.0.1", "203.0.113.9", trusted) == "203.0.113.9"
    # Right to left through the trusted hops; a spoofed left part is not believed.
    assert remote_address("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.1.2.3", trusted) == ("203.0.113.9")
    assert remote_address("127.0.0.1", "garbage", trusted) == "127.0.0.1"
    assert remote_address("127.0.0.1", "[2001:db8::1]:443", trusted) == "2001:db8::1"
    assert remote_address("127.0.0.1", None, trusted) == "127.0.0.1"
    assert remote_address(None, "203.0.113.9", trusted) is None
    long_header = ",".join(["10.0.0.1"] * 10_000)  # bounded work, ends at a trusted hop
    assert remote_address("127.0.0.1", long_header, trusted) == "10.0.0.1"
    with pytest.raises(ValueError, match="not an IP address"):
        parse_trusted_proxies("10.0.0.0/8,proxy.example")


async def _open_session(node: RunningNode, headers: list[tuple[str, str]]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/v1/ws", extra_headers=headers)
        await ws.get_message()  # connected
        frame, _ = init_frame(node.host_public_key)
        await ws.send_message(json.dumps(frame))
        assert json.loads(await ws.get_message())["type"] == "session_init_ack"
        await ws.aclose()


@pytest.mark.parametrize(
    ("trusted", "expected"), [((), "127.0.0.1"), (("127.0.0.1/32",), "203.0.113.9")]
)
async def test_session_start_logs_remote_and_client_address(
    node_factory: NodeFactory,
    caplog: pytest.LogCaptureFixture,
    trusted: tuple[str, ...],
    expected: str,
) -> None:
    node = await node_factory.start(trusted_proxies=trusted)
    caplog.set_level(logging.INFO, logger="node.server")
    with trio.fail_after(10):
        await _open_session(node, [("X-Forwarded-For", "203.0.113.9")])
    [record] = [r for r in caplog.records if r.getMessage() == "session started"]
    assert record.__dict__["remote"] == expected
    client = record.__dict__["client"]
    assert isinstance(client, str)
    assert client.startswith("0x")
    assert len(client) == 42
    assert record.__dict__["encrypted"] is True


# ------------------------------------------------------------------ file modes


def test_node_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = os.umask(0o022)
    try:
        with Ledger.open(data / "ledger.sqlite3") as ledger:
            ledger.store.pragma("journal_mode")
            cache = SqliteReplayCache(data / "replay-cache.sqlite3", window_s=60)
            assert cache.add(b"k" * 65)
            files = sorted(p.name for p in data.iterdir())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}
            cache.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert "replay-cache.sqlite3-wal" in files
    assert "ledger.sqlite3-wal" in files
    assert modes == dict.fromkeys(files, 0o600)


def test_an_existing_world_readable_replay_cache_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "replay-cache.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)
    SqliteReplayCache(path, window_s=60).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ------------------------------------------------------------ restart policy


def test_restart_policy_backs_off_and_gives_up() -> None:
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=4.0, limit=5, window_s=60.0)
    assert [policy.record(t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.record(5.0) is None  # a sixth exit within 60 s
    calm = RestartPolicy(backoff_s=0.5, limit=2, window_s=60.0)
    assert calm.record(0.0) == 0.5
    assert calm.record(61.0) == 0.5  # the first exit left the window
    assert calm.record(62.0) == 1.0
    assert calm.record(63.0) is None


# ------------------------------------------------------------- knobs as flags


def test_session_and_init_limits_reach_the_protocol() -> None:
    from tests.server._support import build_node

    node = build_node(max_sessions=3, init_burst=4, init_refill_per_s=0.25)
    config = node.ctx.protocol_config()
    assert (config.max_sessions, config.init_burst, config.init_refill_per_s) == (3, 4, 0.25)


async def test_max_sessions_is_enforced(node_factory: NodeFactory) -> None:
    node = await node_factory.start(max_sessions=2)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    with trio.fail_after(10):
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/v1/ws")
            await ws.get_message()
            answers = []
            for i in range(3):
                frame, _ = init_frame(node.host_public_key, session_id=str(10 + i))
                await ws.send_message(json.dumps(frame))
                answers.append(json.loads(await ws.get_message()))
            await ws.aclose()
    assert [a["type"] for a in answers] == ["session_init_ack", "session_init_ack", "error"]
    assert answers[2]["code"] == "RATE_LIMITED"


def test_backend_defaults_reach_the_backend() -> None:
    llama = build_backend(
        NodeConfig(backend="llama", n_gpu_layers=7, default_max_tokens=99, default_temperature=0.2)
    )
    assert llama._n_gpu_layers == 7  # type: ignore[attr-defined]
    assert llama._default_max_tokens == 99  # type: ignore[attr-defined]
    assert llama._default_temperature == 0.2  # type: ignore[attr-defined]
    echo = build_backend(NodeConfig(backend="echo", default_max_tokens=99))
    assert echo._default_max_tokens is None  # type: ignore[attr-defined]


def test_metrics_negotiate_openmetrics() -> None:
    metrics = NodeMetrics()
    metrics.http_requests["200"] += 1
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b'llm_node_http_requests_total{status="200"} 1.0' in body
    body, content_type = metrics.exposition(None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in body


def test_per_frame_counters_are_published_at_each_scrape() -> None:
    metrics = NodeMetrics()
    for _ in range(3):
        metrics.chunks += 1
        metrics.tokens += 2
        metrics.messages["EncryptedMessage"] += 1
    first = metrics.render()
    assert "llm_node_chunks_total 3.0" in first
    assert "llm_node_tokens_total 6.0" in first
    assert 'llm_node_messages_total{type="EncryptedMessage"} 3.0' in first
    metrics.chunks += 1
    second = metrics.render()  # only the difference is added: no double counting
    assert "llm_node_chunks_total 4.0" in second
    assert "llm_node_tokens_total 6.0" in second
    assert 'llm_node_messages_total{type="EncryptedMessage"} 3.0' in second


async def test_shutdown_of_a_connection_that_is_ending_on_its_own_is_harmless() -> None:
    from node.server.driver import ConnectionDriver
    from tests.server._support import build_node

    node = build_node()
    driver = ConnectionDriver(node.ctx, ws=None, connection_id=1)  # type: ignore[arg-type]
    async with trio.open_nursery() as finished:
        pass
    driver._nursery = finished  # closed to new tasks, as in the moment before its finally
    driver.shutdown()  # must not raise "Nursery is closed to new arrivals"
    assert driver.closing
    assert driver.end_reason == "shutdown"


def _dies_at_once(config: NodeConfig, index: int, listen_socket: object) -> None:
    raise SystemExit(3)  # a worker that cannot stay up (runs in a spawned process)


@pytest.mark.slow
def test_workers_that_keep_dying_stop_the_node_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.serve import _Supervisor, bind_listen_socket

    config = NodeConfig(backend="echo", workers=1, ledger_path=str(tmp_path / "l.sqlite3"))
    sock = bind_listen_socket("127.0.0.1", 0)
    metrics = NodeMetrics()
    try:
        supervisor = _Supervisor(config, sock, metrics, target=_dies_at_once)
        supervisor.policy = RestartPolicy(backoff_s=0.01, backoff_max_s=0.02, limit=2)
        assert supervisor.run() == 1
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert "error: worker 0 exited unexpectedly (exit code 3); more than 2 worker exits" in err
    assert metrics.worker_restarts == 2
