"""``llm-node receipts list|show|verify|export`` through add_receipts_command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import attrs
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from node.crypto.hostkey import HostKey
from node.settlement import EndReason, Ledger, SignedReceipt, canonical_json
from node.settlement.cli import add_receipts_command, receipts_main
from node.settlement.receipt import receipt_hash
from tests.settlement.conftest import FakeWallClock, connect, encrypted_identity, plaintext_identity


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llm-node")
    add_receipts_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


async def fill(ledger: Ledger) -> list[SignedReceipt]:
    """Three sessions: 2 requests, 1 request at a huge price, none (reinit)."""
    out = []
    specs = [
        (encrypted_identity("100", job_id=1, price=3), [(10, 20), (5, 5)], EndReason.DISCONNECT),
        (encrypted_identity("101", job_id=2, price=2**53 - 1), [(1, 2)], EndReason.IDLE_TIMEOUT),
        (plaintext_identity("102", job_id=None), [], EndReason.REINIT),
    ]
    for identity, requests, reason in specs:
        usage = ledger.start_session(identity)
        for i, (p, c) in enumerate(requests):
            await ledger.record_request(
                usage,
                request_id=f"r{i}",
                prompt_tokens=p,
                completion_tokens=c,
                finish_reason="stop",
            )
        out.append(await ledger.close_session(usage, reason))
    return out


@pytest.fixture
async def filled(ledger: Ledger) -> list[SignedReceipt]:
    receipts = await fill(ledger)
    ledger.close()
    return receipts


async def test_list_prints_one_line_per_receipt(
    filled: list[SignedReceipt], ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["receipts", "list", "--ledger", str(ledger_path)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "SEQ",
        "ENDED_AT",
        "SESSION",
        "JOB",
        "MODEL",
        "REQS",
        "TOKENS",
        "PRICE",
        "AMOUNT",
        "SIGNED",
        "END_REASON",
        "SETTLEMENT",
        "PROTOCOL",
    ]
    assert lines[1].split()[0] == "1"
    assert lines[1].split()[2:7] == ["100", "1", "smollm2-135m", "2", "40"]
    assert lines[1].split()[8:] == ["120", "yes", "disconnect", "pending", "v1"]
    assert str(3 * (2**53 - 1)) in lines[2]
    assert lines[3].split()[3] == "-"  # no job id
    assert lines[-1] == "3 receipt(s)"
    code, out, _ = run_cli(
        ["receipts", "list", "--ledger", str(ledger_path), "--limit", "1"], capsys
    )
    assert code == 0
    assert out.splitlines()[1].split()[0] == "3"
    assert out.splitlines()[-1] == "1 receipt(s)"


async def test_show_prints_receipt_signature_and_requests(
    filled: list[SignedReceipt],
    ledger_path: Path,
    host_key: HostKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["receipts", "show", "1", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    shown = json.loads(out)
    assert shown["receipt"] == filled[0].receipt.to_json_object()
    assert shown["signature"] == filled[0].signature_hex
    assert shown["signed"] is True
    assert shown["verification"]["status"] == "valid"
    assert shown["submission"] is None
    assert [
        (r["request_id"], r["prompt_tokens"], r["completion_tokens"]) for r in shown["requests"]
    ] == [("r0", 10, 20), ("r1", 5, 5)]
    code, _, err = run_cli(["receipts", "show", "99", "--ledger", str(ledger_path)], capsys)
    assert code == 2
    assert "no receipt with sequence 99" in err


async def test_verify_passes_a_clean_ledger(
    filled: list[SignedReceipt],
    ledger_path: Path,
    host_key: HostKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["receipts", "verify", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        f"receipt 1: valid: signed by {host_key.address}",
        f"receipt 2: valid: signed by {host_key.address}",
        f"receipt 3: valid: signed by {host_key.address}",
    ]
    epoch = filled[2].receipt.ledger_epoch
    head = receipt_hash(filled[2].receipt.canonical_json())
    assert lines[3:] == [
        f"chain: intact; head receipt 3, epoch {epoch}, hash {head}",
        "3 receipt(s): 3 valid, 0 unsigned, 0 invalid",
    ]
    code, _, _ = run_cli(
        [
            "receipts",
            "verify",
            "--ledger",
            str(ledger_path),
            "--host-address",
            host_key.address.lower(),
        ],
        capsys,
    )
    assert code == 0


async def test_verify_fails_for_another_pinned_host(
    filled: list[SignedReceipt], ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = "0x" + "ab" * 20
    code, out, _ = run_cli(
        ["receipts", "verify", "--ledger", str(ledger_path), "--host-address", other], capsys
    )
    assert code == 1
    assert out.count("INVALID") == 3
    assert out.splitlines()[-1] == "3 receipt(s): 0 valid, 0 unsigned, 3 invalid"
    code, _, err = run_cli(
        ["receipts", "verify", "--ledger", str(ledger_path), "--host-address", "0x12"], capsys
    )
    assert code == 2
    assert "40 hex digits" in err


def tamper(path: Path, sql: str, *args: object) -> None:
    with connect(path) as conn:
        assert conn.execute(sql, args).rowcount == 1


@pytest.mark.parametrize(
    ("sql", "args", "reason"),
    [
        # Columns edited, signed text left alone.
        (
            "UPDATE receipts SET completion_tokens = 2000, total_tokens = 2001, "
            "amount = ? WHERE sequence = 2",
            (str(2001 * (2**53 - 1)),),
            "row columns differ from the signed receipt text",
        ),
        # Columns inconsistent with each other.
        ("UPDATE receipts SET amount = '7' WHERE sequence = 2", (), "malformed row"),
        # The signature removed.
        (
            "UPDATE receipts SET signature = NULL, signed = 0 WHERE sequence = 2",
            (),
            "carries no signature",
        ),
        # A request row edited after the receipt was written.
        (
            "UPDATE requests SET prompt_tokens = 100 WHERE request_id = 'r0' AND session_id = "
            "'101'",
            (),
            "request rows hold",
        ),
    ],
)
async def test_verify_catches_a_tampered_row(
    filled: list[SignedReceipt],
    ledger_path: Path,
    capsys: pytest.CaptureFixture[str],
    sql: str,
    args: tuple[object, ...],
    reason: str,
) -> None:
    tamper(ledger_path, sql, *args)
    code, out, _ = run_cli(["receipts", "verify", "--ledger", str(ledger_path)], capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("receipt 1: valid")
    assert lines[1].startswith("receipt 2: INVALID: ")
    assert reason in lines[1]
    assert lines[2].startswith("receipt 3: valid")
    assert lines[-1] == "3 receipt(s): 2 valid, 0 unsigned, 1 invalid"


async def test_verify_catches_a_consistently_rewritten_receipt(
    filled: list[SignedReceipt], ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Columns and canonical text rewritten together: only the signature can tell."""
    forged = attrs.evolve(filled[1].receipt, completion_tokens=1)
    with connect(ledger_path) as conn:
        conn.execute("UPDATE requests SET completion_tokens = 1 WHERE session_id = '101'")
        conn.execute(
            "UPDATE receipts SET completion_tokens = 1, total_tokens = ?, amount = ?, "
            "canonical_json = ? WHERE sequence = 2",
            (forged.total_tokens, str(forged.amount), forged.canonical_json()),
        )
    code, out, _ = run_cli(["receipts", "verify", "--ledger", str(ledger_path)], capsys)
    assert code == 1
    assert "receipt 2: INVALID: signature is by 0x" in out


async def test_unsigned_receipts_are_reported_not_failed(
    ledger_path: Path, wall_clock: FakeWallClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ledger.open(ledger_path, host_key=None, wall_clock=wall_clock) as ledger:
        usage = ledger.start_session(plaintext_identity())
        await ledger.record_request(
            usage, request_id=1, prompt_tokens=2, completion_tokens=2, finish_reason="stop"
        )
        await ledger.close_session(usage, EndReason.SHUTDOWN)
    code, out, _ = run_cli(["receipts", "verify", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "receipt 1: unsigned: recorded unsigned (node had no host key)"
    assert lines[1].startswith("chain: intact; head receipt 1, epoch ")
    assert lines[2] == "1 receipt(s): 0 valid, 1 unsigned, 0 invalid"
    code, _, _ = run_cli(
        ["receipts", "verify", "--ledger", str(ledger_path), "--require-signed"], capsys
    )
    assert code == 1
    code, out, _ = run_cli(["receipts", "export", "--json", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    [item] = json.loads(out)
    assert (item["signed"], item["signature"]) == (False, None)
    assert item["receipt"]["host_address"] is None


async def test_export_json_is_verifiable_with_eth_account(
    filled: list[SignedReceipt],
    ledger_path: Path,
    host_key: HostKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["receipts", "export", "--json", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    items = json.loads(out)
    assert [i["receipt"]["sequence"] for i in items] == [1, 2, 3]
    for item, original in zip(items, filled, strict=True):
        assert SignedReceipt.from_export(item) == original
        text = canonical_json(item["receipt"])
        signer = Account.recover_message(
            encode_defunct(text=text), signature=bytes.fromhex(item["signature"])
        )
        assert signer == host_key.address
    assert items[1]["receipt"]["amount"] == str(3 * (2**53 - 1))


def test_export_of_an_empty_ledger_is_an_empty_array(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Ledger.open(ledger_path).close()
    code, out, _ = run_cli(["receipts", "export", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    assert json.loads(out) == []


def test_missing_ledger_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["list"], ["show", "1"], ["verify"], ["export", "--json"]):
        path = tmp_path / "nope.sqlite3"
        code, out, err = run_cli(["receipts", *command, "--ledger", str(path)], capsys)
        assert code == 2
        assert out == ""
        assert err == f"error: no ledger at {path}\n"
        assert not path.exists()


async def test_default_path_comes_from_the_data_dir_variable(
    filled: list[SignedReceipt],
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLM_NODE_DATA_DIR", str(ledger_path.parent))
    assert receipts_main(["verify"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[-1] == "3 receipt(s): 3 valid, 0 unsigned, 0 invalid"


async def test_list_names_each_receipts_protocol(
    ledger: Ledger, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for session_id, protocol in (("7", "v1"), ("8", "v2")):
        identity = attrs.evolve(encrypted_identity(session_id), protocol=protocol)
        usage = ledger.start_session(identity)
        await ledger.close_session(usage, EndReason.DISCONNECT)
    ledger.close()
    code, out, _ = run_cli(["receipts", "list", "--ledger", str(ledger_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[-1] == "PROTOCOL"
    assert [line.split()[-1] for line in lines[1:3]] == ["v1", "v2"]
