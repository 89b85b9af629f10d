"""The SQLite ledger: request rows, receipts, durability settings, migrations, paths."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from eth_account import Account
from eth_account.messages import encode_defunct

from node.crypto.hostkey import HostKey
from node.settlement import (
    EndReason,
    Ledger,
    LedgerError,
    LedgerStore,
    VerificationStatus,
    verify_receipt,
)
from node.settlement.schema import LATEST_VERSION, migrate
from tests.settlement.conftest import (
    FakeWallClock,
    connect,
    encrypted_identity,
    plaintext_identity,
)


async def test_receipt_counts_are_the_sum_of_recorded_requests(
    ledger: Ledger, ledger_path: Path, host_key: HostKey
) -> None:
    usage = ledger.start_session(encrypted_identity(price=7))
    counts = [(11, 20), (3, 0), (250, 1024)]
    for i, (p, c) in enumerate(counts):
        request = await ledger.record_request(
            usage,
            request_id=f"req-{i}",
            prompt_tokens=p,
            completion_tokens=c,
            finish_reason="stop" if c else "cancelled",
        )
        assert request.prompt_tokens == p
    signed = await ledger.close_session(usage, EndReason.DISCONNECT)
    receipt = signed.receipt
    assert receipt.prompt_tokens == sum(p for p, _ in counts) == 264
    assert receipt.completion_tokens == sum(c for _, c in counts) == 1044
    assert receipt.total_tokens == 1308
    assert receipt.request_count == 3
    assert receipt.amount == 1308 * 7
    assert receipt.end_reason == "disconnect"
    assert receipt.host_address == host_key.address
    assert receipt.sequence == 1
    assert (usage.prompt_tokens, usage.completion_tokens, usage.request_count) == (264, 1044, 3)
    assert usage.receipt == signed
    assert signed.signature is not None
    assert (
        Account.recover_message(
            encode_defunct(text=receipt.canonical_json()), signature=signed.signature
        )
        == host_key.address
    )

    with connect(ledger_path) as conn:
        rows = conn.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, finish_reason, "
            "usage_estimated, session_id, job_id FROM requests ORDER BY id"
        ).fetchall()
        stored = conn.execute(
            "SELECT prompt_tokens, completion_tokens, total_tokens, amount, price_per_token, "
            "canonical_json, signature, signed FROM receipts"
        ).fetchall()
    assert rows == [
        ("req-0", 11, 20, "stop", 0, "42", "42"),
        ("req-1", 3, 0, "cancelled", 0, "42", "42"),
        ("req-2", 250, 1024, "stop", 0, "42", "42"),
    ]
    assert stored == [
        (264, 1044, 1308, str(1308 * 7), "7", receipt.canonical_json(), signed.signature_hex, 1)
    ]


async def test_request_fields_are_stored_as_given(ledger: Ledger, ledger_path: Path) -> None:
    usage = ledger.start_session(encrypted_identity())
    await ledger.record_request(
        usage,
        request_id=17,
        prompt_tokens=1,
        completion_tokens=2,
        finish_reason="length",
        usage_estimated=True,
        model="other-model",
    )
    await ledger.record_request(
        usage, request_id=None, prompt_tokens=0, completion_tokens=0, finish_reason="error"
    )
    await ledger.record_request(
        usage, request_id="x" * 1000, prompt_tokens=0, completion_tokens=1, finish_reason="stop"
    )
    requests = ledger.store.requests_for(usage.ledger_uid or -1)
    assert [(r.request_id, r.model, r.usage_estimated) for r in requests] == [
        ("17", "other-model", True),
        (None, "smollm2-135m", False),
        ("x" * 256, "smollm2-135m", False),
    ]
    assert all(r.created_at.endswith("Z") for r in requests)


async def test_big_prices_survive_the_ledger(ledger: Ledger, ledger_path: Path) -> None:
    price = 2**256 - 1
    usage = ledger.start_session(encrypted_identity(price=price, job_id=2**200))
    await ledger.record_request(
        usage, request_id="a", prompt_tokens=9, completion_tokens=9, finish_reason="stop"
    )
    signed = await ledger.close_session(usage, EndReason.TTL_EXPIRED)
    assert signed.receipt.amount == 18 * price
    stored = ledger.store.receipt(signed.receipt.sequence)
    assert stored is not None
    assert stored.columns["amount"] == str(18 * price)
    assert stored.signed_receipt() == signed
    assert stored.verify().status is VerificationStatus.VALID


async def test_plaintext_only_node_records_unsigned_receipts(
    plain_ledger: Ledger, ledger_path: Path
) -> None:
    assert plain_ledger.host_address is None
    usage = plain_ledger.start_session(plaintext_identity())
    await plain_ledger.record_request(
        usage, request_id=1, prompt_tokens=4, completion_tokens=6, finish_reason="stop"
    )
    signed = await plain_ledger.close_session(usage, EndReason.IDLE_TIMEOUT)
    assert signed.signature is None
    assert not signed.signed
    assert signed.receipt.host_address is None
    assert signed.receipt.amount == 0
    assert signed.receipt.total_tokens == 10
    assert verify_receipt(signed).status is VerificationStatus.UNSIGNED
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT signed, signature FROM receipts").fetchall() == [(0, None)]


async def test_session_without_requests_still_gets_one_receipt(ledger: Ledger) -> None:
    usage = ledger.start_session(encrypted_identity())
    signed = await ledger.close_session(usage, EndReason.REINIT)
    assert (signed.receipt.request_count, signed.receipt.total_tokens) == (0, 0)
    assert signed.receipt.amount == 0
    assert usage.ledger_uid is not None


async def test_close_is_idempotent_and_closed_sessions_take_no_requests(
    ledger: Ledger, ledger_path: Path
) -> None:
    usage = ledger.start_session(encrypted_identity())
    await ledger.record_request(
        usage, request_id=1, prompt_tokens=1, completion_tokens=1, finish_reason="stop"
    )
    first = await ledger.close_session(usage, EndReason.DISCONNECT)
    second = await ledger.close_session(usage, EndReason.SHUTDOWN)
    assert second is first
    with pytest.raises(LedgerError, match="already closed"):
        await ledger.record_request(
            usage, request_id=2, prompt_tokens=1, completion_tokens=1, finish_reason="stop"
        )
    assert usage.request_count == 1
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (1,)


async def test_same_client_session_id_twice_gives_two_receipts(ledger: Ledger) -> None:
    a = ledger.start_session(encrypted_identity("42"))
    b = ledger.start_session(encrypted_identity("42"))
    await ledger.record_request(
        a, request_id=1, prompt_tokens=1, completion_tokens=0, finish_reason="stop"
    )
    await ledger.record_request(
        b, request_id=1, prompt_tokens=5, completion_tokens=0, finish_reason="stop"
    )
    ra = await ledger.close_session(a, EndReason.REINIT)
    rb = await ledger.close_session(b, EndReason.DISCONNECT)
    assert (ra.receipt.sequence, rb.receipt.sequence) == (1, 2)
    assert (ra.receipt.prompt_tokens, rb.receipt.prompt_tokens) == (1, 5)
    assert a.ledger_uid != b.ledger_uid


async def test_bad_arguments_are_refused_before_writing(ledger: Ledger, ledger_path: Path) -> None:
    usage = ledger.start_session(encrypted_identity())
    with pytest.raises(ValueError, match="prompt_tokens"):
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=-1, completion_tokens=0, finish_reason="stop"
        )
    with pytest.raises(ValueError, match="finish_reason"):
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=1, completion_tokens=0, finish_reason=""
        )
    with pytest.raises(ValueError, match="end_reason"):
        await ledger.close_session(usage, "")
    assert usage.ledger_uid is None
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)


async def test_close_in_a_cancelled_scope_still_commits(ledger: Ledger, ledger_path: Path) -> None:
    usage = ledger.start_session(encrypted_identity())
    await ledger.record_request(
        usage, request_id=1, prompt_tokens=2, completion_tokens=3, finish_reason="stop"
    )
    with trio.CancelScope() as scope:
        try:
            scope.cancel()
            await trio.sleep_forever()
        finally:
            signed = await ledger.close_session(usage, EndReason.DISCONNECT)
    assert scope.cancelled_caught
    assert signed.receipt.total_tokens == 5
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT total_tokens FROM receipts").fetchall() == [(5,)]


async def test_record_in_a_cancelled_scope_commits_then_cancels(
    ledger: Ledger, ledger_path: Path
) -> None:
    usage = ledger.start_session(encrypted_identity())
    with trio.CancelScope() as scope:
        scope.cancel()
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=2, completion_tokens=3, finish_reason="stop"
        )
        await trio.lowlevel.checkpoint()  # the cancellation lands here, after the write
        pytest.fail("not cancelled")
    assert usage.request_count == 1
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (1,)


def test_durability_pragmas_and_integrity(ledger: Ledger) -> None:
    store = ledger.store
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("foreign_keys") == 1
    assert store.pragma("user_version") == LATEST_VERSION == 5
    assert store.integrity_check() == "ok"
    with pytest.raises(ValueError, match="pragma"):
        store.pragma("user_version; DROP TABLE receipts")


async def test_reopen_keeps_data_and_is_idempotent(
    ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock
) -> None:
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        usage = ledger.start_session(encrypted_identity())
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=3, completion_tokens=4, finish_reason="stop"
        )
        first = await ledger.close_session(usage, EndReason.SHUTDOWN)
    with connect(ledger_path) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    for _ in range(2):
        with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
            assert ledger.recovered == []
            stored = ledger.store.receipt(1)
            assert stored is not None
            assert stored.signed_receipt() == first
            assert stored.verify(host_address=host_key.address).status is VerificationStatus.VALID
            assert ledger.store.integrity_check() == "ok"
            usage = ledger.start_session(encrypted_identity())
            later = await ledger.close_session(usage, EndReason.SHUTDOWN)
            assert later.receipt.sequence > 1
    with connect(ledger_path) as conn:
        assert conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall() == (schema)
        assert conn.execute("SELECT sequence FROM receipts ORDER BY 1").fetchall() == [
            (1,),
            (2,),
            (3,),
        ]


async def test_upgrade_from_schema_version_1(
    ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock
) -> None:
    ledger_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(ledger_path, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO sessions VALUES (1, '9', '9', 84532, NULL, 'm', '0', 0, "
        "'2025-01-01T00:00:00.000Z')"
    )
    conn.execute(
        "INSERT INTO requests VALUES (1, 1, '9', '9', 'r1', 'm', 5, 6, 'stop', 0, "
        "'2025-01-01T00:00:01.000Z')"
    )
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "submissions" not in tables
    conn.close()

    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        assert ledger.store.pragma("user_version") == LATEST_VERSION
        # The v1 session left open is turned into a receipt from its request rows.
        [recovered] = ledger.recovered
        assert recovered.receipt.end_reason == "recovered_after_restart"
        assert recovered.receipt.ended_at == "2025-01-01T00:00:01.000Z"
        assert (recovered.receipt.prompt_tokens, recovered.receipt.completion_tokens) == (5, 6)
        assert verify_receipt(recovered).status is VerificationStatus.VALID
        assert ledger.store.submission(1) is None  # the v2 table exists and is empty
        assert ledger.store.integrity_check() == "ok"


def test_newer_schema_is_refused(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    with connect(ledger_path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer than this node understands"):
        Ledger.open(ledger_path)


async def test_open_sessions_are_recovered_once_at_start(
    ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock
) -> None:
    ledger = Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock)
    usage = ledger.start_session(encrypted_identity())
    await ledger.record_request(
        usage, request_id=1, prompt_tokens=3, completion_tokens=4, finish_reason="stop"
    )
    ledger.close()  # as if the process died: no close_session
    with Ledger.open(ledger_path, host_key=host_key, recover=False) as reader:
        assert reader.recovered == []
        assert reader.store.receipt(1) is None
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        [signed] = ledger.recovered
        assert signed.receipt.total_tokens == 7
        assert signed.receipt.amount == 35
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        assert ledger.recovered == []


async def test_malformed_open_session_stops_start_up_with_a_clear_error(
    ledger_path: Path, host_key: HostKey
) -> None:
    ledger = Ledger.open(ledger_path, host_key=host_key)
    usage = ledger.start_session(encrypted_identity())
    await ledger.record_request(
        usage, request_id=1, prompt_tokens=3, completion_tokens=4, finish_reason="stop"
    )
    ledger.close()
    with connect(ledger_path) as conn:
        conn.execute("UPDATE sessions SET client_address = 'nonsense'")
    with pytest.raises(LedgerError, match="open session row 1 is malformed"):
        Ledger.open(ledger_path, host_key=host_key)
    with connect(ledger_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone() == (0,)


async def test_closed_ledger_raises_ledger_error(ledger: Ledger) -> None:
    usage = ledger.start_session(encrypted_identity())
    ledger.close()
    ledger.close()  # twice is fine
    with pytest.raises(LedgerError, match="is closed"):
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=1, completion_tokens=1, finish_reason="stop"
        )
    with pytest.raises(LedgerError, match="is closed"):
        await ledger.close_session(usage, EndReason.SHUTDOWN)


async def test_offload_false_keeps_the_mock_clock_still(
    ledger_path: Path, host_key: HostKey, autojump_clock: trio.testing.MockClock
) -> None:
    with Ledger.open(ledger_path, host_key=host_key, offload=False) as ledger:
        start = trio.current_time()
        with trio.fail_after(1):
            usage = ledger.start_session(encrypted_identity())
            await ledger.record_request(
                usage, request_id=1, prompt_tokens=1, completion_tokens=1, finish_reason="stop"
            )
            await ledger.close_session(usage, EndReason.DISCONNECT)
        assert trio.current_time() == start
        assert usage.receipt is not None


# -- paths that cannot hold a ledger -------------------------------------------------


def test_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    path = blocker / "ledger.sqlite3"
    with pytest.raises(LedgerError, match="cannot create the ledger directory") as info:
        Ledger.open(path)
    assert str(blocker) in info.value.message


def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="is a directory") as info:
        Ledger.open(tmp_path)
    assert str(tmp_path / "ledger.sqlite3") in info.value.message


def test_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not a database, just text that is long enough" * 40)
    with pytest.raises(LedgerError, match="not a database") as info:
        Ledger.open(path)
    assert str(path) in info.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LedgerError, match="cannot create the ledger file") as info:
            Ledger.open(ro / "ledger.sqlite3")
        assert "ermission denied" in info.value.message
        with pytest.raises(LedgerError, match="cannot create the ledger directory"):
            Ledger.open(ro / "sub" / "ledger.sqlite3")
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_existing_file(ledger_path: Path) -> None:
    Ledger.open(ledger_path).close()
    ledger_path.chmod(0o400)
    try:
        with pytest.raises(LedgerError, match="cannot open the ledger"):
            Ledger.open(ledger_path)
    finally:
        ledger_path.chmod(0o600)


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc, which nobody can write")
def test_directory_no_one_can_write() -> None:
    with pytest.raises(LedgerError, match="cannot create the ledger") as info:
        Ledger.open("/proc/llm-node-ledger-test/ledger.sqlite3")
    assert "/proc/llm-node-ledger-test" in info.value.message


def test_cli_mode_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        LedgerStore.open(tmp_path / "absent.sqlite3", create=False)
    assert not (tmp_path / "absent.sqlite3").exists()


def test_new_ledger_file_is_private(ledger_path: Path) -> None:
    Ledger.open(ledger_path).close()
    assert ledger_path.stat().st_mode & 0o077 == 0
