"""Node URLs and host key discovery (``/v1/host-key`` + ``/v1/auth/challenge``), with the
HTTP side played by an in-memory httpx transport."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from node.client import (
    ConnectFailed,
    HostKeyMismatch,
    HostVerificationFailed,
    discover_host_key,
    fetch_models,
    http_base_url,
    identity_from_public_key,
    websocket_url,
)
from node.crypto import HostKey
from node.crypto.curve import HALF_N, SECP256K1_N

HOST = HostKey.generate()
IMPOSTOR = HostKey.generate()


@pytest.mark.parametrize(
    ("url", "ws", "http"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/v1/ws", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/v1/ws", "http://127.0.0.1:8080"),
        ("https://node.example", "wss://node.example/v1/ws", "https://node.example"),
        ("http://h:1/prefix/", "ws://h:1/prefix/v1/ws", "http://h:1/prefix"),
        ("ws://127.0.0.1:9/v1/ws", "ws://127.0.0.1:9/v1/ws", "http://127.0.0.1:9"),
        ("wss://node.example/v1/ws", "wss://node.example/v1/ws", "https://node.example"),
    ],
)
def test_urls(url: str, ws: str, http: str) -> None:
    assert websocket_url(url) == ws
    assert http_base_url(url) == http


@pytest.mark.parametrize("url", ["ftp://x", "127.0.0.1:8080", "http://"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        websocket_url(url)


def _transport(
    *,
    key: HostKey = HOST,
    signer: HostKey = HOST,
    address: str | None = None,
    mangle: Callable[[dict[str, Any]], dict[str, Any]] = lambda a: a,
    calls: list[str] | None = None,
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(request.url.path)
        if request.url.path == "/v1/host-key":
            return httpx.Response(
                200,
                json={"publicKey": key.public_key_hex, "address": address or key.address},
            )
        if request.url.path == "/v1/auth/challenge":
            challenge = bytes.fromhex(json.loads(request.content)["challenge"])
            assert len(challenge) == 32
            sig = signer.sign_challenge(challenge)
            return httpx.Response(200, json=mangle({"signature": sig[:64].hex(), "recid": sig[64]}))
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}
            )
        return httpx.Response(404, json={"error": "no route"})

    return httpx.MockTransport(handler)


async def test_discovery_confirms_the_key_with_a_challenge() -> None:
    calls: list[str] = []
    identity = await discover_host_key("http://node:1", transport=_transport(calls=calls))
    assert identity.public_key == HOST.public_key
    assert identity.address == HOST.address
    assert identity.verified_by_challenge
    assert calls == ["/v1/host-key", "/v1/auth/challenge"]


async def test_each_discovery_uses_a_fresh_challenge() -> None:
    seen: list[bytes] = []

    def rng(n: int) -> bytes:
        value = bytes([len(seen) + 1]) * n
        seen.append(value)
        return value

    await discover_host_key("http://node:1", transport=_transport(), rng=rng)
    await discover_host_key("http://node:1", transport=_transport(), rng=rng)
    assert seen[0] != seen[1]


async def test_challenge_signed_by_another_key_is_refused() -> None:
    with pytest.raises(HostVerificationFailed, match="not signed by the announced host key"):
        await discover_host_key("http://node:1", transport=_transport(signer=IMPOSTOR))


async def test_address_that_does_not_fit_the_key_is_refused() -> None:
    with pytest.raises(HostVerificationFailed, match="address"):
        await discover_host_key("http://node:1", transport=_transport(address=IMPOSTOR.address))


def _high_s(answer: dict[str, Any]) -> dict[str, Any]:
    rs = bytes.fromhex(answer["signature"])
    s = int.from_bytes(rs[32:], "big")
    assert s <= HALF_N
    return {
        "signature": (rs[:32] + (SECP256K1_N - s).to_bytes(32, "big")).hex(),
        "recid": 1 - answer["recid"],
    }


@pytest.mark.parametrize(
    "mangle",
    [
        _high_s,
        lambda a: {**a, "recid": 1 - a["recid"]},
        lambda a: {**a, "recid": 27},
        lambda a: {**a, "recid": True},
        lambda a: {**a, "signature": a["signature"][:-2]},
        lambda a: {**a, "signature": "zz" * 64},
        lambda a: {"recid": a["recid"]},
    ],
    ids=["high-s", "wrong-recid", "recid-27", "recid-bool", "short", "not-hex", "missing"],
)
async def test_bad_challenge_answers_are_refused(
    mangle: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    with pytest.raises(HostVerificationFailed):
        await discover_host_key("http://node:1", transport=_transport(mangle=mangle))


async def test_pinned_address_mismatch_stops_before_the_challenge() -> None:
    calls: list[str] = []
    with pytest.raises(HostKeyMismatch) as info:
        await discover_host_key(
            "http://node:1",
            expected_address=IMPOSTOR.address,
            transport=_transport(calls=calls),
        )
    assert calls == ["/v1/host-key"]
    assert info.value.code == "HOST_KEY_MISMATCH"
    identity = await discover_host_key(
        "http://node:1", expected_address=HOST.address.lower(), transport=_transport()
    )
    assert identity.address == HOST.address


async def test_malformed_pin_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="40 hex digits"):
        await discover_host_key("http://node:1", expected_address="0x1234", transport=_transport())


async def test_node_without_host_key() -> None:
    with pytest.raises(ConnectFailed) as info:
        await discover_host_key(
            "http://node:1",
            transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"error": "x"})),
        )
    assert info.value.code == "ENCRYPTION_NOT_SUPPORTED"


async def test_http_failures_are_connect_failed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ConnectFailed, match="cannot reach"):
        await discover_host_key("http://node:1", transport=httpx.MockTransport(refuse))
    with pytest.raises(ConnectFailed, match="HTTP 500"):
        await discover_host_key(
            "http://node:1", transport=httpx.MockTransport(lambda r: httpx.Response(500))
        )


async def test_fetch_models() -> None:
    assert await fetch_models("ws://node:1/v1/ws", transport=_transport()) == ["m1", "m2"]


def test_identity_from_public_key() -> None:
    uncompressed = HOST._key().public_key.format(compressed=False)
    for form in (HOST.public_key, HOST.public_key_hex, "0x" + HOST.public_key_hex, uncompressed):
        identity = identity_from_public_key(form)
        assert identity.public_key == HOST.public_key
        assert identity.address == HOST.address
    with pytest.raises(ValueError, match="host public key"):
        identity_from_public_key("02" + "00" * 32)
    with pytest.raises(HostKeyMismatch):
        identity_from_public_key(HOST.public_key, expected_address=IMPOSTOR.address)
