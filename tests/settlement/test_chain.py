"""The ledger as a whole: sequence gaps, the receipt hash chain, epochs and restores, and
read-only ``receipts`` commands that refuse files which are not ledgers."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from node.crypto.hostkey import HostKey
from node.settlement import EndReason, Ledger, LedgerError, LedgerStore, SignedReceipt
from node.settlement.cli import add_receipts_command
from node.settlement.receipt import Receipt, receipt_hash, sign_receipt
from node.settlement.schema import migrate
from tests.settlement.conftest import FakeWallClock, connect, encrypted_identity


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llm-node")
    add_receipts_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


async def add_receipts(ledger: Ledger, count: int, *, model: str = "m") -> list[SignedReceipt]:
    out = []
    for i in range(count):
        usage = ledger.start_session(encrypted_identity(str(100 + i), model=model))
        await ledger.record_request(
            usage, request_id=i, prompt_tokens=3, completion_tokens=4, finish_reason="stop"
        )
        out.append(await ledger.close_session(usage, EndReason.DISCONNECT))
    return out


def verify(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code, out, _ = run_cli(["receipts", "verify", "--ledger", str(path), *extra], capsys)
    return code, out


# ---------------------------------------------------------------------- the chain


async def test_each_receipt_links_to_the_previous_one(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, third = await add_receipts(ledger, 3)
    assert first.receipt.prev_hash is None
    assert second.receipt.prev_hash == receipt_hash(first.receipt.canonical_json())
    assert third.receipt.prev_hash == receipt_hash(second.receipt.canonical_json())
    assert (
        receipt_hash(first.receipt.canonical_json())
        == hashlib.sha256(first.receipt.canonical_bytes()).hexdigest()
    )
    # One node start, one epoch, signed into every receipt.
    assert {r.receipt.ledger_epoch for r in (first, second, third)} == {ledger.store.epoch}
    ledger.close()
    code, out = verify(ledger_path, capsys)
    assert code == 0
    assert "chain: intact; head receipt 3" in out


async def test_a_deleted_receipt_is_a_gap(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_receipts(ledger, 4)
    ledger.close()
    with connect(ledger_path) as conn:
        conn.execute("DELETE FROM receipts WHERE sequence = 2")
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert "chain: BROKEN: receipt 2 is missing (a gap in the sequence numbers)" in out
    assert "chain: BROKEN (1 problem(s))" in out
    # Every remaining receipt is still validly signed: only the whole shows the loss.
    assert "3 receipt(s): 3 valid, 0 unsigned, 0 invalid" in out


async def test_several_deleted_receipts_are_named(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_receipts(ledger, 5)
    ledger.close()
    with connect(ledger_path) as conn:
        conn.execute("DELETE FROM receipts WHERE sequence IN (1, 3, 4)")
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert "receipt 1 is missing" in out
    assert "receipts 3 to 4 are missing" in out


async def test_a_removed_tail_is_detected_after_a_restart(
    ledger_path: Path,
    host_key: HostKey,
    wall_clock: FakeWallClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        await add_receipts(ledger, 3)
    # The next start records the tail it found (receipt 3) with its new epoch.
    Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock).close()
    with connect(ledger_path) as conn:
        conn.execute("DELETE FROM requests WHERE session_uid = 3")
        conn.execute("DELETE FROM receipts WHERE sequence = 3")
        conn.execute("DELETE FROM sessions WHERE session_uid = 3")
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert "the ledger ends at receipt 2, but epoch " in out
    assert "started after receipt 3 (receipts removed at the end)" in out


async def test_a_removed_tail_without_a_restart_leaves_a_note(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_receipts(ledger, 2)
    ledger.close()
    with connect(ledger_path) as conn:
        conn.execute("DELETE FROM receipts WHERE sequence = 2")
    code, out = verify(ledger_path, capsys)
    assert "note: 1 session(s) have requests but no receipt yet" in out
    assert code == 0  # indistinguishable from a session still open in a running node


async def test_a_replaced_receipt_breaks_the_link_of_the_next(
    ledger: Ledger, ledger_path: Path, host_key: HostKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a replacement signed by the host key itself (as after a restore) shows."""
    _, second, _ = await add_receipts(ledger, 3)
    ledger.close()
    other = Receipt(**{**_fields(second.receipt), "prompt_tokens": 1, "completion_tokens": 1})
    forged = sign_receipt(other, host_key)
    with connect(ledger_path) as conn:
        conn.execute("DELETE FROM requests WHERE session_uid = 2 AND id > 2")
        conn.execute(
            "UPDATE requests SET prompt_tokens = 1, completion_tokens = 1 WHERE session_uid = 2"
        )
        conn.execute(
            "UPDATE receipts SET prompt_tokens = 1, completion_tokens = 1, total_tokens = 2, "
            "amount = ?, canonical_json = ?, signature = ? WHERE sequence = 2",
            (str(other.amount), other.canonical_json(), forged.signature_hex),
        )
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert "receipt 2: valid" in out  # the replacement alone is a good receipt ...
    assert "receipt 3: prev_hash is not the hash of receipt 2" in out  # ... but not in place


def _fields(receipt: Receipt) -> dict[str, object]:
    return {
        name: getattr(receipt, name)
        for name in (
            "sequence",
            "session_id",
            "job_id",
            "chain_id",
            "client_address",
            "host_address",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "request_count",
            "price_per_token",
            "encrypted",
            "started_at",
            "ended_at",
            "end_reason",
            "version",
            "ledger_epoch",
            "prev_hash",
        )
    }


# ------------------------------------------------------------- epochs and restores


async def test_every_node_start_is_a_new_epoch_and_workers_share_it(
    ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock
) -> None:
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as first:
        [a] = await add_receipts(first, 1)
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as parent:
        epoch = parent.store.epoch
        with Ledger.open(
            ledger_path, host_key=host_key, wall_clock=wall_clock, recover=False
        ) as worker:
            assert worker.store.epoch == epoch
            [b] = await add_receipts(worker, 1)
        epochs = parent.store.epochs()
    assert a.receipt.ledger_epoch != b.receipt.ledger_epoch == epoch
    assert [(e.epoch, e.after_sequence) for e in epochs] == [
        (a.receipt.ledger_epoch, 0),
        (epoch, 1),
    ]
    assert epochs[1].after_hash == receipt_hash(a.receipt.canonical_json())


async def test_a_restore_reissues_numbers_under_a_new_epoch_from_the_same_link(
    ledger_path: Path,
    host_key: HostKey,
    wall_clock: FakeWallClock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The documented audit: two signed receipts with one sequence number, different
    epochs, the same prev_hash: the history forked at a restore."""
    backup = tmp_path / "backup.sqlite3"
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        await add_receipts(ledger, 2)
        source = sqlite3.connect(ledger_path)
        target = sqlite3.connect(backup)
        source.backup(target)
        source.close()
        target.close()
        [lost] = await add_receipts(ledger, 1)  # signed after the backup
    _restore(backup, ledger_path)
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as restored:
        [again] = await add_receipts(restored, 1)
    assert lost.receipt.sequence == again.receipt.sequence == 3
    assert lost.receipt != again.receipt
    assert lost.receipt.ledger_epoch != again.receipt.ledger_epoch
    assert lost.receipt.prev_hash == again.receipt.prev_hash  # a fork of the chain
    code, out = verify(ledger_path, capsys)
    assert code == 0, out  # the restored ledger is whole in itself
    # The receipt lost with the restore, put back in place of the re-issued one: each
    # link holds (same prev_hash), but its epoch had ended by then.
    _replace_row(ledger_path, lost)
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert f"receipt 3 is signed under epoch {lost.receipt.ledger_epoch}, which started " in out
    assert "and ended after receipt 2 (a receipt from another copy of the ledger)" in out


async def test_a_receipt_from_an_epoch_never_started_here_is_reported(
    ledger: Ledger, ledger_path: Path, host_key: HostKey, capsys: pytest.CaptureFixture[str]
) -> None:
    [signed] = await add_receipts(ledger, 1)
    ledger.close()
    foreign = sign_receipt(
        Receipt(**{**_fields(signed.receipt), "ledger_epoch": "cd" * 16}), host_key
    )
    _replace_row(ledger_path, foreign)
    code, out = verify(ledger_path, capsys)
    assert code == 1
    assert f"receipt 1 is signed under epoch {'cd' * 16}, which this ledger never started" in out


def _replace_row(path: Path, signed: SignedReceipt) -> None:
    r = signed.receipt
    with connect(path) as conn:
        conn.execute(
            "UPDATE receipts SET started_at = ?, ended_at = ?, ledger_epoch = ?, "
            "prev_hash = ?, canonical_json = ?, signature = ? WHERE sequence = ?",
            (
                r.started_at,
                r.ended_at,
                r.ledger_epoch,
                r.prev_hash,
                r.canonical_json(),
                signed.signature_hex,
                r.sequence,
            ),
        )


def _restore(backup: Path, ledger_path: Path) -> None:
    """The documented restore: drop the WAL files, put the backup in place."""
    for suffix in ("-wal", "-shm"):
        Path(str(ledger_path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, ledger_path)


def _read(path: Path) -> bytes:
    return path.read_bytes()


# ----------------------------------------------------------- older ledgers migrate


async def test_version_1_receipts_verify_and_the_chain_starts_after_them(
    ledger: Ledger, ledger_path: Path, host_key: HostKey, capsys: pytest.CaptureFixture[str]
) -> None:
    old = await add_receipts(ledger, 2)
    ledger.close()
    # Rewrite them as an older node wrote them: version 1, no epoch, no link.
    with connect(ledger_path) as conn:
        for signed in old:
            fields = {**_fields(signed.receipt), "version": 1}
            fields.update(ledger_epoch=None, prev_hash=None)
            v1 = sign_receipt(Receipt(**fields), host_key)
            conn.execute(
                "UPDATE receipts SET version = 1, ledger_epoch = NULL, prev_hash = NULL, "
                "canonical_json = ?, signature = ? WHERE sequence = ?",
                (v1.receipt.canonical_json(), v1.signature_hex, signed.receipt.sequence),
            )
            last_v1 = v1
    with Ledger.open(ledger_path, host_key=host_key) as reopened:
        [new] = await add_receipts(reopened, 1)
    assert new.receipt.prev_hash == receipt_hash(last_v1.receipt.canonical_json())
    code, out = verify(ledger_path, capsys)
    assert code == 0, out
    assert "3 receipt(s): 3 valid" in out
    assert "chain: intact" in out


def test_a_ledger_from_before_the_chain_is_read_without_migrating(
    tmp_path: Path, host_key: HostKey, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=2)
    fields = {
        "sequence": 1,
        "session_id": "9",
        "job_id": 9,
        "chain_id": 84532,
        "client_address": None,
        "host_address": host_key.address,
        "model": "m",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "request_count": 0,
        "price_per_token": 0,
        "encrypted": False,
        "started_at": "2025-01-01T00:00:00.000Z",
        "ended_at": "2025-01-01T00:00:01.000Z",
        "end_reason": "disconnect",
        "version": 1,
    }
    v1 = sign_receipt(Receipt(**fields), host_key)  # type: ignore[arg-type]
    conn.execute(
        "INSERT INTO sessions VALUES (1, '9', '9', 84532, NULL, 'm', '0', 0, "
        "'2025-01-01T00:00:00.000Z')"
    )
    conn.execute(
        "INSERT INTO receipts VALUES (1, 1, 1, '9', '9', 84532, NULL, ?, 'm', 0, 0, 0, 0, "
        "'0', '0', 0, '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:01.000Z', 'disconnect', "
        "?, ?, 1)",
        (host_key.address, v1.receipt.canonical_json(), v1.signature_hex),
    )
    conn.close()
    code, out = verify(path, capsys)
    assert code == 0, out
    assert "receipt 1: valid" in out
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone() == (2,)  # not migrated
    check.close()


# ------------------------------------------------------------ read-only commands


async def test_reading_commands_change_nothing(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_receipts(ledger, 2)
    ledger.close()
    with connect(ledger_path) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # a copy made without WAL
    before = _read(ledger_path)
    for command in (["list"], ["show", "1"], ["verify"], ["export"]):
        code, _, _ = run_cli(["receipts", *command, "--ledger", str(ledger_path)], capsys)
        assert code == 0, command
    assert _read(ledger_path) == before
    with connect(ledger_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


@pytest.mark.parametrize("kind", ["empty", "text", "other-sqlite", "directory"])
def test_a_file_that_is_not_a_ledger_is_refused(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "not-a-ledger.sqlite3"
    if kind == "empty":
        path.touch()
    elif kind == "text":
        path.write_text("this is a shopping list, not a database\n" * 10)
    elif kind == "other-sqlite":
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE notes (body TEXT)")
        other.commit()
        other.close()
    else:
        path.mkdir()
    before = b"" if kind == "directory" else path.read_bytes()
    for command in (["list"], ["show", "1"], ["verify"], ["export"]):
        code, out, err = run_cli(["receipts", *command, "--ledger", str(path)], capsys)
        assert code == 2, (kind, command)
        assert out == ""
        expected = "is a directory" if kind == "directory" else "is not an llm-node ledger"
        assert err.startswith(f"error: {path}") or err.startswith("error: ledger path"), err
        assert expected in err
    if kind != "directory":
        assert path.read_bytes() == before  # no schema created, no WAL switched on
    assert not Path(str(path) + "-wal").exists() or kind == "other-sqlite"


def test_open_readonly_refuses_writes(ledger: Ledger, ledger_path: Path) -> None:
    ledger.close()
    with LedgerStore.open_readonly(ledger_path) as store:
        assert store.read_only
        with pytest.raises(LedgerError):
            store.probe("2025-01-01T00:00:00.000Z")


async def test_require_receipts_fails_on_an_empty_ledger(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger.close()
    code, out, err = run_cli(
        ["receipts", "verify", "--require-receipts", "--ledger", str(ledger_path)], capsys
    )
    assert code == 1
    assert "0 receipt(s)" in out
    assert "holds no receipts" in err
    code, _, _ = run_cli(["receipts", "verify", "--ledger", str(ledger_path)], capsys)
    assert code == 0  # without the flag an empty ledger is simply empty


# --------------------------------------------------------- terminal injection


async def test_list_and_verify_escape_client_chosen_text(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = "m\n999  2099-01-01T00:00:00.000Z  x  1  forged\x1b[2J\x9b31m\u202eevil\u2028"
    await add_receipts(ledger, 1, model=evil)
    ledger.close()
    code, out, _ = run_cli(["receipts", "list", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3  # header, one row, the count: no forged row
    assert lines[2] == "1 receipt(s)"
    for bad in ("\x1b", "\x9b", "\u202e", "\u2028"):
        assert bad not in out
    assert "m\\x0a999" in lines[1]
    assert "\\x1b[2J" in lines[1]
    assert "\\u202eevil" in lines[1]
    code, out, _ = run_cli(["receipts", "show", "1", "--ledger", str(ledger_path)], capsys)
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert json.loads(out)["receipt"]["model"] == evil  # JSON keeps the exact value
    code, out, _ = run_cli(["receipts", "export", "--ledger", str(ledger_path)], capsys)
    assert "\x1b" not in out
    assert "\n999" not in out
