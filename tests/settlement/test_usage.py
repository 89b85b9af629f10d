"""Session identity validation, the usage accumulator, timestamps and the default path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.settlement import SessionIdentity, SessionUsage, default_ledger_path, format_timestamp
from tests.settlement.conftest import CLIENT_ADDRESS, encrypted_identity, plaintext_identity


def _identity(**changes: Any) -> SessionIdentity:
    fields: dict[str, Any] = {
        "session_id": "1",
        "job_id": 1,
        "chain_id": 84532,
        "client_address": CLIENT_ADDRESS,
        "model": "m",
        "price_per_token": 1,
        "encrypted": True,
    }
    fields.update(changes)
    return SessionIdentity(**fields)


def test_valid_identities_keep_their_fields() -> None:
    enc = encrypted_identity(job_id=2**256 - 1, price=2**256 - 1)
    assert enc.job_id == 2**256 - 1
    assert enc.price_per_token == 2**256 - 1
    plain = plaintext_identity(job_id=None)
    assert plain.client_address is None
    assert plain.price_per_token == 0
    assert plain.job_id is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_address": None}, "needs the client address"),
        ({"encrypted": False}, "no authenticated client address"),
        ({"encrypted": False, "client_address": None, "price_per_token": 3}, "no signed price"),
        ({"client_address": "0x1234"}, "40 hex digits"),
        ({"price_per_token": -1}, r"price_per_token must be in"),
        ({"price_per_token": 2**256}, r"price_per_token must be in"),
        ({"job_id": -5}, r"job_id must be in"),
        ({"session_id": ""}, "must not be empty"),
        ({"model": "bad\ud800model"}, "not valid Unicode"),
        ({"model": "x" * 257}, "longer than 256"),
    ],
)
def test_invalid_identities_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _identity(**changes)


@pytest.mark.parametrize(
    "changes",
    [{"job_id": True}, {"price_per_token": 1.0}, {"chain_id": "84532"}, {"encrypted": 1}],
)
def test_wrongly_typed_identity_fields_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        _identity(**changes)


def test_session_usage_accumulates_exact_totals() -> None:
    usage = SessionUsage(identity=encrypted_identity(price=2**53 - 1), started_at="t")
    usage.add(10, 5)
    usage.add(1, 0)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.request_count) == (11, 5, 2)
    assert usage.total_tokens == 16
    assert usage.amount == 16 * (2**53 - 1)
    assert not usage.closed
    with pytest.raises(ValueError, match="prompt_tokens"):
        usage.add(-1, 0)
    with pytest.raises(TypeError):
        usage.add(1, True)
    assert usage.request_count == 2


def test_timestamps_are_iso8601_utc_with_milliseconds() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(1_750_000_000.25) == "2025-06-15T15:06:40.250Z"
    # Truncated, never rounded up into the next second.
    assert format_timestamp(1_750_000_000.9999) == "2025-06-15T15:06:40.999Z"


def test_default_ledger_path_prefers_the_data_dir_variable(tmp_path: Path) -> None:
    assert default_ledger_path({"LLM_NODE_DATA_DIR": str(tmp_path), "HOME": "/h"}) == (
        tmp_path / "ledger.sqlite3"
    )
    assert default_ledger_path({"HOME": "/home/op"}) == Path(
        "/home/op/.local/share/llm-node/ledger.sqlite3"
    )
    assert default_ledger_path({"HOME": "/home/op", "XDG_DATA_HOME": "/xdg"}) == Path(
        "/xdg/llm-node/ledger.sqlite3"
    )
    # A relative XDG_DATA_HOME is invalid by the spec and ignored; so is an empty variable.
    assert default_ledger_path(
        {"HOME": "/home/op", "XDG_DATA_HOME": "rel", "LLM_NODE_DATA_DIR": ""}
    ) == Path("/home/op/.local/share/llm-node/ledger.sqlite3")
