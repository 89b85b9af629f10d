"""Receipts of protocol v2 sessions say so; v1 receipts keep exactly their old fields."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from node.crypto.hostkey import HostKey
from node.settlement import (
    Ledger,
    Receipt,
    ReceiptError,
    SessionIdentity,
    VerificationStatus,
    verify_receipt,
)
from tests.settlement.conftest import FakeWallClock, connect, encrypted_identity
from tests.settlement.test_receipt import make_receipt

V1_FIELDS = {
    "type",
    "version",
    "sequence",
    "session_id",
    "job_id",
    "chain_id",
    "client_address",
    "host_address",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "request_count",
    "price_per_token",
    "amount",
    "encrypted",
    "started_at",
    "ended_at",
    "end_reason",
}


def test_v1_receipt_has_no_protocol_field(host_key: HostKey) -> None:
    # A receipt of a protocol v1 session: the fields it always had, plus the hash chain's
    # two (receipt version 2); a receipt written before the chain has exactly the old ones.
    obj = json.loads(make_receipt(host_key).canonical_json())
    assert set(obj) == V1_FIELDS | {"ledger_epoch", "prev_hash"}
    old = make_receipt(host_key, version=1, ledger_epoch=None)
    assert set(json.loads(old.canonical_json())) == V1_FIELDS


def test_v2_receipt_carries_protocol_and_round_trips(host_key: HostKey) -> None:
    receipt = make_receipt(host_key, protocol="v2")
    text = receipt.canonical_json()
    assert json.loads(text)["protocol"] == "v2"
    assert Receipt.from_canonical_json(text) == receipt
    # The protocol is inside the signed text: changing it breaks the signature.
    assert make_receipt(host_key).canonical_json() != text


def test_explicit_v1_and_unknown_protocols_are_refused(host_key: HostKey) -> None:
    obj = make_receipt(host_key).to_json_object()
    with pytest.raises(ReceiptError, match="leaves out the protocol"):
        Receipt.from_json_object({**obj, "protocol": "v1"})
    with pytest.raises(ReceiptError, match="protocol must be"):
        Receipt.from_json_object({**obj, "protocol": "v3"})
    with pytest.raises(ReceiptError, match="protocol must be"):
        make_receipt(host_key, protocol="v9")


def test_identity_refuses_plaintext_v2() -> None:
    with pytest.raises(ValueError, match="only protocol v1"):
        SessionIdentity(
            session_id="1",
            job_id=1,
            chain_id=1,
            client_address=None,
            model="m",
            price_per_token=0,
            encrypted=False,
            protocol="v2",
        )


async def test_ledger_marks_v2_sessions_and_their_receipts(
    ledger: Ledger, ledger_path: Path, host_key: HostKey
) -> None:
    v1 = ledger.start_session(encrypted_identity("1"))
    v2 = ledger.start_session(attrs.evolve(encrypted_identity("2"), protocol="v2"))
    for usage in (v1, v2):
        await ledger.record_request(
            usage, request_id="r", prompt_tokens=3, completion_tokens=4, finish_reason="stop"
        )
    r1 = await ledger.close_session(v1, "disconnect")
    r2 = await ledger.close_session(v2, "disconnect")
    assert (r1.receipt.protocol, r2.receipt.protocol) == ("v1", "v2")
    assert verify_receipt(r2, host_address=host_key.address).status is VerificationStatus.VALID
    with connect(ledger_path) as conn:
        sessions = conn.execute("SELECT session_id, protocol FROM sessions ORDER BY 1").fetchall()
        receipts = conn.execute("SELECT session_id, protocol FROM receipts ORDER BY 1").fetchall()
    assert sessions == [("1", "v1"), ("2", "v2")]
    assert receipts == [("1", "v1"), ("2", "v2")]
    stored = {s.columns["session_id"]: s for s in ledger.store.iter_receipts()}
    assert stored["2"].verify(host_address=host_key.address).ok
    assert stored["1"].verify(host_address=host_key.address).ok
    assert stored["2"].signed_receipt().receipt.protocol == "v2"


async def test_open_v2_session_is_recovered_as_v2(
    ledger_path: Path, host_key: HostKey, wall_clock: FakeWallClock
) -> None:
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        usage = ledger.start_session(attrs.evolve(encrypted_identity("5"), protocol="v2"))
        await ledger.record_request(
            usage, request_id="r", prompt_tokens=1, completion_tokens=1, finish_reason="stop"
        )
        # "crash": the session is never closed
    with Ledger.open(ledger_path, host_key=host_key, wall_clock=wall_clock) as ledger:
        [recovered] = ledger.recovered
    assert recovered.receipt.protocol == "v2"


async def test_a_v2_session_through_a_live_node_gets_a_v2_receipt(tmp_path: Path) -> None:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    from node.client import open_session
    from node.settlement.service import LedgerAccounting
    from tests.support.wire import SDK_HOST_KEY, running_node

    host = HostKey.parse(SDK_HOST_KEY)
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", host_key=host)
    with trio.fail_after(20):
        async with (
            running_node(host_key=host, accounting=LedgerAccounting(ledger)) as (_, url),
            open_session(
                url.replace("/v1/ws", "/v2/ws"),
                model="echo",
                job_id=91,
                price_per_token=5,
                host_public_key=host.public_key,
            ) as session,
        ):
            assert session.protocol == "v2"
            done = await session.complete("three words here")
        # The node has shut down: every session is settled.
    [stored] = list(ledger.store.iter_receipts())
    receipt = json.loads(stored.canonical_json)
    assert receipt["protocol"] == "v2"
    assert receipt["job_id"] == "91"
    assert receipt["client_address"] == session.client_address
    assert done.usage is not None
    assert receipt["total_tokens"] == done.usage.total_tokens
    assert receipt["amount"] == str(done.usage.total_tokens * 5)
    assert stored.verify(host_address=host.address).ok
    signature = stored.signed_receipt().signature
    assert signature is not None
    text = stored.canonical_json
    signer = Account.recover_message(encode_defunct(text=text), signature=signature)
    assert signer == host.address
    ledger.close()
