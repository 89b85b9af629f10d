"""Many sessions writing at once: nothing lost, nothing doubled, receipts numbered 1..N."""

from __future__ import annotations

from pathlib import Path

import trio

from node.crypto.hostkey import HostKey
from node.settlement import EndReason, Ledger, SignedReceipt, VerificationStatus
from tests.settlement.conftest import connect, encrypted_identity, plaintext_identity

SESSIONS = 100
REQUESTS = 5


def _counts(session: int, request: int) -> tuple[int, int]:
    return session + request + 1, (session * 7 + request * 3) % 50


async def test_100_concurrent_sessions_lose_and_duplicate_nothing(
    ledger: Ledger, ledger_path: Path, host_key: HostKey
) -> None:
    receipts: dict[int, SignedReceipt] = {}

    async def one_session(n: int) -> None:
        identity = (
            encrypted_identity(str(n), job_id=n, price=n + 1)
            if n % 4
            else plaintext_identity(str(n), job_id=n)
        )
        usage = ledger.start_session(identity)
        for r in range(REQUESTS):
            prompt, completion = _counts(n, r)
            await ledger.record_request(
                usage,
                request_id=f"{n}-{r}",
                prompt_tokens=prompt,
                completion_tokens=completion,
                finish_reason="stop",
            )
            await trio.lowlevel.checkpoint()
        receipts[n] = await ledger.close_session(usage, EndReason.DISCONNECT)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(SESSIONS):
                nursery.start_soon(one_session, n)

    assert len(receipts) == SESSIONS
    for n, signed in receipts.items():
        receipt = signed.receipt
        expected = [_counts(n, r) for r in range(REQUESTS)]
        assert receipt.session_id == str(n)
        assert receipt.request_count == REQUESTS
        assert receipt.prompt_tokens == sum(p for p, _ in expected)
        assert receipt.completion_tokens == sum(c for _, c in expected)
        assert receipt.amount == receipt.total_tokens * (n + 1 if n % 4 else 0)

    sequences = sorted(s.receipt.sequence for s in receipts.values())
    assert sequences == list(range(1, SESSIONS + 1))

    with connect(ledger_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (SESSIONS * REQUESTS,)
        assert conn.execute("SELECT COUNT(DISTINCT request_id) FROM requests").fetchone() == (
            SESSIONS * REQUESTS,
        )
        assert conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT session_uid) FROM receipts"
        ).fetchone() == (
            SESSIONS,
            SESSIONS,
        )
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone() == (SESSIONS,)
        # Every request row belongs to the session its id names.
        mismatched = conn.execute(
            "SELECT COUNT(*) FROM requests r JOIN sessions s USING (session_uid) "
            "WHERE r.request_id NOT LIKE s.session_id || '-%'"
        ).fetchone()
        assert mismatched == (0,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    verdicts = [s.verify(host_address=host_key.address) for s in ledger.store.iter_receipts()]
    assert len(verdicts) == SESSIONS
    # The node has a host key, so plaintext sessions' receipts are signed too.
    assert all(v.status is VerificationStatus.VALID for v in verdicts)
