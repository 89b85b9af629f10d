"""Group commit: concurrent writes share transactions, and each still commits or fails
on its own."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
import trio

from node.settlement import Ledger
from node.settlement.errors import LedgerError
from tests.settlement.conftest import encrypted_identity


async def test_concurrent_writes_share_commits(ledger: Ledger) -> None:
    batches: list[int] = []
    real = ledger.store.run_batch

    def counting(writes: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        batches.append(len(writes))
        return real(writes)

    ledger.store.run_batch = counting  # type: ignore[method-assign]
    usages = [ledger.start_session(encrypted_identity(str(i), job_id=i)) for i in range(200)]

    async def one(i: int) -> None:
        await ledger.record_request(
            usages[i], request_id=f"r{i}", prompt_tokens=3, completion_tokens=i,
            finish_reason="stop",
        )  # fmt: skip

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert sum(batches) == 200
    assert len(batches) < 200  # writes that arrived during a commit went together
    assert all(u.request_count == 1 for u in usages)
    assert [u.completion_tokens for u in usages] == list(range(200))
    conn = sqlite3.connect(ledger.path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (200,)
    finally:
        conn.close()


async def test_a_failing_write_fails_alone(ledger: Ledger) -> None:
    good = ledger.start_session(encrypted_identity("1", job_id=1))
    closed = ledger.start_session(encrypted_identity("2", job_id=2))
    await ledger.close_session(closed, "disconnect")
    outcomes: dict[str, BaseException | None] = {}

    async def write(name: str, usage: Any) -> None:
        try:
            await ledger.record_request(
                usage, request_id=name, prompt_tokens=1, completion_tokens=1,
                finish_reason="stop",
            )  # fmt: skip
            outcomes[name] = None
        except LedgerError as exc:
            outcomes[name] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(write, f"good{i}", good)
            nursery.start_soon(write, "late", closed)
    assert isinstance(outcomes.pop("late"), LedgerError)
    assert all(v is None for v in outcomes.values())
    assert good.request_count == 20


async def test_a_failed_commit_fails_every_write_in_the_batch(ledger: Ledger) -> None:
    def broken(writes: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        raise LedgerError("disk full")

    ledger.store.run_batch = broken  # type: ignore[method-assign]
    usage = ledger.start_session(encrypted_identity())
    with pytest.raises(LedgerError, match="disk full"):
        await ledger.record_request(
            usage, request_id="x", prompt_tokens=1, completion_tokens=1, finish_reason="stop"
        )
    assert usage.request_count == 0
