"""The ledger's SQLite schema and its versioned migrations.

The schema version lives in ``PRAGMA user_version`` (0 for a new file). ``MIGRATIONS[i]``
takes a database from version ``i`` to ``i + 1``; :func:`migrate` applies the missing
steps in order, each in its own ``BEGIN IMMEDIATE`` transaction together with the new
``user_version``, so a crash mid-upgrade leaves the previous version intact. Steps are
append-only: never edit a released step, add a new one.

Decimal TEXT columns hold values that may not fit SQLite's signed 64-bit INTEGER
(uint256 prices, job ids and amounts).
"""

from __future__ import annotations

import sqlite3

from node.settlement.errors import LedgerError

_V1 = (
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    # One row per session the ledger has seen; the receipt row closes it.
    """CREATE TABLE sessions (
        session_uid INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        job_id TEXT,
        chain_id INTEGER NOT NULL,
        client_address TEXT,
        model TEXT NOT NULL,
        price_per_token TEXT NOT NULL,
        encrypted INTEGER NOT NULL CHECK (encrypted IN (0, 1)),
        started_at TEXT NOT NULL
    )""",
    # One row per completed request, committed before its stream_end is sent.
    """CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        session_uid INTEGER NOT NULL REFERENCES sessions (session_uid),
        session_id TEXT NOT NULL,
        job_id TEXT,
        request_id TEXT,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
        finish_reason TEXT NOT NULL,
        usage_estimated INTEGER NOT NULL CHECK (usage_estimated IN (0, 1)),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX requests_by_session ON requests (session_uid)",
    # One row per ended session. canonical_json is the exact signed text; the columns
    # repeat its fields for queries, and `receipts verify` checks that they agree.
    """CREATE TABLE receipts (
        sequence INTEGER PRIMARY KEY,
        session_uid INTEGER NOT NULL UNIQUE REFERENCES sessions (session_uid),
        version INTEGER NOT NULL,
        session_id TEXT NOT NULL,
        job_id TEXT,
        chain_id INTEGER NOT NULL,
        client_address TEXT,
        host_address TEXT,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        request_count INTEGER NOT NULL,
        price_per_token TEXT NOT NULL,
        amount TEXT NOT NULL,
        encrypted INTEGER NOT NULL CHECK (encrypted IN (0, 1)),
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        end_reason TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        signature TEXT,
        signed INTEGER NOT NULL CHECK (signed IN (0, 1))
    )""",
)

_V2 = (
    # Settlement state per receipt: absent = not yet handed to a submitter.
    """CREATE TABLE submissions (
        sequence INTEGER PRIMARY KEY REFERENCES receipts (sequence),
        status TEXT NOT NULL,
        submitter TEXT NOT NULL,
        tx_hash TEXT,
        detail TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX submissions_by_status ON submissions (status)",
)

_V3 = (
    # The wire protocol a session came over ("v1" or "v2"); receipts of v2 sessions
    # carry it in their signed text, v1 receipts leave it out (so they stay as they were).
    "ALTER TABLE sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'v1'",
    "ALTER TABLE receipts ADD COLUMN protocol TEXT NOT NULL DEFAULT 'v1'",
)

_V4 = (
    # The process that opened the session: when one worker of a multi-worker node dies,
    # the parent writes receipts for that worker's open sessions only.
    "ALTER TABLE sessions ADD COLUMN owner_pid INTEGER",
)

_V5 = (
    # The hash chain (receipt version 2). Older rows keep NULL here: they are version 1
    # receipts and verify as before.
    "ALTER TABLE receipts ADD COLUMN ledger_epoch TEXT",
    "ALTER TABLE receipts ADD COLUMN prev_hash TEXT",
    # One row per node start that opened the ledger for writing: a new random epoch, and
    # the tail it found (sequence and receipt hash). A ledger whose last receipt is below
    # the tail an epoch started after has lost receipts at its end.
    """CREATE TABLE epochs (
        epoch TEXT PRIMARY KEY,
        started_at TEXT NOT NULL,
        after_sequence INTEGER NOT NULL,
        after_hash TEXT
    )""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4, _V5)
#: Tables every ledger has from schema version 1 on (what `receipts` checks for).
LEDGER_TABLES = frozenset({"meta", "sessions", "requests", "receipts"})
LATEST_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, *, target: int = LATEST_VERSION) -> int:
    """Bring the database up to ``target``; returns the version it ends at.

    ``conn`` must be in autocommit mode (``isolation_level=None``): this function opens
    its own transactions. A database newer than this code raises :class:`LedgerError`.
    """
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"no schema version {target}")
    current = schema_version(conn)
    if current > LATEST_VERSION:
        raise LedgerError(
            f"ledger schema version {current} is newer than this node understands "
            f"({LATEST_VERSION}); upgrade llm-node"
        )
    for version in range(current + 1, target + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have upgraded between our read and our lock.
            if schema_version(conn) >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return schema_version(conn)
