"""An init replay cache shared by every worker process of a node, and across restarts.

The in-memory :class:`~node.protocol.replay.InitReplayCache` protects one process for as
long as it runs. With ``--workers N`` an init replayed to another worker, or to the same
node after a restart, would find an empty cache. This one keeps the same 32-byte digests
in a small SQLite file beside the ledger (WAL, ``synchronous=NORMAL``: no fsync per insert,
so an init costs tens of microseconds more; a power cut may lose the last moments of it,
a crash of the process does not). Inserts are atomic across processes: of two workers
that see the same init, exactly one succeeds. An encrypted init records its two entries
with :meth:`SqliteReplayCache.add_all`: one transaction and one commit, and either both
entries are recorded or neither. Times are wall-clock seconds, because
monotonic clocks are per process.

Cost per init stays flat however large the cache is. The number of entries is kept by
two triggers in a one-row table (shared by every worker, exact), so checking for room is
one row read instead of a ``COUNT(*)`` over the table; expired entries are deleted a
bounded batch at a time (:data:`PURGE_BATCH` per call, by the ``at`` index), which
outpaces the inserts, and a larger batch runs only when the cache looks full.

A failed read or write (disk full, file removed, I/O error) raises
:class:`~node.crypto.errors.StorageUnavailable` (wire code ``STORAGE_UNAVAILABLE``) and is
reported to the node's :class:`~node.protocol.storage.StorageHealth`: the init is refused
with that code, the connection stays open, and the next init tries again.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from node.crypto.errors import ErrorCode, StorageUnavailable
from node.protocol.replay import DEFAULT_MAX_ENTRIES, NO_ROOM, Refusal
from node.protocol.storage import REPLAY_CACHE, StorageHealth

#: Expired entries deleted per call on the init path (bounded work per init).
PURGE_BATCH = 4
#: Expired entries deleted per call when the cache looks full, before refusing.
FULL_PURGE_BATCH = 256
#: Expired entries deleted when the file is opened (start-up, off the init path).
OPEN_PURGE_BATCH = 100_000

_INSERT = (
    "INSERT INTO seen (digest, at) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE "
    "SET at = excluded.at WHERE seen.at <= ?"
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS seen_at ON seen (at)",
    "CREATE TABLE IF NOT EXISTS seen_count "
    "(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)",
)
_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen "
    "BEGIN UPDATE seen_count SET n = n + 1 WHERE id = 0; END",
    "CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen "
    "BEGIN UPDATE seen_count SET n = n - 1 WHERE id = 0; END",
)


class SharedReplayCacheError(Exception):
    """The replay cache file cannot be opened (raised at start-up)."""


class SqliteReplayCache:
    """Same contract as InitReplayCache: ``add`` is False for a replay or when full."""

    def __init__(
        self,
        path: str | Path,
        *,
        window_s: float,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        health: StorageHealth | None = None,
    ) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self.health = health
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner-only, whatever the umask: SQLite gives the -wal and -shm files the
            # mode of the database file.
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            # A file from before the counter: count once, here at start-up, in the same
            # transaction that creates the triggers which keep the count from then on.
            conn.execute("INSERT OR IGNORE INTO seen_count (id, n) SELECT 0, COUNT(*) FROM seen")
            for statement in _TRIGGERS:
                conn.execute(statement)
            conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            raise SharedReplayCacheError(
                f"cannot open the replay cache {self.path}: {exc}"
            ) from None
        self._conn = conn
        with self._storage():
            self._purge(self._clock(), OPEN_PURGE_BATCH)

    @contextmanager
    def _storage(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error:
            if self.conn_in_transaction():
                with suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            if self.health is not None:
                self.health.failed(REPLAY_CACHE)
            raise StorageUnavailable(
                "the node cannot record session inits right now (its replay cache "
                "refuses writes); retry later"
            ) from None
        if self.health is not None:
            self.health.recovered(REPLAY_CACHE)

    def conn_in_transaction(self) -> bool:
        return self._conn.in_transaction

    def __len__(self) -> int:
        """Entries held, expired ones not yet deleted included."""
        (count,) = self._conn.execute("SELECT n FROM seen_count WHERE id = 0").fetchone()
        return int(count)

    def _purge(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` expired entries, oldest first; returns how many."""
        cur = self._conn.execute(
            "DELETE FROM seen WHERE rowid IN "
            "(SELECT rowid FROM seen WHERE at <= ? ORDER BY at LIMIT ?)",
            (now - self.window_s, limit),
        )
        return cur.rowcount

    def _has_room(self, now: float) -> bool:
        self._purge(now, PURGE_BATCH)
        if len(self) < self.max_entries:
            return True
        self._purge(now, FULL_PURGE_BATCH)
        return len(self) < self.max_entries

    def has_room(self) -> bool:
        with self._storage():
            return self._has_room(self._clock())

    def add(self, key: bytes) -> bool:
        now = self._clock()
        digest = hashlib.sha256(key).digest()
        with self._storage():
            if len(self) >= self.max_entries and not self._has_room(now):
                return False
            cur = self._conn.execute(_INSERT, (digest, now, now - self.window_s))
            # seen inside the window, here or in another worker: nothing changed
            return cur.rowcount == 1

    def add_all(self, keys: Sequence[bytes]) -> Refusal | None:
        """Record every key or none, in one transaction (one commit) across workers.

        ``BEGIN IMMEDIATE`` takes the file's write lock first, so the room check and the
        inserts of every key see no other worker's writes in between; a key already
        recorded rolls the whole call back.
        """
        now = self._clock()
        cutoff = now - self.window_s
        digests = [hashlib.sha256(key).digest() for key in keys]
        conn = self._conn
        with self._storage():
            conn.execute("BEGIN IMMEDIATE")
            self._purge(now, PURGE_BATCH)
            if len(self) + len(digests) > self.max_entries:
                self._purge(now, FULL_PURGE_BATCH)
                if len(self) + len(digests) > self.max_entries:
                    conn.execute("COMMIT")  # keep what was purged
                    return NO_ROOM
            for i, digest in enumerate(digests):
                if conn.execute(_INSERT, (digest, now, cutoff)).rowcount != 1:
                    conn.execute("ROLLBACK")
                    return Refusal(ErrorCode.REPLAY_DETECTED, i)
            conn.execute("COMMIT")
            return None

    def close(self) -> None:
        self._conn.close()
