"""Browser origins on ``/v1/ws`` (issue 14, finding 11) and turning the v1 challenge
route off (finding 5), over real sockets on 127.0.0.1.

Any web page in the operator's browser could open a WebSocket to a node on 127.0.0.1:
browsers send an ``Origin`` header on the upgrade, other clients send none. A node on a
loopback address now refuses every browser origin it was not told to allow (HTTP 403);
``--allowed-origins`` lists the allowed ones (``*``: any).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from node.cli import build_parser, config_from_args
from node.config import NodeConfig, is_loopback_host, normalize_origin
from node.crypto.curve import recover_public_key, sha256
from node.server.app import origin_allowed
from tests.server._support import UPGRADE_REQUEST, RunningNode, ws_client
from tests.server.conftest import NodeFactory


def upgrade(origin: str | None) -> bytes:
    head = UPGRADE_REQUEST[:-2]  # without the blank line that ends the head
    if origin is not None:
        head += f"Origin: {origin}\r\n".encode("latin-1")
    return head + b"\r\n"


async def answer_to(node: RunningNode, request: bytes) -> tuple[int, bytes]:
    """Send a raw upgrade request; the HTTP status of the answer and what follows it."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
        async with stream:
            await stream.send_all(request)
            data = b""
            for _ in range(100):
                chunk = await stream.receive_some(65536)
                data += chunk
                if not chunk or b"\r\n\r\n" in data:
                    break
            if data.startswith(b"HTTP/1.1 403"):
                for _ in range(100):  # the error body, then the node closes
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    ("host", "allowed", "origin", "expected"),
    [
        ("127.0.0.1", None, None, 101),  # the SDK in Node.js, node.client, curl
        ("127.0.0.1", None, "https://evil.example", 403),
        ("127.0.0.1", None, "null", 403),  # a sandboxed frame or a file:// page
        ("127.0.0.1", None, "http://127.0.0.1:8080", 403),
        ("127.0.0.1", "https://app.example", "https://app.example", 101),
        ("127.0.0.1", "https://app.example", "HTTPS://APP.EXAMPLE/", 101),
        ("127.0.0.1", "https://app.example", "https://app.example.evil", 403),
        ("127.0.0.1", "https://app.example", "http://app.example", 403),
        ("127.0.0.1", "*", "https://anything.example", 101),
    ],
)
async def test_upgrade_by_origin(
    node_factory: NodeFactory, host: str, allowed: str | None, origin: str | None, expected: int
) -> None:
    origins = None if allowed is None else frozenset({normalize_origin(allowed)})
    node = await node_factory.start(host=host, allowed_origins=origins)
    status, body = await answer_to(node, upgrade(origin))
    assert status == expected
    if expected == 403:
        assert b"--allowed-origins" in json.loads(body)["error"].encode()
        assert node.ctx.metrics.http_requests["403"] == 1
        assert node.ctx.metrics.connections_total == 0
    else:
        await node.drivers.wait_until(lambda d: not d)  # our raw client left


async def test_a_client_without_origin_still_works_on_loopback(node: RunningNode) -> None:
    async with ws_client(node) as client:
        await client.ping()


def test_public_address_allows_origins_by_default() -> None:
    public = NodeConfig(host="0.0.0.0")
    assert origin_allowed(public, "https://app.example")
    assert origin_allowed(public, None)
    listed = NodeConfig(host="0.0.0.0", allowed_origins=frozenset({"https://app.example"}))
    assert origin_allowed(listed, "https://app.example")
    assert not origin_allowed(listed, "https://other.example")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("node.example", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert origin_allowed(NodeConfig(host=host), "https://x.example") is not loopback


def test_allowed_origins_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["serve", "--allowed-origins", " https://A.example/ ,http://b.example:8080,,"]
    )
    assert config_from_args(args).allowed_origins == frozenset(
        {"https://a.example", "http://b.example:8080"}
    )
    monkeypatch.setenv("LLM_NODE_ALLOWED_ORIGINS", "*")
    assert config_from_args(build_parser().parse_args(["serve"])).allowed_origins == {"*"}
    monkeypatch.delenv("LLM_NODE_ALLOWED_ORIGINS")
    assert config_from_args(build_parser().parse_args(["serve"])).allowed_origins is None


# --------------------------------------------------------------------- the challenge


async def challenge(node: RunningNode, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(node.url + "/v1/auth/challenge", json=body)


async def test_the_challenge_route_signs_by_default(node: RunningNode) -> None:
    c = bytes(range(32))
    response = await challenge(node, {"challenge": c.hex()})
    assert response.status_code == 200
    answer = response.json()
    signature = bytes.fromhex(answer["signature"]) + bytes([answer["recid"]])
    assert recover_public_key(sha256(c), signature).format() == node.host_public_key


async def test_no_v1_challenge_turns_the_route_off(node_factory: NodeFactory) -> None:
    node = await node_factory.start(v1_challenge=False)
    response = await challenge(node, {"challenge": "00" * 32})
    assert response.status_code == 403
    message = response.json()["error"]
    assert "--no-v1-challenge" in message
    # accurate for both protocols: v2 proves the key in its handshake, v1 must pin it
    assert "protocol v2 clients need no challenge (the v2 handshake proves the host key)" in (
        message
    )
    assert "protocol v1 clients must get the host key from the operator and pin it" in message
    assert "signature" not in response.text
    # the rest of the node is unchanged: its key is still announced, sessions still open
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(node.url + "/v1/host-key")).status_code == 200
    async with ws_client(node) as client:
        await client.init(node.host_public_key)


def test_no_v1_challenge_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(build_parser().parse_args(["serve"])).v1_challenge is True
    args = build_parser().parse_args(["serve", "--no-v1-challenge"])
    assert config_from_args(args).v1_challenge is False
    monkeypatch.setenv("LLM_NODE_V1_CHALLENGE", "off")
    assert config_from_args(build_parser().parse_args(["serve"])).v1_challenge is False


async def test_our_client_explains_a_turned_off_challenge(node_factory: NodeFactory) -> None:
    from node.client.discovery import discover_host_key
    from node.client.errors import ConnectFailed

    node = await node_factory.start(v1_challenge=False)
    with pytest.raises(ConnectFailed, match="pin"):
        await discover_host_key(node.url)


@pytest.mark.parametrize("origin", [None, "https://evil.example"])
async def test_the_v2_endpoint_checks_origins_too(node: RunningNode, origin: str | None) -> None:
    request = upgrade(origin).replace(b"GET /v1/ws ", b"GET /v2/ws ", 1)
    status, _ = await answer_to(node, request)
    assert status == (101 if origin is None else 403)
    await node.drivers.wait_until(lambda d: not d)


async def test_api_md_quotes_the_turned_off_challenge_answer(node_factory: NodeFactory) -> None:
    """docs/API.md quotes the 403 body word for word (line breaks aside)."""
    from tests.conftest import REPO_ROOT

    node = await node_factory.start(v1_challenge=False)
    response = await challenge(node, {"challenge": "00" * 32})
    doc = " ".join((REPO_ROOT / "docs" / "API.md").read_text(encoding="utf-8").split())
    assert f"`{response.text}`" in doc
