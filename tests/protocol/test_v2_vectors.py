"""The v2 transcript (tests/vectors/v2/transcript.json) and docs/PROTOCOL_V2.md agree with
the code: the generator reproduces the file byte for byte, and every value the document
quotes is in it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from node.protocol.v2 import records as r
from tests.conftest import REPO_ROOT

TRANSCRIPT_PATH = REPO_ROOT / "tests" / "vectors" / "v2" / "transcript.json"
DOC = (REPO_ROOT / "docs" / "PROTOCOL_V2.md").read_text(encoding="utf-8")


def _generator() -> ModuleType:
    loaded = sys.modules.get("gen_v2_vectors")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        "gen_v2_vectors", REPO_ROOT / "scripts" / "gen_v2_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_v2_vectors"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def transcript() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TRANSCRIPT_PATH.read_text(encoding="utf-8"))
    return data


def test_the_generator_reproduces_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert _generator().main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_the_check_notices_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = _generator()
    stale = tmp_path / "transcript.json"
    stale.write_text(TRANSCRIPT_PATH.read_text(encoding="utf-8").replace("pong", "pang"))
    monkeypatch.setattr(gen, "OUT", stale)
    monkeypatch.setattr(gen, "REPO", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().out


def test_transcript_covers_what_the_issue_asks(transcript: dict[str, Any]) -> None:
    kinds = {(f["direction"], f["type"]) for f in transcript["records"]}
    assert ("client_to_node", "DATA") in kinds
    assert ("node_to_client", "END") in kinds
    assert ("node_to_client", "ERROR") in kinds
    assert ("client_to_node", "CLOSE") in kinds
    padded = transcript["padded"]["records"]
    assert ("node_to_client", "CLOSE") in {(f["direction"], f["type"]) for f in padded}
    assert all((len(f["plaintext_hex"]) // 2) % 64 == 0 for f in padded)
    rotations = transcript["rotations"]
    assert sorted(x["direction"] for x in rotations) == ["client_to_node", "node_to_client"]
    assert all(x["after_records"] == 1000 for x in rotations)
    first_rotated = [f for f in transcript["records"] if f["key_epoch"] == 1 and f["nonce"] == 0]
    assert len(first_rotated) == 2  # record 1000 of each direction
    assert all(f["record"] == 1000 for f in first_rotated)


def test_every_hex_value_in_the_document_is_in_the_transcript() -> None:
    text = TRANSCRIPT_PATH.read_text(encoding="utf-8")
    quoted = set(re.findall(r"\b[0-9a-f]{32,}\b", DOC))
    assert len(quoted) >= 30
    missing = sorted(v for v in quoted if v not in text)
    assert not missing, f"docs/PROTOCOL_V2.md quotes values not in the transcript: {missing}"


def test_the_document_tables_match_the_transcript_in_order(transcript: dict[str, Any]) -> None:
    section = DOC[DOC.index("### 10.2") : DOC.index("Message 1 (")]
    table = re.findall(r"\| `([0-9a-f]{64})` \|", section)
    want = [s["hex"] for s in transcript["handshake"]["steps"] if len(s["hex"]) == 64]
    assert table == want
    keys = transcript["keys"]
    for value in keys.values():
        assert f"`{value}`" in DOC
    assert transcript["handshake"]["msg1_hex"] in DOC
    assert transcript["handshake"]["msg2_hex"] in DOC
    assert f"```\n{transcript['session']['signed_text']}\n```" in DOC
    assert transcript["session"]["wallet_address"] in DOC


def test_the_document_constants_are_the_code_constants(transcript: dict[str, Any]) -> None:
    assert f"`{r.PROTOCOL_NAME}`" in DOC
    assert f"`{r.PROLOGUE.hex()}`" in DOC
    assert f"= {r.MAX_FRAME} bytes" in DOC
    assert str(r.MAX_BODY) in DOC
    assert transcript["protocol_name"] == r.PROTOCOL_NAME
    assert len(r.PROTOCOL_NAME) == 36
    assert transcript["handshake"]["payload2"] in DOC


def test_signature_matches_an_independent_ethereum_library(transcript: dict[str, Any]) -> None:
    account = pytest.importorskip("eth_account")
    messages = pytest.importorskip("eth_account.messages")
    session = transcript["session"]
    message = messages.encode_defunct(text=session["signed_text"])
    signer = account.Account.recover_message(message, signature=session["signature"])
    assert signer == session["wallet_address"]
    signed = account.Account.sign_message(message, "0x" + session["wallet_private_key"])
    assert "0x" + signed.signature.hex().removeprefix("0x") == session["signature"]


def test_the_document_names_only_real_error_codes() -> None:
    from node.crypto.errors import ErrorCode
    from node.protocol.v2 import client as v2client

    client_codes = {
        value
        for name, value in vars(v2client).items()
        if name.isupper() and isinstance(value, str) and value.isupper()
    }
    known = {c.value for c in ErrorCode} | client_codes | set(r.RECORD_NAMES.values())
    named = set(re.findall(r"`([A-Z][A-Z_]{4,})`", DOC))
    assert named
    assert named <= known, f"unknown codes in PROTOCOL_V2.md: {sorted(named - known)}"
    assert client_codes <= named


def test_the_close_codes_table_matches_the_server() -> None:
    from node.protocol.errors import CLOSE_MESSAGE_TOO_BIG, CLOSE_NORMAL, CLOSE_POLICY_VIOLATION
    from node.protocol.v2.server import CLOSE_UNSUPPORTED_DATA

    section = DOC[DOC.index("### 6.1 Close codes") : DOC.index("## 7. Limits")]
    rows = set(re.findall(r"^\| (\d{4}) \|", section, re.M))
    assert {
        str(c)
        for c in (
            CLOSE_NORMAL,
            CLOSE_UNSUPPORTED_DATA,
            CLOSE_POLICY_VIOLATION,
            CLOSE_MESSAGE_TOO_BIG,
        )
    } <= rows
