#!/usr/bin/env python3
"""Per-init cost of the shared replay cache at a million entries, before and after.

The cache (``node/server/shared_replay.py``) runs on the event loop for every encrypted
init: ``has_room()`` then ``add()``. Before, it kept its count by ``DELETE`` of expired
rows plus ``SELECT COUNT(*)`` at least once a second and on *every* call once the cache
was full (6-7 ms per init at 1,000,000 rows in the outside review). Now two triggers keep
the count in a one-row table and expired rows go in bounded batches.

"before" is that earlier algorithm, reproduced here (class ``LegacyCache``, the same
statements) on the same file; "after" is ``SqliteReplayCache`` as shipped.

Scenarios, each over ``--inits`` inits on a file of ``--rows`` live entries:

- ``full``: ``max_entries`` equals the rows (the cache is full of live entries, so every
  init is refused for lack of room; the review's case);
- ``steady``: room to spare, the clock advancing 1/441 s per init (the review's rate),
  so the earlier code purged and counted once a simulated second;
- ``expiring``: as steady, but a tenth of the rows fall out of the window at once.

An encrypted init records two entries (its digest and the session key's fingerprint).
The second table times that, in the steady scenario: ``two calls`` is ``has_room()`` +
``add()`` twice (two commits, as the node did before ``add_all``), ``add_all`` is one
transaction for both (as it does now). The two run in alternating order on fresh copies
of the same file (A B B A), and the ratio is of the medians of all their inits.

    .venv/bin/python scripts/bench_replay.py [--rows 1000000] [--inits 3000] [--json PATH]

Prints a table of per-init microseconds (median, p99, max) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.server.shared_replay import SqliteReplayCache  # noqa: E402

WINDOW_S = 86_400.0
RATE = 441.0
START = 1_800_000_000.0


class Cache(Protocol):
    def has_room(self) -> bool: ...

    def add(self, key: bytes) -> bool: ...

    def close(self) -> None: ...


class LegacyCache:
    """The algorithm before this change (same SQL), for the "before" column."""

    PURGE_EVERY_S = 1.0

    def __init__(
        self, path: Path, *, window_s: float, max_entries: int, clock: Callable[[], float]
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._purged_at = float("-inf")
        self._count = 0
        self._purge(clock())

    def _purge(self, now: float) -> None:
        self._conn.execute("DELETE FROM seen WHERE at <= ?", (now - self.window_s,))
        (self._count,) = self._conn.execute("SELECT COUNT(*) FROM seen").fetchone()
        self._purged_at = now

    def has_room(self) -> bool:
        now = self._clock()
        if now - self._purged_at >= self.PURGE_EVERY_S or self._count >= self.max_entries:
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
            return False
        self._count += 1
        return True

    def close(self) -> None:
        self._conn.close()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def build(path: Path, rows: int, *, expiring_fraction: float = 0.0) -> None:
    """A cache file with ``rows`` entries; ``expiring_fraction`` of them at the very start
    of the window (they expire with the first tick of the clock)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY, at REAL NOT NULL)")
    conn.execute("CREATE INDEX seen_at ON seen (at)")
    old = int(rows * expiring_fraction)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO seen VALUES (?, ?)",
        (
            (
                hashlib.sha256(b"row%d" % i).digest(),
                START - WINDOW_S if i < old else START - WINDOW_S + 1 + (i % 80_000),
            )
            for i in range(rows)
        ),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def run(
    cache_of: Callable[..., Cache], path: Path, rows: int, inits: int, full: bool
) -> dict[str, Any]:
    clock = Clock()
    opened = time.perf_counter()
    cache = cache_of(path, window_s=WINDOW_S, max_entries=rows if full else rows * 2, clock=clock)
    open_ms = (time.perf_counter() - opened) * 1e3
    times: list[float] = []
    accepted = 0
    try:
        for i in range(inits):
            clock.now += 1 / RATE
            key = os.urandom(32) + i.to_bytes(4, "big")
            started = time.perf_counter()
            if cache.has_room() and cache.add(key):
                accepted += 1
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        cache.close()
    times.sort()
    return {
        "open_ms": round(open_ms, 1),
        "median_us": round(statistics.median(times), 1),
        "p99_us": round(times[int(len(times) * 0.99) - 1], 1),
        "max_us": round(times[-1], 1),
        "mean_us": round(statistics.fmean(times), 1),
        "accepted": accepted,
    }


def two_calls(cache: SqliteReplayCache, keys: tuple[bytes, bytes]) -> bool:
    init, key = keys
    return cache.has_room() and cache.add(init) and cache.has_room() and cache.add(key)


def add_all(cache: SqliteReplayCache, keys: tuple[bytes, bytes]) -> bool:
    return cache.add_all(keys) is None


def run_pairs(
    record: Callable[[SqliteReplayCache, tuple[bytes, bytes]], bool],
    path: Path,
    rows: int,
    inits: int,
) -> list[float]:
    clock = Clock()
    cache = SqliteReplayCache(path, window_s=WINDOW_S, max_entries=rows * 2, clock=clock)
    times: list[float] = []
    try:
        for i in range(inits):
            clock.now += 1 / RATE
            keys = (os.urandom(32) + i.to_bytes(4, "big"), b"session-key|" + os.urandom(32))
            started = time.perf_counter()
            if not record(cache, keys):
                raise RuntimeError("an init pair was refused")
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        cache.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--inits", type=int, default=3_000)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "rows": args.rows,
        "inits": args.inits,
        "rate_per_s": RATE,
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "scenarios": {},
    }
    impls: dict[str, Callable[..., Cache]] = {"before": LegacyCache, "after": SqliteReplayCache}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario, full, expiring in (
            ("full", True, 0.0),
            ("steady", False, 0.0),
            ("expiring", False, 0.1),
        ):
            template = Path(tmp) / f"{scenario}.sqlite3"
            build(template, args.rows, expiring_fraction=expiring)
            for name, impl in impls.items():
                path = Path(tmp) / f"{scenario}-{name}.sqlite3"
                shutil.copyfile(template, path)
                figures = run(impl, path, args.rows, args.inits, full)
                results["scenarios"].setdefault(scenario, {})[name] = figures
                for suffix in ("", "-wal", "-shm"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
            template.unlink()
        template = Path(tmp) / "pairs.sqlite3"
        build(template, args.rows)
        pair_times: dict[str, list[float]] = {"two calls": [], "add_all": []}
        for name in ("two calls", "add_all", "add_all", "two calls"):
            path = Path(tmp) / "pairs-run.sqlite3"
            shutil.copyfile(template, path)
            record = two_calls if name == "two calls" else add_all
            pair_times[name] += run_pairs(record, path, args.rows, args.inits)
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    pairs: dict[str, dict[str, float]] = {}
    for name, times in pair_times.items():
        times.sort()
        pairs[name] = {
            "median_us": round(statistics.median(times), 1),
            "p99_us": round(times[int(len(times) * 0.99) - 1], 1),
            "mean_us": round(statistics.fmean(times), 1),
        }
    results["init_pairs"] = pairs
    results["init_pairs_ratio"] = round(
        pairs["add_all"]["median_us"] / pairs["two calls"]["median_us"], 3
    )
    print(f"replay cache, {args.rows:,} entries, {args.inits:,} inits per run (us per init)")
    print(
        f"{'scenario':<10} {'impl':<7} {'median':>9} {'p99':>9} {'max':>10} {'mean':>9} "
        f"{'open ms':>8} {'accepted':>8}"
    )
    for scenario, by_impl in results["scenarios"].items():
        for name, f in by_impl.items():
            print(
                f"{scenario:<10} {name:<7} {f['median_us']:>9} {f['p99_us']:>9} "
                f"{f['max_us']:>10} {f['mean_us']:>9} {f['open_ms']:>8} {f['accepted']:>8}"
            )
    print(f"\nan init's two entries, steady scenario, {2 * args.inits:,} inits each (us per init)")
    print(f"{'impl':<10} {'median':>9} {'p99':>9} {'mean':>9}")
    for name, f in pairs.items():
        print(f"{name:<10} {f['median_us']:>9} {f['p99_us']:>9} {f['mean_us']:>9}")
    print(f"add_all / two calls (medians): {results['init_pairs_ratio']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
