"""An init replay cache shared by every worker process of a node, and across restarts.

The in-memory :class:`~node.protocol.replay.InitReplayCache` protects one process for as
long as it runs. With ``--workers N`` an init replayed to another worker, or to the same
node after a restart, would find an empty cache. This one keeps the same 32-byte digests
in a small SQLite file beside the ledger (WAL, ``synchronous=NORMAL``: no fsync per insert,
so an init costs tens of microseconds more; a power cut may lose the last moments of it,
a crash of the process does not). Inserts are atomic across processes: of two workers
that see the same init, exactly one succeeds. Times are wall-clock seconds, because
monotonic clocks are per process.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

PURGE_EVERY_S = 1.0


class SharedReplayCacheError(Exception):
    """The replay cache file cannot be opened (raised at start-up)."""


class SqliteReplayCache:
    """Same contract as InitReplayCache: ``add`` is False for a replay or when full."""

    def __init__(
        self,
        path: str | Path,
        *,
        window_s: float,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
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
            conn.execute(
                "CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, at REAL NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS seen_at ON seen (at)")
        except (OSError, sqlite3.Error) as exc:
            raise SharedReplayCacheError(
                f"cannot open the replay cache {self.path}: {exc}"
            ) from None
        self._conn = conn
        self._purged_at = float("-inf")
        self._count = 0
        self._purge(self._clock())

    def _purge(self, now: float) -> None:
        self._conn.execute("DELETE FROM seen WHERE at <= ?", (now - self.window_s,))
        (self._count,) = self._conn.execute("SELECT COUNT(*) FROM seen").fetchone()
        self._purged_at = now

    def has_room(self) -> bool:
        now = self._clock()
        if now - self._purged_at >= PURGE_EVERY_S or self._count >= self.max_entries:
            self._purge(now)
        return self._count < self.max_entries

    def add(self, key: bytes) -> bool:
        now = self._clock()
        if not self.has_room():
            return False
        digest = hashlib.sha256(key).digest()
        cur = self._conn.execute(
            "INSERT INTO seen (digest, at) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE "
            "SET at = excluded.at WHERE seen.at <= ?",
            (digest, now, now - self.window_s),
        )
        if cur.rowcount != 1:
            return False  # seen inside the window, here or in another worker
        self._count += 1
        return True

    def close(self) -> None:
        self._conn.close()
