"""``llm-node receipts ...``: list, show, verify and export the ledger's receipts.

``node/cli.py`` calls :func:`add_receipts_command` with its sub-parsers; each
sub-subcommand sets ``func`` (taking the parsed namespace, returning the exit status),
as the other commands do. Exit status: 0 success, 1 ``verify`` found a bad receipt, a
broken chain or (with ``--require-receipts``) no receipt at all, 2 the ledger could not
be opened, is not a ledger, or the arguments are wrong.

The CLI opens the ledger read-only (SQLite ``mode=ro``): it never writes, creates no
schema and leaves the journal mode alone, so it is safe to run beside a live node (WAL
allows a reader next to the writer) and harmless on a wrong path. Every value shown in a
table or a verdict line goes through :func:`~node.textsafe.printable`: model names and
session ids are client-chosen, and must not reach the terminal raw.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from node.settlement.errors import LedgerError
from node.settlement.ledger import ChainAudit, LedgerStore, StoredReceipt, default_ledger_path
from node.settlement.receipt import VerificationStatus
from node.textsafe import printable

_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")


def _open(args: argparse.Namespace) -> LedgerStore:
    path = Path(args.ledger) if args.ledger is not None else default_ledger_path()
    return LedgerStore.open_readonly(path)


def _signed_object(stored: StoredReceipt) -> dict[str, Any]:
    """The receipt as signed (parsed from its canonical text) with its signature."""
    try:
        receipt: Any = json.loads(stored.canonical_json)
    except ValueError:
        receipt = stored.canonical_json
    return {
        "receipt": receipt,
        "signature": stored.columns.get("signature"),
        "signed": bool(stored.columns.get("signed")),
    }


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as store:
        rows = list(store.iter_receipts())
    if args.limit is not None:
        rows = rows[-args.limit :] if args.limit > 0 else []
    header = (
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
    )
    table: list[tuple[str, ...]] = [header]
    for s in rows:
        c = s.columns
        table.append(
            tuple(
                printable(str(v))
                for v in (
                    s.sequence,
                    c["ended_at"],
                    c["session_id"],
                    "-" if c["job_id"] is None else c["job_id"],
                    c["model"],
                    c["request_count"],
                    c["total_tokens"],
                    c["price_per_token"],
                    c["amount"],
                    "yes" if c["signed"] else "no",
                    c["end_reason"],
                    s.submission_status or "pending",
                    c.get("protocol") or "v1",
                )
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    out.write(f"{len(rows)} receipt(s)\n")
    return 0


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as store:
        stored = store.receipt(args.sequence)
        if stored is None:
            print(f"error: no receipt with sequence {args.sequence}", file=sys.stderr)
            return 2
        requests = store.requests_for(stored.session_uid)
        submission = store.submission(stored.sequence)
    verdict = stored.verify()
    shown = _signed_object(stored)
    shown["verification"] = {"status": verdict.status.value, "reason": verdict.reason}
    shown["submission"] = submission
    shown["requests"] = [
        {
            "request_id": r.request_id,
            "model": r.model,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "finish_reason": r.finish_reason,
            "usage_estimated": r.usage_estimated,
            "created_at": r.created_at,
        }
        for r in requests
    ]
    out.write(json.dumps(shown, indent=2, sort_keys=True) + "\n")
    return 0


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    pin = args.host_address
    if pin is not None and not _ADDRESS_RE.fullmatch(pin):
        print("error: --host-address must be 0x followed by 40 hex digits", file=sys.stderr)
        return 2
    counts = dict.fromkeys(VerificationStatus, 0)
    failed = False

    def say(line: str) -> None:
        out.write(printable(line) + "\n")

    with _open(args) as store:
        audit = ChainAudit(store.epochs())
        for stored in store.iter_receipts():
            for problem in audit.feed(stored):
                say(f"chain: BROKEN: {problem}")
            verdict = stored.verify(host_address=pin)
            counts[verdict.status] += 1
            if verdict.status is VerificationStatus.INVALID:
                failed = True
                say(f"receipt {stored.sequence}: INVALID: {verdict.reason}")
            elif verdict.status is VerificationStatus.UNSIGNED:
                failed = failed or args.require_signed
                say(f"receipt {stored.sequence}: unsigned: {verdict.reason}")
            else:
                say(f"receipt {stored.sequence}: valid: {verdict.reason}")
        for problem in audit.finish():
            say(f"chain: BROKEN: {problem}")
        open_sessions = store.sessions_without_receipt()
    if open_sessions:
        say(
            f"note: {open_sessions} session(s) have requests but no receipt yet (open in a "
            "running node, or left by a crash: the next start writes their receipts)"
        )
    if audit.problems:
        failed = True
        say(f"chain: BROKEN ({audit.problems} problem(s)); {audit.head()}")
    else:
        say(f"chain: intact; {audit.head()}")
    total = sum(counts.values())
    say(
        f"{total} receipt(s): {counts[VerificationStatus.VALID]} valid, "
        f"{counts[VerificationStatus.UNSIGNED]} unsigned, "
        f"{counts[VerificationStatus.INVALID]} invalid"
    )
    if total == 0 and args.require_receipts:
        print(
            f"error: the ledger {store.path} holds no receipts (--require-receipts); "
            "is this the right file?",
            file=sys.stderr,
        )
        return 1
    return 1 if failed else 0


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as store:
        out.write("[")
        first = True
        for stored in store.iter_receipts():
            out.write("\n" if first else ",\n")
            out.write(json.dumps(_signed_object(stored), sort_keys=True))
            first = False
        out.write("\n]\n" if not first else "]\n")
    return 0


def _runner(
    command: Callable[[argparse.Namespace, TextIO], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = command(args, sys.stdout)
        except LedgerError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        return result

    return run


def add_receipts_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``receipts`` (list/show/verify/export) on a parent's sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--ledger",
        metavar="PATH",
        default=None,
        help="ledger file (default: $LLM_NODE_DATA_DIR/ledger.sqlite3, else "
        "~/.local/share/llm-node/ledger.sqlite3)",
    )
    parser = subparsers.add_parser("receipts", help="inspect and verify usage receipts")
    sub = parser.add_subparsers(dest="receipts_command", required=True)

    p = sub.add_parser("list", parents=[common], help="one line per receipt")
    p.add_argument("--limit", type=int, default=None, help="only the last N receipts")
    p.set_defaults(func=_runner(_cmd_list))

    p = sub.add_parser("show", parents=[common], help="one receipt with its requests")
    p.add_argument("sequence", metavar="ID", type=int, help="receipt sequence number")
    p.set_defaults(func=_runner(_cmd_show))

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check every receipt's signature and totals; exit 1 on any failure",
    )
    p.add_argument(
        "--host-address",
        metavar="ADDRESS",
        default=None,
        help="also require every signed receipt to name this host address",
    )
    p.add_argument(
        "--require-signed",
        action="store_true",
        help="treat unsigned receipts (from a node without a host key) as failures",
    )
    p.add_argument(
        "--require-receipts",
        action="store_true",
        help="fail (exit 1) when the ledger holds no receipt at all, e.g. to check a backup",
    )
    p.set_defaults(func=_runner(_cmd_verify))

    p = sub.add_parser("export", parents=[common], help="print all receipts with signatures")
    p.add_argument("--json", action="store_true", help="a JSON array (the default and only format)")
    p.set_defaults(func=_runner(_cmd_export))
    return parser


def receipts_main(argv: Sequence[str] | None = None) -> int:
    """Run ``receipts ...`` on its own (``argv`` starts after ``receipts``)."""
    parser = argparse.ArgumentParser(prog="llm-node")
    add_receipts_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["receipts", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result
