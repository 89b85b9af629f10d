"""Settlement: handing receipts to whatever settles them (today: nobody, on purpose).

A submitter takes one signed receipt and reports what became of it. The default,
:class:`RecordOnlySubmitter`, settles nothing on chain: it marks each receipt
``recorded`` so the operator can see that the ledger has accounted for it.

How an on-chain submitter plugs in (not implemented here): it implements
:class:`SettlementSubmitter`; a background task in the server calls
:func:`submit_pending` now and then (or after each ``close_session``). That reads the
receipts that have no row in the ledger's ``submissions`` table (or whose last attempt
``failed``), in sequence order, and calls ``submit`` for each. An on-chain ``submit``
would skip receipts with nothing to settle (``job_id`` null, ``amount`` "0" or unsigned)
by returning ``RECORDED``; otherwise build a transaction calling the job marketplace
contract's proof/settlement function for ``job_id`` on ``chain_id`` with the token count
and the receipt's canonical text and host signature as the proof, send it with the
host's funded account, and return ``SUBMITTED`` with the transaction hash (``CONFIRMED``
once mined, if it waits). :func:`submit_pending` stores status, ``tx_hash``, a short
detail and the attempt count in ``submissions``; a raised exception is stored as
``FAILED`` (with only the exception's type name, since RPC errors can carry endpoint
URLs with credentials) and retried on the next pass.
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs

from node.settlement.ledger import Ledger
from node.settlement.receipt import SignedReceipt


class SubmissionStatus(enum.StrEnum):
    RECORDED = "recorded"  # accounted for; nothing sent on chain
    SUBMITTED = "submitted"  # transaction sent; tx_hash set
    CONFIRMED = "confirmed"  # transaction mined successfully
    FAILED = "failed"  # attempt failed; retried by the next submit_pending


@attrs.frozen
class SubmissionResult:
    status: SubmissionStatus
    tx_hash: str | None = None
    detail: str | None = None


class SettlementSubmitter(Protocol):
    """Something that settles one receipt. ``name`` is stored with each result."""

    name: str

    async def submit(self, receipt: SignedReceipt) -> SubmissionResult: ...


class RecordOnlySubmitter:
    """The default: marks receipts as recorded and does nothing on chain."""

    name = "record-only"

    async def submit(self, receipt: SignedReceipt) -> SubmissionResult:
        return SubmissionResult(
            SubmissionStatus.RECORDED, detail="recorded in the ledger; no on-chain settlement"
        )


async def submit_pending(
    ledger: Ledger, submitter: SettlementSubmitter, *, limit: int = 100
) -> list[tuple[int, SubmissionResult]]:
    """Hand up to ``limit`` pending receipts to ``submitter``; store each outcome.

    Returns (sequence, result) pairs in sequence order. Never raises for a submitter
    failure: that is stored as FAILED and retried next time.
    """
    outcomes: list[tuple[int, SubmissionResult]] = []
    for signed in await ledger.pending_submissions(limit=limit):
        sequence = signed.receipt.sequence
        try:
            result = await submitter.submit(signed)
        except Exception as exc:
            result = SubmissionResult(SubmissionStatus.FAILED, detail=type(exc).__name__)
        await ledger.record_submission(
            sequence,
            submitter=submitter.name,
            status=SubmissionStatus(result.status).value,
            tx_hash=result.tx_hash,
            detail=result.detail,
        )
        outcomes.append((sequence, result))
    return outcomes
