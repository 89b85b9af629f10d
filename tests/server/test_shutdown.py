"""Graceful shutdown of a real ``llm-node serve`` process, and of an in-process node."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import trio
import trio.testing

from tests.server._support import (
    DEV_HOST_KEY_HEX,
    DEV_HOST_PUBLIC_HEX,
    UPGRADE_REQUEST,
    GatedBackend,
    build_node,
    ws_client,
)
from tests.server.conftest import NodeFactory

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


class NodeProcess:
    """``python -m node serve`` with its stderr collected (and the port parsed from it)."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = bytearray()
        self.port: int | None = None
        self.listening = trio.Event()

    async def pump_stderr(self) -> None:
        assert self.process.stderr is not None
        async with self.process.stderr:
            for _ in range(100_000):
                data = await self.process.stderr.receive_some(65536)
                if not data:
                    break
                self.stderr += data
                match = LISTENING.search(self.stderr)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    self.listening.set()
        self.listening.set()  # the process ended; let a waiter find port None


async def test_sigterm_cancels_the_stream_closes_1001_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_NODE_")}
    env["HOST_PRIVATE_KEY"] = DEV_HOST_KEY_HEX
    command = [
        sys.executable,
        "-m",
        "node",
        "serve",
        "--backend",
        "echo",
        "--echo-delay-ms",
        "50",
        "--port",
        "0",
        "--ledger",
        str(tmp_path / "l.sqlite3"),
        "--log-level",
        "info",
    ]
    prompt = "sigterm " + " ".join(f"s{i}" for i in range(400))  # 20 s at 50 ms a piece
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    node = NodeProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.pump_stderr)
            with trio.fail_after(30):
                await node.listening.wait()
                assert node.port is not None, node.stderr.decode(errors="replace")
                async with ws_client(node.port) as idle, ws_client(node.port) as client:
                    await idle.ping()
                    _, session = await client.init(DEV_HOST_PUBLIC_HEX, session_id="9")
                    await client.send(session.message_frame({"prompt": prompt}, request_id="q"))
                    for _ in range(2):
                        await client.expect("encrypted_chunk")
                    process.send_signal(signal.SIGTERM)
                    result = await client.collect(session, request_id="q", skip_chunks=2)
                    assert result.final_reason == "cancelled"
                    assert result.end["reason"] == "cancelled"
                    assert result.end["finish_reason"] == "cancelled"
                    assert 2 <= result.end["tokens_used"] < 100
                    assert prompt.startswith(result.text)
                    code, frames = await client.wait_closed()
                    assert code == 1001
                    assert frames == []
                    idle_code, idle_frames = await idle.wait_closed()
                    assert idle_code == 1001
                    assert idle_frames == []
                returncode = await process.wait()
        assert returncode == 0, node.stderr.decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    # The ledger's signed receipt says why the session ended and what was delivered.
    with closing(sqlite3.connect(f"file:{tmp_path / 'l.sqlite3'}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT session_id, end_reason, completion_tokens, client_address FROM receipts"
        ).fetchall()
    assert rows == [("9", "shutdown", result.end["tokens_used"], session.client_address)]
    log = node.stderr.decode(errors="replace")
    assert "shutting down" in log
    # The log never carries the session key or any of the text.
    assert session.key.hex() not in log
    assert "s17" not in log
    assert DEV_HOST_KEY_HEX[2:] not in log


async def test_in_process_shutdown_closes_idle_connections_1001(
    node_factory: NodeFactory,
) -> None:
    node = await node_factory.start()
    with trio.fail_after(20):
        async with ws_client(node) as client:
            await client.init(node.host_public_key)
            keys = node.held_keys()
            node.shutdown.set()
            code, _ = await client.wait_closed()
            assert code == 1001
        await node.wait_no_connections()
    assert keys[0].is_all_zero()
    assert node.ctx.shutting_down
    assert [reason for _, reason in node.accounting.ended] == ["shutdown"]


async def test_in_process_shutdown_ends_a_stream_as_cancelled(node_factory: NodeFactory) -> None:
    backend = GatedBackend()  # streams "first", then waits until released (never, here)
    node = await node_factory.start(backend=backend)
    with trio.fail_after(20):
        async with ws_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="4")
            await client.send(session.message_frame({"prompt": "x"}, request_id="g"))
            await client.expect("encrypted_chunk")
            await backend.streaming.wait()
            node.shutdown.set()
            result = await client.collect(session, request_id="g", skip_chunks=1)
            assert result.final_reason == "cancelled"
            assert result.end["reason"] == "cancelled"
            assert result.end["tokens_used"] == 1
            assert backend.cancelled.is_set()
            code, _ = await client.wait_closed()
            assert code == 1001
        await node.wait_no_connections()
    assert [reason for _, reason in node.accounting.ended] == ["shutdown"]
    assert [r.finish_reason for _, _, r in node.accounting.finished] == ["cancelled"]


async def test_an_upgrade_that_arrives_during_shutdown_gets_503() -> None:
    node = build_node()
    node.ctx.shutting_down = True  # the listener is closed; this one was accepted just before
    client_stream, server_stream = trio.testing.memory_stream_pair()
    answer = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.server.handle_stream, server_stream)
            await client_stream.send_all(UPGRADE_REQUEST)
            for _ in range(100):
                data = await client_stream.receive_some()
                if not data:
                    break
                answer += data
        await client_stream.aclose()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert node.ctx.drivers == set()
