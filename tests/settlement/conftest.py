"""Fixtures for the settlement tests: a fixed host key, a fake wall clock, ledgers."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from node.crypto.hostkey import HostKey
from node.settlement import Ledger, SessionIdentity

HOST_KEY_HEX = "0x" + "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
CLIENT_ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


class FakeWallClock:
    """Unix time that advances by ``step`` seconds on every reading."""

    def __init__(self, start: float = 1_750_000_000.0, step: float = 0.25) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection to a ledger file (autocommit), always closed."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def host_key() -> Iterator[HostKey]:
    key = HostKey.parse(HOST_KEY_HEX)
    yield key
    key.wipe()


@pytest.fixture
def wall_clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.sqlite3"


@pytest.fixture
def ledger(ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock) -> Iterator[Ledger]:
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as opened:
        yield opened


@pytest.fixture
def plain_ledger(ledger_path: Path, wall_clock: FakeWallClock) -> Iterator[Ledger]:
    with Ledger.open(ledger_path, host_key=None, wall_clock=wall_clock) as opened:
        yield opened


def encrypted_identity(
    session_id: str = "42",
    *,
    job_id: int | None = 42,
    price: int = 5,
    model: str = "smollm2-135m",
) -> SessionIdentity:
    return SessionIdentity(
        session_id=session_id,
        job_id=job_id,
        chain_id=84532,
        client_address=CLIENT_ADDRESS,
        model=model,
        price_per_token=price,
        encrypted=True,
    )


def plaintext_identity(session_id: str = "7", *, job_id: int | None = 7) -> SessionIdentity:
    return SessionIdentity(
        session_id=session_id,
        job_id=job_id,
        chain_id=84532,
        client_address=None,
        model="smollm2-135m",
        price_per_token=0,
        encrypted=False,
    )
