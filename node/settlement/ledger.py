"""The usage ledger: an SQLite file holding every completed request and every receipt.

Durability. The database runs in WAL mode with ``synchronous=FULL``: once a write method
returns, its transaction is on disk and survives a crash or power loss of the node.
The server awaits :meth:`Ledger.record_request` before it sends ``stream_end`` and
:meth:`Ledger.close_session` before a connection's scope finishes, so a client never
sees usage that is not recorded.

Threading. :class:`LedgerStore` is the synchronous core. It owns one ``sqlite3``
connection opened with ``check_same_thread=False`` and guards every use of it with a
``threading.Lock``, so exactly one thread touches the connection at a time.
:class:`Ledger` is the Trio face the server uses: each write takes a ``trio.Lock``
(waiting tasks queue in Trio, not in worker threads) and then runs the store method in
a worker thread with ``trio.to_thread.run_sync``, off the event loop. Writes are
shielded from cancellation: once called they finish and commit even when the
connection's scope is being cancelled (disconnect, idle timeout, shutdown), which is
what makes ``close_session`` safe to await in a ``finally`` block.

One ledger file belongs to one node process. At open, the node turns sessions that a
previous process left without a receipt (it crashed or was killed) into receipts with
end reason ``recovered_after_restart``; the CLI opens with ``recover=False`` so that it
never closes a running node's sessions.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import attrs
import trio

from node.crypto.hostkey import HostKey
from node.settlement.errors import LedgerError, ReceiptError
from node.settlement.receipt import (
    MAX_AMOUNT,
    Receipt,
    SignedReceipt,
    Verification,
    VerificationStatus,
    parse_decimal,
    receipt_hash,
    sign_receipt,
    signature_from_hex,
    verify_receipt,
)
from node.settlement.schema import LATEST_VERSION, LEDGER_TABLES, migrate, schema_version
from node.settlement.usage import (
    MAX_TOKENS,
    EndReason,
    RequestUsage,
    SessionIdentity,
    SessionUsage,
    check_text,
    check_uint,
    format_timestamp,
)

ENV_DATA_DIR = "LLM_NODE_DATA_DIR"
LEDGER_FILENAME = "ledger.sqlite3"
MAX_REQUEST_ID = 256

T = TypeVar("T")


def default_ledger_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$LLM_NODE_DATA_DIR/ledger.sqlite3`` when set, else
    ``$XDG_DATA_HOME/llm-node/ledger.sqlite3`` (``~/.local/share`` when that is unset)."""
    env = os.environ if environ is None else environ
    data_dir = env.get(ENV_DATA_DIR)
    if data_dir:
        return Path(data_dir).expanduser() / LEDGER_FILENAME
    xdg = env.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        base = Path(xdg)
    else:
        home = env.get("HOME")
        base = (Path(home) if home else Path.home()) / ".local" / "share"
    return base / "llm-node" / LEDGER_FILENAME


def _request_id_text(value: object) -> str | None:
    """The envelope ``id`` as text: whatever JSON value the client sent, bounded."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:MAX_REQUEST_ID]


def _decimal_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


@attrs.frozen
class RequestTotals:
    count: int
    prompt_tokens: int
    completion_tokens: int


@attrs.frozen
class StoredReceipt:
    """A receipts row as stored, with what ``receipts verify`` needs to judge it."""

    sequence: int
    session_uid: int
    columns: dict[str, Any]
    canonical_json: str
    request_totals: RequestTotals
    submission_status: str | None

    def signed_receipt(self) -> SignedReceipt:
        """The receipt rebuilt from the row's columns (not from ``canonical_json``)."""
        c = self.columns
        try:
            job = c["job_id"]
            receipt = Receipt(
                version=c["version"],
                sequence=self.sequence,
                session_id=c["session_id"],
                job_id=None if job is None else parse_decimal("job_id", job),
                chain_id=c["chain_id"],
                client_address=c["client_address"],
                host_address=c["host_address"],
                model=c["model"],
                prompt_tokens=c["prompt_tokens"],
                completion_tokens=c["completion_tokens"],
                request_count=c["request_count"],
                price_per_token=parse_decimal("price_per_token", c["price_per_token"]),
                encrypted=bool(c["encrypted"]) if c["encrypted"] in (0, 1) else c["encrypted"],
                started_at=c["started_at"],
                ended_at=c["ended_at"],
                end_reason=c["end_reason"],
                # Columns a ledger from before schema steps 3 and 4 (read, not
                # migrated) does not have: their values for the receipts it holds.
                protocol=c.get("protocol") or "v1",
                ledger_epoch=c.get("ledger_epoch"),
                prev_hash=c.get("prev_hash"),
            )
        except (TypeError, ValueError) as exc:
            raise ReceiptError(f"receipt row {self.sequence}: {exc}") from None
        if c["total_tokens"] != receipt.total_tokens:
            raise ReceiptError("total_tokens column is not prompt + completion")
        if parse_decimal("amount", c["amount"], limit=MAX_AMOUNT) != receipt.amount:
            raise ReceiptError("amount column is not total_tokens * price_per_token")
        signature = signature_from_hex(c["signature"])
        if c["signed"] != (1 if signature is not None else 0):
            raise ReceiptError("signed column disagrees with the signature column")
        return SignedReceipt(receipt, signature)

    def verify(self, *, host_address: str | None = None) -> Verification:
        """Columns parse and agree with the signed text, the signature is the named
        host's (or the receipt is honestly unsigned), and the session's request rows sum
        to the receipt's counts."""
        try:
            signed = self.signed_receipt()
        except ReceiptError as exc:
            return Verification(VerificationStatus.INVALID, f"malformed row: {exc.message}")
        if signed.receipt.canonical_json() != self.canonical_json:
            return Verification(
                VerificationStatus.INVALID, "row columns differ from the signed receipt text"
            )
        verdict = verify_receipt(signed, host_address=host_address)
        if not verdict.ok:
            return verdict
        receipt = signed.receipt
        totals = self.request_totals
        if (totals.count, totals.prompt_tokens, totals.completion_tokens) != (
            receipt.request_count,
            receipt.prompt_tokens,
            receipt.completion_tokens,
        ):
            return Verification(
                VerificationStatus.INVALID,
                f"request rows hold {totals.count} requests, {totals.prompt_tokens}+"
                f"{totals.completion_tokens} tokens; the receipt says {receipt.request_count}"
                f", {receipt.prompt_tokens}+{receipt.completion_tokens}",
                verdict.signer,
            )
        return verdict


@attrs.frozen
class EpochRow:
    """One node start: the epoch it signed under and the tail it found."""

    epoch: str
    started_at: str
    after_sequence: int
    after_hash: str | None


class ChainAudit:
    """Checks the receipts of a ledger as a whole (``receipts verify``).

    Feed every stored receipt in sequence order to :meth:`feed`, then call
    :meth:`finish`. Each returns the problems found, as text. Found: a gap in the
    sequence numbers (receipts removed), a ``prev_hash`` that is not the hash of the
    previous receipt (removed, altered or re-ordered history), a version 1 receipt after
    chained ones, a receipt signed under an epoch this ledger never started or outside
    the span of its epoch (an epoch runs from the receipt it started after to the one the
    next epoch started after: a receipt from another copy of the ledger, as after a
    restore), and a tail shorter than the one a later node start recorded (receipts
    removed at the end). Version 1 receipts before the first chained one are checked for
    gaps only: the chain starts at the first version 2 receipt, which links to its
    predecessor whatever that one's version.
    """

    def __init__(self, epochs: list[EpochRow] | None = None) -> None:
        self.expected = 1
        self.count = 0
        self.chained = False
        self.problems = 0
        self.last: StoredReceipt | None = None
        self.epochs = list(epochs or [])
        # epoch -> (after_sequence, the after_sequence of the next start or None)
        self._spans: dict[str, tuple[int, int | None]] = {
            row.epoch: (
                row.after_sequence,
                self.epochs[i + 1].after_sequence if i + 1 < len(self.epochs) else None,
            )
            for i, row in enumerate(self.epochs)
        }

    def _epoch_problem(self, seq: int, epoch: object) -> str | None:
        if not self._spans:
            return None  # a ledger without the epochs table (read, not migrated)
        span = self._spans.get(epoch) if isinstance(epoch, str) else None
        if span is None:
            return f"receipt {seq} is signed under epoch {epoch}, which this ledger never started"
        after, until = span
        if seq <= after or (until is not None and seq > until):
            end = "" if until is None else f" and ended after receipt {until}"
            return (
                f"receipt {seq} is signed under epoch {epoch}, which started after receipt "
                f"{after}{end} (a receipt from another copy of the ledger)"
            )
        return None

    def feed(self, stored: StoredReceipt) -> list[str]:
        out: list[str] = []
        seq = stored.sequence
        if seq != self.expected:
            missing = (
                f"receipt {self.expected} is"
                if seq == self.expected + 1
                else f"receipts {self.expected} to {seq - 1} are"
            )
            out.append(f"{missing} missing (a gap in the sequence numbers)")
        prev = self.last
        version = stored.columns.get("version")
        prev_hash = stored.columns.get("prev_hash")
        if version == 1:
            if self.chained:
                out.append(f"receipt {seq} is a version 1 receipt after chained ones")
        else:
            self.chained = True
            problem = self._epoch_problem(seq, stored.columns.get("ledger_epoch"))
            if problem is not None:
                out.append(problem)
            if seq == 1:
                if prev_hash is not None:
                    out.append("receipt 1 names a predecessor (prev_hash is not null)")
            elif prev_hash is None:
                out.append(f"receipt {seq} does not link to receipt {seq - 1} (no prev_hash)")
            elif (
                prev is not None
                and prev.sequence == seq - 1
                and prev_hash != receipt_hash(prev.canonical_json)
            ):
                out.append(
                    f"receipt {seq}: prev_hash is not the hash of receipt {seq - 1} "
                    "(the history before it was changed)"
                )
        self.expected = seq + 1
        self.count += 1
        self.last = stored
        self.problems += len(out)
        return out

    def finish(self) -> list[str]:
        out: list[str] = []
        last = self.last.sequence if self.last is not None else 0
        for row in self.epochs:
            if row.after_sequence > last:
                out.append(
                    f"the ledger ends at receipt {last}, but epoch {row.epoch} started "
                    f"after receipt {row.after_sequence} (receipts removed at the end)"
                )
        self.problems += len(out)
        return out

    def head(self) -> str:
        """The ledger's head, for an auditor to note down and compare later."""
        last = self.last
        if last is None:
            return "empty"
        epoch = last.columns.get("ledger_epoch") or "none (version 1)"
        return (
            f"head receipt {last.sequence}, epoch {epoch}, hash {receipt_hash(last.canonical_json)}"
        )


def _sqlite_message(exc: sqlite3.Error) -> str:
    text = str(exc) or type(exc).__name__
    if "unable to open database file" in text:
        text += " (check that the directory exists and is writable)"
    return text


class LedgerStore:
    """Synchronous ledger over one SQLite connection (thread-safe by a lock)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        epoch: str | None = None,
        read_only: bool = False,
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        #: The epoch this process signs its receipts under (None: read-only).
        self.epoch = epoch
        self.read_only = read_only
        # Re-entrant: a batch holds it while each write in the batch takes it again.
        self._lock = threading.RLock()

    @property
    def path(self) -> Path:
        return self._path

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        wall_clock: Callable[[], float] = time.time,
        new_epoch: bool = True,
    ) -> LedgerStore:
        """Open (creating when ``create``) and migrate the ledger at ``path``.

        ``create=True`` is the node's mode: it also proves the file writable by
        writing ``last_opened_at``, and starts a new ledger epoch (``new_epoch``; a
        worker process passes False and signs under the epoch its parent started).
        ``create=False`` opens read-only, as :meth:`open_readonly`.

        Every problem with the path raises :class:`LedgerError` here, before the node
        serves anyone: missing directory that cannot be created, read-only directory or
        file, a directory where the file should be, a file that is not SQLite.
        """
        if not create:
            return cls.open_readonly(path)
        target = Path(path).expanduser()
        if target.is_dir():
            raise LedgerError(
                f"ledger path {target} is a directory; give a file path such as "
                f"{target / LEDGER_FILENAME}"
            )
        if not target.exists():
            parent = target.parent
            try:
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(
                    f"cannot create the ledger directory {parent}: {exc.strerror or exc}"
                ) from None
            if not parent.is_dir():
                raise LedgerError(f"cannot create the ledger: {parent} is not a directory")
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                pass
            except OSError as exc:
                raise LedgerError(
                    f"cannot create the ledger file {target}: {exc.strerror or exc}"
                ) from None
            else:
                os.close(fd)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                str(target), timeout=10.0, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(
                    f"cannot open the ledger {target}: the database refused WAL mode "
                    f"(it stays in {mode!r}); is the file or its directory read-only?"
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(conn)
            # A real write at start-up, so that a read-only file fails here and not
            # in the middle of the first session.
            now = format_timestamp(wall_clock())
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (now,))
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_opened_at', ?)",
                (now,),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            epoch = None if row is None else str(row[0])
            if new_epoch or epoch is None:
                epoch = cls._start_epoch(conn, now)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise LedgerError(f"cannot open the ledger {target}: {_sqlite_message(exc)}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(conn, target, epoch=epoch)

    @staticmethod
    def _start_epoch(conn: sqlite3.Connection, now: str) -> str:
        """A new random epoch, recorded with the tail it starts after."""
        epoch = secrets.token_hex(16)
        tail = conn.execute(
            "SELECT sequence, canonical_json FROM receipts ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        after, after_hash = (0, None) if tail is None else (int(tail[0]), receipt_hash(tail[1]))
        conn.execute(
            "INSERT INTO epochs (epoch, started_at, after_sequence, after_hash) "
            "VALUES (?, ?, ?, ?)",
            (epoch, now, after, after_hash),
        )
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> LedgerStore:
        """Open an existing ledger for reading only (the ``receipts`` commands).

        Nothing is written: the file is opened with SQLite's ``mode=ro`` (no schema is
        created, no migration runs, the journal mode is left as it is). A missing file,
        a directory, a file that is not SQLite, and an SQLite file without the ledger's
        tables all raise :class:`LedgerError` naming the path.
        """
        target = Path(path).expanduser()
        if target.is_dir():
            raise LedgerError(f"ledger path {target} is a directory, not a ledger file")
        if not target.exists():
            raise LedgerError(f"no ledger at {target}")
        uri = "file:" + urllib.parse.quote(str(target.absolute())) + "?mode=ro"
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            version = schema_version(conn)
            tables = {
                str(name)
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            text = _sqlite_message(exc)
            if "not a database" in text:
                raise LedgerError(f"{target} is not an llm-node ledger ({text})") from None
            raise LedgerError(f"cannot read the ledger {target}: {text}") from None
        if version < 1 or not tables >= LEDGER_TABLES:
            conn.close()
            raise LedgerError(
                f"{target} is not an llm-node ledger (an SQLite file without the ledger's "
                "tables); check the path (--ledger, LLM_NODE_DATA_DIR)"
            )
        if version > LATEST_VERSION:
            conn.close()
            raise LedgerError(
                f"ledger schema version {version} is newer than this llm-node understands "
                f"({LATEST_VERSION}); upgrade llm-node"
            )
        return cls(conn, target, read_only=True)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    @contextmanager
    def _locked(self, doing: str) -> Iterator[sqlite3.Connection]:
        """The connection, held by this thread alone; sqlite errors become LedgerError."""
        with self._lock:
            if self._conn is None:
                raise LedgerError(f"ledger {self._path} is closed (cannot {doing})")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise LedgerError(
                    f"ledger {self._path}: cannot {doing}: {_sqlite_message(exc)}"
                ) from None

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        """A transaction, or a savepoint inside the batch's transaction (group commit)."""
        if conn.in_transaction:
            conn.execute("SAVEPOINT one_write")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK TO one_write")
                conn.execute("RELEASE one_write")
                raise
            conn.execute("RELEASE one_write")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def run_batch(self, writes: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Run several writes in one transaction: one COMMIT (one fsync) for all of them.

        Each write runs in its own savepoint, so one that fails is rolled back alone and
        its exception is returned in its slot as ``(False, exc)``; the others return
        ``(True, result)``. If the COMMIT itself fails, every write failed: that error
        is raised and none of them is durable.
        """
        results: list[tuple[bool, Any]] = []
        with self._locked("write a batch") as conn, self._transaction(conn):
            for write in writes:
                try:
                    results.append((True, write()))
                except Exception as exc:  # reported to that write's caller
                    results.append((False, exc))
        return results

    @staticmethod
    def _insert_session(
        conn: sqlite3.Connection, identity: SessionIdentity, started_at: str
    ) -> int:
        cur = conn.execute(
            "INSERT INTO sessions (session_id, job_id, chain_id, client_address, model, "
            "price_per_token, encrypted, started_at, protocol, owner_pid) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                identity.session_id,
                _decimal_or_none(identity.job_id),
                identity.chain_id,
                identity.client_address,
                identity.model,
                str(identity.price_per_token),
                int(identity.encrypted),
                started_at,
                identity.protocol,
                os.getpid(),
            ),
        )
        uid = cur.lastrowid
        assert uid is not None
        return uid

    @staticmethod
    def _totals(conn: sqlite3.Connection, uid: int) -> RequestTotals:
        count, prompt, completion = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0) FROM requests WHERE session_uid = ?",
            (uid,),
        ).fetchone()
        return RequestTotals(int(count), int(prompt), int(completion))

    # -- writes --------------------------------------------------------------------

    def record_request(
        self,
        *,
        uid: int | None,
        identity: SessionIdentity,
        started_at: str,
        request: RequestUsage,
    ) -> int:
        """Commit one request row; creates the session row first when ``uid`` is None.
        Returns the session's ledger uid."""
        with self._locked("record the request") as conn, self._transaction(conn):
            if uid is None:
                uid = self._insert_session(conn, identity, started_at)
            elif conn.execute("SELECT 1 FROM receipts WHERE session_uid = ?", (uid,)).fetchone():
                raise LedgerError(f"session {identity.session_id} already has a receipt")
            conn.execute(
                "INSERT INTO requests (session_uid, session_id, job_id, request_id, model, "
                "prompt_tokens, completion_tokens, finish_reason, usage_estimated, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uid,
                    identity.session_id,
                    _decimal_or_none(identity.job_id),
                    request.request_id,
                    request.model,
                    request.prompt_tokens,
                    request.completion_tokens,
                    request.finish_reason,
                    int(request.usage_estimated),
                    request.created_at,
                ),
            )
        return uid

    def _write_receipt(
        self,
        conn: sqlite3.Connection,
        *,
        uid: int,
        identity: SessionIdentity,
        started_at: str,
        ended_at: str,
        end_reason: str,
        host_key: HostKey | None,
    ) -> SignedReceipt:
        totals = self._totals(conn, uid)
        if self.epoch is None:
            raise LedgerError(f"ledger {self._path} is open read-only")
        tail = conn.execute(
            "SELECT sequence, canonical_json FROM receipts ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        sequence, prev_hash = (1, None) if tail is None else (tail[0] + 1, receipt_hash(tail[1]))
        receipt = Receipt(
            sequence=int(sequence),
            session_id=identity.session_id,
            job_id=identity.job_id,
            chain_id=identity.chain_id,
            client_address=identity.client_address,
            host_address=None if host_key is None else host_key.address,
            model=identity.model,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            request_count=totals.count,
            price_per_token=identity.price_per_token,
            encrypted=identity.encrypted,
            started_at=started_at,
            ended_at=ended_at,
            end_reason=end_reason,
            protocol=identity.protocol,
            ledger_epoch=self.epoch,
            prev_hash=prev_hash,
        )
        signed = sign_receipt(receipt, host_key)
        conn.execute(
            "INSERT INTO receipts (sequence, session_uid, version, session_id, job_id, "
            "chain_id, client_address, host_address, model, prompt_tokens, "
            "completion_tokens, total_tokens, request_count, price_per_token, amount, "
            "encrypted, started_at, ended_at, end_reason, canonical_json, signature, signed, "
            "protocol, ledger_epoch, prev_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.sequence,
                uid,
                receipt.version,
                receipt.session_id,
                _decimal_or_none(receipt.job_id),
                receipt.chain_id,
                receipt.client_address,
                receipt.host_address,
                receipt.model,
                receipt.prompt_tokens,
                receipt.completion_tokens,
                receipt.total_tokens,
                receipt.request_count,
                str(receipt.price_per_token),
                str(receipt.amount),
                int(receipt.encrypted),
                receipt.started_at,
                receipt.ended_at,
                receipt.end_reason,
                receipt.canonical_json(),
                signed.signature_hex,
                int(signed.signed),
                receipt.protocol,
                receipt.ledger_epoch,
                receipt.prev_hash,
            ),
        )
        return signed

    def close_session(
        self,
        *,
        uid: int | None,
        identity: SessionIdentity,
        started_at: str,
        ended_at: str,
        end_reason: str,
        host_key: HostKey | None,
    ) -> tuple[int, SignedReceipt]:
        """Write the session's receipt (token counts summed from its request rows),
        signed when ``host_key`` is given. Returns (ledger uid, receipt)."""
        with self._locked("write the receipt") as conn, self._transaction(conn):
            if uid is None:
                uid = self._insert_session(conn, identity, started_at)
            elif conn.execute("SELECT 1 FROM receipts WHERE session_uid = ?", (uid,)).fetchone():
                raise LedgerError(f"session {identity.session_id} already has a receipt")
            signed = self._write_receipt(
                conn,
                uid=uid,
                identity=identity,
                started_at=started_at,
                ended_at=ended_at,
                end_reason=end_reason,
                host_key=host_key,
            )
        return uid, signed

    def recover_open_sessions(
        self, *, host_key: HostKey | None, owner_pid: int | None = None
    ) -> list[SignedReceipt]:
        """Receipts for sessions a previous process left open (it crashed or was killed).

        ``ended_at`` is the session's last recorded request (or its start): the last
        moment the ledger knows it was alive. ``owner_pid``: only the sessions that this
        (dead) process opened, for a multi-worker node whose other workers still run.
        """
        out: list[SignedReceipt] = []
        with self._locked("recover open sessions") as conn, self._transaction(conn):
            rows = conn.execute(
                "SELECT s.session_uid, s.session_id, s.job_id, s.chain_id, s.client_address, "
                "s.model, s.price_per_token, s.encrypted, s.started_at, s.protocol, "
                "(SELECT MAX(created_at) FROM requests r WHERE r.session_uid = s.session_uid) "
                "FROM sessions s LEFT JOIN receipts x ON x.session_uid = s.session_uid "
                "WHERE x.sequence IS NULL AND (? IS NULL OR s.owner_pid = ?) "
                "ORDER BY s.session_uid",
                (owner_pid, owner_pid),
            ).fetchall()
            for uid, sid, job, chain, client, model, price, enc, started, proto, last in rows:
                try:
                    identity = SessionIdentity(
                        session_id=sid,
                        job_id=None if job is None else int(job),
                        chain_id=chain,
                        client_address=client,
                        model=model,
                        price_per_token=int(price),
                        encrypted=bool(enc),
                        protocol=proto,
                    )
                except (TypeError, ValueError) as exc:
                    raise LedgerError(
                        f"ledger {self._path}: open session row {uid} is malformed ({exc}); "
                        "it cannot be turned into a receipt"
                    ) from None
                out.append(
                    self._write_receipt(
                        conn,
                        uid=uid,
                        identity=identity,
                        started_at=started,
                        ended_at=last or started,
                        end_reason=EndReason.RECOVERED.value,
                        host_key=host_key,
                    )
                )
        return out

    def probe(self, at: str) -> None:
        """A minimal committed write (``meta.last_probe_at``): can the ledger take writes?"""
        with self._locked("write a probe") as conn, self._transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_probe_at', ?)", (at,)
            )

    def record_submission(
        self,
        sequence: int,
        *,
        submitter: str,
        status: str,
        tx_hash: str | None,
        detail: str | None,
        updated_at: str,
    ) -> None:
        with self._locked("record the submission") as conn, self._transaction(conn):
            conn.execute(
                "INSERT INTO submissions (sequence, status, submitter, tx_hash, detail, "
                "attempts, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (sequence) DO UPDATE SET status = excluded.status, "
                "submitter = excluded.submitter, tx_hash = excluded.tx_hash, "
                "detail = excluded.detail, attempts = submissions.attempts + 1, "
                "updated_at = excluded.updated_at",
                (sequence, status, submitter, tx_hash, detail, updated_at),
            )

    # -- reads ---------------------------------------------------------------------

    _RECEIPT_SELECT = (
        "SELECT r.*, s.status AS submission_status FROM receipts r "
        "LEFT JOIN submissions s ON s.sequence = r.sequence "
    )

    def _stored(self, conn: sqlite3.Connection, row: sqlite3.Row) -> StoredReceipt:
        columns = dict(zip(row.keys(), tuple(row), strict=True))
        sequence = columns.pop("sequence")
        canonical = columns.pop("canonical_json")
        status = columns.pop("submission_status")
        uid = columns["session_uid"]
        return StoredReceipt(
            sequence=sequence,
            session_uid=uid,
            columns=columns,
            canonical_json=canonical,
            request_totals=self._totals(conn, uid),
            submission_status=status,
        )

    def _select(self, conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.row_factory = None

    def receipt(self, sequence: int) -> StoredReceipt | None:
        with self._locked("read the receipt") as conn:
            rows = self._select(conn, self._RECEIPT_SELECT + "WHERE r.sequence = ?", (sequence,))
            return self._stored(conn, rows[0]) if rows else None

    def receipts_page(self, *, after: int = 0, limit: int = 500) -> list[StoredReceipt]:
        with self._locked("read receipts") as conn:
            rows = self._select(
                conn,
                self._RECEIPT_SELECT + "WHERE r.sequence > ? ORDER BY r.sequence LIMIT ?",
                (after, limit),
            )
            return [self._stored(conn, row) for row in rows]

    def iter_receipts(self, *, batch: int = 500) -> Iterator[StoredReceipt]:
        """Every receipt in sequence order, read in pages (the lock is not held between)."""
        after = 0
        while page := self.receipts_page(after=after, limit=batch):
            yield from page
            after = page[-1].sequence

    def pending_submissions(self, *, limit: int = 100) -> list[SignedReceipt]:
        """Receipts never handed to a submitter, or whose last attempt failed."""
        with self._locked("read pending submissions") as conn:
            rows = self._select(
                conn,
                self._RECEIPT_SELECT + "WHERE s.sequence IS NULL OR s.status = 'failed' "
                "ORDER BY r.sequence LIMIT ?",
                (limit,),
            )
            stored = [self._stored(conn, row) for row in rows]
        return [s.signed_receipt() for s in stored]

    def requests_for(self, session_uid: int) -> list[RequestUsage]:
        with self._locked("read requests") as conn:
            rows = conn.execute(
                "SELECT request_id, model, prompt_tokens, completion_tokens, finish_reason, "
                "usage_estimated, created_at FROM requests WHERE session_uid = ? ORDER BY id",
                (session_uid,),
            ).fetchall()
        return [
            RequestUsage(
                request_id=rid,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                finish_reason=finish,
                usage_estimated=bool(estimated),
                created_at=created,
            )
            for rid, model, prompt, completion, finish, estimated, created in rows
        ]

    def submission(self, sequence: int) -> dict[str, Any] | None:
        with self._locked("read the submission") as conn:
            rows = self._select(conn, "SELECT * FROM submissions WHERE sequence = ?", (sequence,))
            return dict(zip(rows[0].keys(), tuple(rows[0]), strict=True)) if rows else None

    def epochs(self) -> list[EpochRow]:
        """Every node start recorded in the ledger (none in ledgers before the chain)."""
        with self._locked("read the epochs") as conn:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'epochs'"
            ).fetchone():
                return []
            rows = conn.execute(
                "SELECT epoch, started_at, after_sequence, after_hash FROM epochs ORDER BY rowid"
            ).fetchall()
        return [EpochRow(str(e), str(t), int(n), h) for e, t, n, h in rows]

    def sessions_without_receipt(self) -> int:
        """Sessions with recorded requests but no receipt: open in a running node, left
        by a crash (the next start writes their receipts), or their receipts removed."""
        with self._locked("count open sessions") as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM sessions s LEFT JOIN receipts r "
                "ON r.session_uid = s.session_uid WHERE r.sequence IS NULL"
            ).fetchone()
        return int(count)

    def pragma(self, name: str) -> Any:
        if not name.isidentifier():
            raise ValueError("not a pragma name")
        with self._locked("read a pragma") as conn:
            return conn.execute(f"PRAGMA {name}").fetchone()[0]

    def integrity_check(self) -> str:
        """``ok`` when SQLite finds nothing wrong; otherwise its first complaint."""
        return str(self.pragma("integrity_check"))


class _PendingWrite:
    """One write waiting for its batch's COMMIT."""

    __slots__ = ("done", "fn", "ok", "value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = False
        self.ok = False
        self.value: Any = None

    def finish(self, outcome: tuple[bool, Any]) -> None:
        self.ok, self.value = outcome
        self.done = True

    def result(self) -> Any:
        if not self.ok:
            raise self.value
        return self.value


class Ledger:
    """The server's handle on the ledger (Trio). Build it with :meth:`open`.

    Wiring in the per-connection driver::

        usage = ledger.start_session(identity)            # after a successful init
        ...
        await ledger.record_request(usage, request_id=msg_id, prompt_tokens=p,
                                    completion_tokens=c, finish_reason=reason)
        await send(stream_end)                            # only after the commit
        ...
        finally:
            await ledger.close_session(usage, end_reason)  # shielded internally
    """

    def __init__(
        self,
        store: LedgerStore,
        *,
        host_key: HostKey | None = None,
        wall_clock: Callable[[], float] = time.time,
        offload: bool = True,
    ) -> None:
        self.store = store
        self._host_key = host_key
        self._wall_clock = wall_clock
        self._offload = offload
        self._pending: list[_PendingWrite] = []
        self._writing = False
        self._batch_finished = trio.Event()
        self.recovered: list[SignedReceipt] = []

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        host_key: HostKey | None = None,
        wall_clock: Callable[[], float] = time.time,
        recover: bool = True,
        offload: bool = True,
    ) -> Ledger:
        """Open the ledger before the server listens; raises :class:`LedgerError`.

        ``host_key`` signs receipts (``None``: plaintext-only node, unsigned receipts).
        ``recover`` writes receipts for sessions a previous process left open (listed in
        :attr:`recovered`) and starts a new ledger epoch. ``offload=False`` runs writes on
        the event loop thread instead of a worker thread: for tests that use Trio's
        autojumping ``MockClock``, whose clock would otherwise jump while the loop waits
        for the worker.
        """
        # The process that recovers is the one that starts the node: it begins a new
        # epoch; workers (recover=False) sign under that same epoch.
        store = LedgerStore.open(path, wall_clock=wall_clock, new_epoch=recover)
        ledger = cls(store, host_key=host_key, wall_clock=wall_clock, offload=offload)
        if recover:
            try:
                ledger.recovered = store.recover_open_sessions(host_key=host_key)
            except BaseException:
                store.close()
                raise
        return ledger

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def host_address(self) -> str | None:
        return None if self._host_key is None else self._host_key.address

    def close(self) -> None:
        """Close the database. Call after every connection's scope has finished."""
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run one write and return when it is committed (group commit).

        Writes that arrive while a batch is being committed wait and then go together in
        the next batch: one transaction and one fsync for all of them, instead of one
        each (with ``synchronous=FULL`` the fsync is what limits writes per second).
        Whichever waiting caller finds no batch running commits the next one.
        Shielded: a write that has been asked for completes and commits even while the
        caller's scope is cancelled; the worker thread is never abandoned.
        """
        slot = _PendingWrite(fn)
        with trio.CancelScope(shield=True):
            self._pending.append(slot)
            while not slot.done:
                if self._writing:
                    await self._batch_finished.wait()
                    continue
                await self._commit_pending()
        return slot.result()  # type: ignore[no-any-return]

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        self._writing = True
        try:
            writes = [item.fn for item in batch]
            try:
                if self._offload:
                    results = await trio.to_thread.run_sync(self.store.run_batch, writes)
                else:
                    results = self.store.run_batch(writes)
            except Exception as exc:  # the COMMIT failed: nothing in the batch is durable
                results = [(False, exc)] * len(batch)
            for item, outcome in zip(batch, results, strict=True):
                item.finish(outcome)
        finally:
            self._writing = False
            finished, self._batch_finished = self._batch_finished, trio.Event()
            finished.set()

    def start_session(self, identity: SessionIdentity) -> SessionUsage:
        """Begin accounting for a session (no I/O; its row is written with its first
        request or its receipt). Call once per successful init."""
        return SessionUsage(identity=identity, started_at=format_timestamp(self._wall_clock()))

    async def record_request(
        self,
        usage: SessionUsage,
        *,
        request_id: object,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
        usage_estimated: bool = False,
        model: str | None = None,
    ) -> RequestUsage:
        """Commit one completed request's exact token counts, then add them to
        ``usage``. Await this before sending ``stream_end``. ``request_id`` is the
        envelope ``id`` (any JSON value, stored as text); ``model`` defaults to the
        session's."""
        check_uint("prompt_tokens", prompt_tokens, limit=MAX_TOKENS)
        check_uint("completion_tokens", completion_tokens, limit=MAX_TOKENS)
        check_text("finish_reason", finish_reason, limit=64)
        if not isinstance(usage_estimated, bool):
            raise TypeError("usage_estimated must be a bool")
        request = RequestUsage(
            request_id=_request_id_text(request_id),
            model=check_text("model", model) if model is not None else usage.identity.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            usage_estimated=usage_estimated,
            created_at=format_timestamp(self._wall_clock()),
        )

        def write() -> None:
            if usage.closed:
                raise LedgerError(f"session {usage.identity.session_id} is already closed")
            usage.ledger_uid = self.store.record_request(
                uid=usage.ledger_uid,
                identity=usage.identity,
                started_at=usage.started_at,
                request=request,
            )

        await self._run(write)
        usage.add(prompt_tokens, completion_tokens)
        return request

    async def close_session(self, usage: SessionUsage, end_reason: str) -> SignedReceipt:
        """Write the session's one receipt and return it. Idempotent: a second call
        returns the same receipt. Safe to await in a ``finally`` of a cancelled scope."""
        check_text("end_reason", end_reason, limit=64)
        ended_at = format_timestamp(self._wall_clock())

        def write() -> SignedReceipt:
            if usage.receipt is not None:
                return usage.receipt
            uid, signed = self.store.close_session(
                uid=usage.ledger_uid,
                identity=usage.identity,
                started_at=usage.started_at,
                ended_at=ended_at,
                end_reason=str(end_reason),
                host_key=self._host_key,
            )
            usage.ledger_uid = uid
            usage.receipt = signed
            return signed

        return await self._run(write)

    async def probe(self) -> None:
        """Commit one tiny write; raises :class:`LedgerError` when the ledger refuses it."""
        at = format_timestamp(self._wall_clock())
        await self._run(lambda: self.store.probe(at))

    async def pending_submissions(self, *, limit: int = 100) -> list[SignedReceipt]:
        return await self._run(lambda: self.store.pending_submissions(limit=limit))

    async def record_submission(
        self,
        sequence: int,
        *,
        submitter: str,
        status: str,
        tx_hash: str | None = None,
        detail: str | None = None,
    ) -> None:
        updated_at = format_timestamp(self._wall_clock())
        await self._run(
            lambda: self.store.record_submission(
                sequence,
                submitter=submitter,
                status=status,
                tx_hash=tx_hash,
                detail=detail,
                updated_at=updated_at,
            )
        )
