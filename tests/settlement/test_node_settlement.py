"""Settlement through a live node: receipts match what clients saw, and survive crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from eth_account import Account
from eth_account.messages import encode_defunct

from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.settlement import Ledger
from node.settlement.service import LedgerAccounting
from tests.support.wire import SDK_HOST_KEY, running_node, wire_client

BIG_PRICE = 2**53 - 1
REPO = Path(__file__).resolve().parents[2]


async def _wait_for_receipts(ledger: Ledger, count: int) -> list[dict[str, object]]:
    with trio.fail_after(20):
        while True:
            rows = [json.loads(r.canonical_json) for r in ledger.store.iter_receipts()]
            if len(rows) >= count:
                return rows
            await trio.sleep(0.01)


async def test_receipts_equal_the_usage_clients_saw(tmp_path: Path) -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=host)
    seen: dict[str, list[dict[str, int]]] = {"encrypted": [], "plaintext": []}
    async with running_node(host_key=host, accounting=LedgerAccounting(ledger)) as (_ctx, url):
        with trio.fail_after(20):
            async with wire_client(url) as client:
                ack = await client.init_encrypted(
                    host.public_key, session_id="7", job_id=77, price=BIG_PRICE
                )
                assert ack["type"] == "session_init_ack"
                for prompt in ("one two three", "four five six seven"):
                    text, end = await client.ask_encrypted(prompt)
                    assert text == prompt
                    seen["encrypted"].append(end["usage"])
            async with wire_client(url) as client:
                text, end = await client.ask_plaintext("plain words here")
                assert text == "plain words here"
                seen["plaintext"].append(end["usage"])
        rows = await _wait_for_receipts(ledger, 2)
    by_mode = {bool(r["encrypted"]): r for r in rows}
    enc, plain = by_mode[True], by_mode[False]
    assert enc["prompt_tokens"] == sum(u["prompt_tokens"] for u in seen["encrypted"])
    assert enc["completion_tokens"] == sum(u["completion_tokens"] for u in seen["encrypted"])
    assert enc["total_tokens"] == sum(u["total_tokens"] for u in seen["encrypted"])
    assert enc["amount"] == str(enc["total_tokens"] * BIG_PRICE)  # exact, no float
    assert enc["job_id"] == "77"
    assert enc["session_id"] == "7"
    assert enc["request_count"] == 2
    assert plain["total_tokens"] == seen["plaintext"][0]["total_tokens"]
    assert plain["client_address"] is None
    assert plain["amount"] == "0"
    for stored in ledger.store.iter_receipts():
        signed = stored.signed_receipt()
        assert signed.signature is not None
        recovered = Account.recover_message(
            encode_defunct(text=stored.canonical_json), signature=signed.signature
        )
        assert recovered == host.address
    ledger.close()


async def test_hundred_concurrent_sessions_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=host)
    # One machine opens all 100 sessions at once: lift the per-address allowance.
    config = NodeConfig(port=0, address_init_burst=0)
    async with running_node(host_key=host, accounting=LedgerAccounting(ledger), config=config) as (
        _ctx,
        url,
    ):

        async def one(i: int) -> None:
            async with wire_client(url) as client:
                await client.init_encrypted(host.public_key, session_id=str(i), job_id=i)
                text, _ = await client.ask_encrypted(f"session {i} says hello")
                assert text == f"session {i} says hello"

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
        rows = await _wait_for_receipts(ledger, 100)
    assert sorted(int(str(r["session_id"])) for r in rows) == list(range(100))
    assert sorted(int(str(r["sequence"])) for r in rows) == list(range(1, 101))
    assert all(r["completion_tokens"] == 4 for r in rows)
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    try:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (100,)
    finally:
        conn.close()
    ledger.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _node_env() -> dict[str, str]:
    return {**os.environ, "HOST_PRIVATE_KEY": SDK_HOST_KEY, "PYTHONUNBUFFERED": "1"}


async def _wait_listening(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@pytest.mark.slow
async def test_kill_9_loses_no_completed_request(tmp_path: Path) -> None:
    ledger_file = tmp_path / "ledger.sqlite3"
    port = _free_port()
    cmd = [
        sys.executable, "-m", "node", "serve", "--backend", "echo", "--port", str(port),
        "--ledger", str(ledger_file), "--log-level", "warning",
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(
        cmd, env=_node_env(), cwd=REPO, stderr=subprocess.DEVNULL
    )
    try:
        await _wait_listening(port)
        host = HostKey.parse(SDK_HOST_KEY)
        with trio.fail_after(20):
            async with wire_client(f"ws://127.0.0.1:{port}/v1/ws") as client:
                await client.init_encrypted(host.public_key, session_id="9", job_id=9)
                for prompt in ("alpha beta", "gamma delta epsilon"):
                    await client.ask_encrypted(prompt)
                # Both stream_ends arrived; the node dies before the session ends.
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    conn = sqlite3.connect(ledger_file)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT completion_tokens FROM requests ORDER BY rowid").fetchall()
        assert rows == [(2,), (3,)]
    finally:
        conn.close()
    # The next start writes the receipt the dead process never could.
    reopened = Ledger.open(ledger_file, host_key=HostKey.parse(SDK_HOST_KEY))
    try:
        assert len(reopened.recovered) == 1
        assert reopened.recovered[0].receipt.completion_tokens == 5
    finally:
        reopened.close()


def test_unwritable_ledger_is_a_clear_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cmd = [
        sys.executable, "-m", "node", "serve", "--backend", "echo", "--port", "0",
        "--ledger", str(blocker / "ledger.sqlite3"),
    ]  # fmt: skip
    result = subprocess.run(
        cmd,
        env=_node_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "ledger" in result.stderr.lower()
    assert "Traceback" not in result.stderr
