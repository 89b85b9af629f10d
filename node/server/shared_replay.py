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

Copying the WAL back into the file (a checkpoint, with its fsyncs: milliseconds) is not
left to the init that happens to fill the WAL. :func:`checkpoint_loop`, which the node
runs, does it every :data:`CHECKPOINT_INTERVAL_S` from a worker thread on a connection of
its own (``PASSIVE``: it never waits for a worker's write, and no write waits for it), so
an init pays for its own commit only. The init connection still checkpoints by itself
once the WAL holds :data:`BACKSTOP_CHECKPOINT_PAGES` pages (a cache used without the
loop, or a loop that fell behind), which bounds the WAL file. What is durable when is
unchanged: an entry is in the WAL, in the operating system's hands, before ``add_all``
returns.

A failed read or write (disk full, file removed, I/O error) raises
:class:`~node.crypto.errors.StorageUnavailable` (wire code ``STORAGE_UNAVAILABLE``) and is
reported to the node's :class:`~node.protocol.storage.StorageHealth`: the init is refused
with that code, the connection stays open, and the next init tries again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import trio

from node.crypto.errors import ErrorCode, StorageUnavailable
from node.protocol.replay import DEFAULT_MAX_ENTRIES, NO_ROOM, Refusal
from node.protocol.storage import REPLAY_CACHE, StorageHealth

#: Expired entries deleted per call on the init path (bounded work per init).
PURGE_BATCH = 4
#: Expired entries deleted per call when the cache looks full, before refusing.
FULL_PURGE_BATCH = 256
#: Expired entries deleted when the file is opened (start-up, off the init path).
OPEN_PURGE_BATCH = 100_000
#: Seconds between two checkpoints of :func:`checkpoint_loop` (off the init path).
CHECKPOINT_INTERVAL_S = 0.5
#: WAL pages (4 KiB each) after which the init connection checkpoints by itself; SQLite's
#: default is 1,000 (an init writes about 5 pages, so one init in 200 paid for it).
BACKSTOP_CHECKPOINT_PAGES = 10_000

log = logging.getLogger("node.server")

_INSERT = (
    "INSERT INTO seen (digest, at) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE "
    "SET at = excluded.at WHERE seen.at <= ?"
)
# An entry inside the window (what _INSERT will not overwrite).
_LIVE = "SELECT 1 FROM seen WHERE digest = ? AND at > ?"
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
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
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
        self._checkpoint_conn: sqlite3.Connection | None = None
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
                    # A replay is called a replay, full cache or not.
                    refusal = self._replayed(digests, cutoff) or NO_ROOM
                    conn.execute("COMMIT")  # keep what was purged
                    return refusal
            for i, digest in enumerate(digests):
                if conn.execute(_INSERT, (digest, now, cutoff)).rowcount != 1:
                    conn.execute("ROLLBACK")
                    return Refusal(ErrorCode.REPLAY_DETECTED, i)
            conn.execute("COMMIT")
            return None

    def _replayed(self, digests: Sequence[bytes], cutoff: float) -> Refusal | None:
        """Which of ``digests`` (none recorded by this call) is a live entry or given
        twice, as add_all would have found it; read only."""
        for i, digest in enumerate(digests):
            if digest in digests[:i] or self._conn.execute(_LIVE, (digest, cutoff)).fetchone():
                return Refusal(ErrorCode.REPLAY_DETECTED, i)
        return None

    def checkpoint(self) -> tuple[int, int]:
        """Copy what the WAL holds back into the file (``PASSIVE``); returns the WAL's
        frames and how many of them are now in the file.

        Runs in a worker thread (see :func:`checkpoint_loop`), on a connection of its own
        that only this method uses, one call at a time; the init path's connection is not
        touched, so an init never waits for it. Raises ``sqlite3.Error`` when it fails.
        """
        conn = self._checkpoint_conn
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            self._checkpoint_conn = conn
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1]), int(row[2])

    def close(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None
        self._conn.close()


async def checkpoint_loop(
    cache: SqliteReplayCache,
    *,
    interval_s: float = CHECKPOINT_INTERVAL_S,
    run_sync: Callable[[Callable[[], tuple[int, int]]], Awaitable[tuple[int, int]]] | None = None,
) -> None:
    """Checkpoint ``cache`` every ``interval_s`` seconds in a worker thread (``run_sync``,
    by default ``trio.to_thread.run_sync``), until cancelled.

    A failed checkpoint is logged once (and once more when they work again); it loses
    nothing, since every entry is already in the WAL, and the init path reports a file
    that refuses writes by itself.
    """
    runner = run_sync if run_sync is not None else trio.to_thread.run_sync
    failing = False
    while True:
        await trio.sleep(interval_s)
        try:
            await runner(cache.checkpoint)
        except sqlite3.Error as exc:
            if not failing:
                log.warning(
                    "replay cache checkpoint failed", extra={"error_type": type(exc).__name__}
                )
            failing = True
        else:
            if failing:
                log.warning("replay cache checkpoints work again")
            failing = False
