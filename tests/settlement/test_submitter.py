"""The settlement submitter interface and the default record-only submitter."""

from __future__ import annotations

import trio

from node.settlement import (
    EndReason,
    Ledger,
    RecordOnlySubmitter,
    SettlementSubmitter,
    SignedReceipt,
    SubmissionResult,
    SubmissionStatus,
    submit_pending,
)
from tests.settlement.conftest import encrypted_identity


async def _close_sessions(ledger: Ledger, n: int) -> None:
    for i in range(n):
        usage = ledger.start_session(encrypted_identity(str(i)))
        await ledger.record_request(
            usage, request_id=i, prompt_tokens=1, completion_tokens=i, finish_reason="stop"
        )
        await ledger.close_session(usage, EndReason.DISCONNECT)


async def test_record_only_marks_every_receipt_recorded_once(ledger: Ledger) -> None:
    await _close_sessions(ledger, 3)
    submitter: SettlementSubmitter = RecordOnlySubmitter()
    outcomes = await submit_pending(ledger, submitter)
    assert [seq for seq, _ in outcomes] == [1, 2, 3]
    assert all(r.status is SubmissionStatus.RECORDED for _, r in outcomes)
    assert await submit_pending(ledger, submitter) == []
    row = ledger.store.submission(2)
    assert row is not None
    assert (row["status"], row["submitter"], row["tx_hash"], row["attempts"]) == (
        "recorded",
        "record-only",
        None,
        1,
    )
    assert [s.submission_status for s in ledger.store.iter_receipts()] == ["recorded"] * 3


class FlakyChainSubmitter:
    """Fails its first attempt per receipt, then reports a transaction hash."""

    name = "test-chain"

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def submit(self, receipt: SignedReceipt) -> SubmissionResult:
        await trio.lowlevel.checkpoint()
        sequence = receipt.receipt.sequence
        first = sequence not in self.seen
        self.seen.append(sequence)
        if first:
            raise ConnectionError("https://rpc.example/SECRET-API-KEY unreachable")
        return SubmissionResult(SubmissionStatus.SUBMITTED, tx_hash=f"0x{sequence:064x}")


async def test_failed_submissions_are_stored_without_the_message_and_retried(
    ledger: Ledger,
) -> None:
    await _close_sessions(ledger, 2)
    submitter = FlakyChainSubmitter()
    first = await submit_pending(ledger, submitter, limit=10)
    assert [(s, r.status) for s, r in first] == [
        (1, SubmissionStatus.FAILED),
        (2, SubmissionStatus.FAILED),
    ]
    row = ledger.store.submission(1)
    assert row is not None
    assert row["detail"] == "ConnectionError"
    assert "SECRET" not in repr(row)
    second = await submit_pending(ledger, submitter, limit=1)
    assert [(s, r.status) for s, r in second] == [(1, SubmissionStatus.SUBMITTED)]
    third = await submit_pending(ledger, submitter)
    assert [s for s, _ in third] == [2]
    assert await submit_pending(ledger, submitter) == []
    row = ledger.store.submission(1)
    assert row is not None
    assert (row["status"], row["tx_hash"], row["attempts"]) == ("submitted", f"0x{1:064x}", 2)
    assert submitter.seen == [1, 2, 1, 2]
