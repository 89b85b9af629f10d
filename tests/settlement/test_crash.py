"""kill -9 of a process that is writing: every reported commit is on disk, the file is
intact, and the next start turns the open session into a receipt."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

from node.crypto.hostkey import HostKey
from node.settlement import Ledger, LedgerStore, VerificationStatus
from tests.settlement.conftest import HOST_KEY_HEX

REPO_ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import sys
import trio
from node.crypto.hostkey import HostKey
from node.settlement import Ledger, SessionIdentity

async def main() -> None:
    ledger = Ledger.open(sys.argv[1], host_key=HostKey.parse(sys.argv[2]))
    usage = ledger.start_session(SessionIdentity(
        session_id="9", job_id=9, chain_id=84532,
        client_address="0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        model="m", price_per_token=11, encrypted=True))
    n = 0
    while True:  # keeps writing until killed, so the kill lands mid-stream
        await ledger.record_request(usage, request_id=n, prompt_tokens=3,
                                    completion_tokens=4, finish_reason="stop")
        n += 1
        print(f"committed {n}", flush=True)

trio.run(main)
"""


async def test_kill_9_after_two_commits_loses_nothing_committed(
    tmp_path: Path, host_key: HostKey
) -> None:
    path = tmp_path / "ledger.sqlite3"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(path), HOST_KEY_HEX],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        with trio.fail_after(60):
            while b"committed 2\n" not in seen:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"writer exited early with {await proc.wait()}"
                seen += chunk
            proc.kill()  # SIGKILL: no finally blocks, no close
            assert await proc.wait() == -signal.SIGKILL
            # Anything printed before the kill was committed before it was printed.
            while chunk := await proc.stdout.receive_some():
                seen += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stdout.aclose()
    reported = max(
        int(line.split()[1]) for line in seen.decode().splitlines() if line.startswith("committed")
    )
    assert reported >= 2

    with LedgerStore.open(path, create=False) as store:
        assert store.integrity_check() == "ok"
        assert store.pragma("journal_mode") == "wal"
        assert store.receipt(1) is None  # the session was never closed
    with Ledger.open(path, host_key=host_key) as ledger:
        [recovered] = ledger.recovered
        receipt = recovered.receipt
        rows = receipt.request_count
        assert rows >= reported
        assert (receipt.prompt_tokens, receipt.completion_tokens) == (3 * rows, 4 * rows)
        assert receipt.amount == 7 * rows * 11
        assert receipt.end_reason == "recovered_after_restart"
        stored = ledger.store.receipt(1)
        assert stored is not None
        assert stored.verify(host_address=host_key.address).status is VerificationStatus.VALID
        requests = ledger.store.requests_for(stored.session_uid)
        assert [r.request_id for r in requests] == [str(i) for i in range(rows)]
        assert ledger.store.integrity_check() == "ok"
