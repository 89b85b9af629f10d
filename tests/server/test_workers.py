"""``llm-node serve --workers 2``: two Trio processes on one port, one replay cache."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio

from node.crypto.hostkey import HostKey
from tests.support.wire import SDK_HOST_KEY, wire_client

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
async def test_two_workers_serve_one_port_and_shut_down_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "node", "serve", "--backend", "echo", "--workers", "2",
        "--port", str(port), "--ledger", str(tmp_path / "ledger.sqlite3"),
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "HOST_PRIVATE_KEY": SDK_HOST_KEY}
    log = (tmp_path / "node.log").open("wb")
    proc = await trio.lowlevel.open_process(cmd, env=env, cwd=REPO, stderr=log)
    host = HostKey.parse(SDK_HOST_KEY)
    try:
        with trio.fail_after(60):
            while True:  # bounded by fail_after: wait until a worker listens
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
            url = f"ws://127.0.0.1:{port}/v1/ws"
            for i in range(8):  # connections spread over both workers
                async with wire_client(url) as client:
                    await client.init_encrypted(host.public_key, session_id=str(i), job_id=i)
                    text, end = await client.ask_encrypted(f"worker check {i}")
                    assert text == f"worker check {i}"
                    assert end["reason"] == "complete"
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            log.close()
            assert code == 0, (tmp_path / "node.log").read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    assert (tmp_path / "replay-cache.sqlite3").exists()
