"""The plain HTTP routes on the WebSocket port (PROTOCOL.md section 7) and --max-connections."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from node import __version__
from node.crypto.curve import recover_public_key, sha256
from tests.server._support import (
    DEV_HOST_ADDRESS,
    DEV_HOST_PUBLIC_HEX,
    UPGRADE_REQUEST,
    RunningNode,
    parse_prometheus,
    ws_client,
)
from tests.server.conftest import NodeFactory


@pytest.fixture
async def http(node: RunningNode) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        yield client


async def raw_http(node: RunningNode, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the node closes after one response)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
        async with stream:
            await stream.send_all(request)
            data = b""
            for _ in range(1000):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("path", ["/health", "/v1/health"])
async def test_health(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "ok"
    assert body["ready"] is True
    assert body["backend"] == "echo"
    assert body["encryption"] is True
    assert body["version"] == __version__


async def test_version_lists_e2ee_only_with_a_host_key(node_factory: NodeFactory) -> None:
    with_key = await node_factory.start()
    without_key = await node_factory.start(host_key=None)
    required = await node_factory.start(require_encryption=True)
    async with httpx.AsyncClient(timeout=10) as client:
        features = {}
        for name, node in [("key", with_key), ("nokey", without_key), ("req", required)]:
            response = await client.get(node.url + "/v1/version")
            assert response.status_code == 200
            body = response.json()
            assert body["version"] == __version__
            assert isinstance(body["protocol_version"], int | str)
            features[name] = body["features"]
        assert "end-to-end-encryption" in features["key"]
        assert "end-to-end-encryption" not in features["nokey"]
        assert "plaintext-deprecated" in features["key"]
        assert "plaintext-deprecated" not in features["req"]
        health = (await client.get(without_key.url + "/health")).json()
        assert health["encryption"] is False
        response = await client.get(without_key.url + "/v1/host-key")
        assert response.status_code == 404
        response = await client.post(
            without_key.url + "/v1/auth/challenge", json={"challenge": "00" * 32}
        )
        assert response.status_code == 404


async def test_models(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["echo"]
    assert body["data"][0]["object"] == "model"


async def test_host_key(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/host-key")
    assert response.status_code == 200
    assert response.json() == {"publicKey": DEV_HOST_PUBLIC_HEX, "address": DEV_HOST_ADDRESS}


@pytest.mark.parametrize("form", ["plain", "0x", "upper"])
async def test_auth_challenge_signature_verifies(http: httpx.AsyncClient, form: str) -> None:
    challenge = os.urandom(32)
    text = {
        "plain": challenge.hex(),
        "0x": "0x" + challenge.hex(),
        "upper": challenge.hex().upper(),
    }
    response = await http.post("/v1/auth/challenge", json={"challenge": text[form]})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"signature", "recid"}
    assert len(body["signature"]) == 128
    assert body["signature"] == body["signature"].lower()
    assert body["recid"] in (0, 1)
    signature = bytes.fromhex(body["signature"]) + bytes([body["recid"]])
    recovered = recover_public_key(sha256(challenge), signature).format(compressed=True)
    assert recovered.hex() == DEV_HOST_PUBLIC_HEX
    # A different challenge does not verify under this signature.
    other = recover_public_key(sha256(os.urandom(32)), signature).format(compressed=True)
    assert other.hex() != DEV_HOST_PUBLIC_HEX


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"nochallenge": 1}',
        b'{"challenge": 42}',
        b'{"challenge": "abc"}',
        b'{"challenge": "' + b"zz" * 32 + b'"}',
        b'{"challenge": "' + b"00" * 31 + b'"}',
        b'{"challenge": "' + b"00" * 33 + b'"}',
    ],
    ids=["not-json", "array", "missing", "number", "odd-hex", "bad-hex", "short", "long"],
)
async def test_auth_challenge_bad_request(http: httpx.AsyncClient, body: bytes) -> None:
    response = await http.post(
        "/v1/auth/challenge", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["status"] == 400
    assert isinstance(response.json()["error"], str)


async def test_metrics_is_prometheus_text(node: RunningNode, http: httpx.AsyncClient) -> None:
    assert (await http.get("/nope")).status_code == 404
    async with ws_client(node) as client:
        _, session = await client.init(node.host_public_key)
        await client.ask(session, "count me")
        await client.send("garbage")
        await client.expect_error("INVALID_MESSAGE")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "version=0.0.4" in response.headers["content-type"]
    samples = parse_prometheus(response.text)
    assert samples["llm_node_connections_open"] == 1
    assert samples["llm_node_session_keys"] == 1
    assert samples["llm_node_session_key_bytes"] == 32
    assert samples['llm_node_errors_total{code="INVALID_MESSAGE"}'] == 1
    assert samples['llm_node_http_requests_total{status="404"}'] == 1
    assert samples['llm_node_requests_total{finish_reason="stop"}'] == 1
    # Never key material or text in the metrics.
    assert session.key.hex() not in response.text
    assert "count me" not in response.text


def test_prometheus_parser_rejects_malformed_lines() -> None:
    good = "# HELP a x\n# TYPE a counter\na 1\n"
    assert parse_prometheus(good) == {"a": 1.0}
    for bad in [
        "# TYPE a counter\na\n",  # no value
        "# TYPE a counter\na 1 2 3\n",  # junk after the value
        "# TYPE a counter\na{x=1} 1\n",  # unquoted label
        "# TYPE a counter\na one\n",  # not a number
        "b 1\n",  # no TYPE line
        "# TYPE a counter\na 1",  # no final newline
    ]:
        with pytest.raises((AssertionError, ValueError)):
            parse_prometheus(bad)


async def test_unknown_path_404_and_wrong_method_405(http: httpx.AsyncClient) -> None:
    response = await http.get("/v2/nothing-here")
    assert response.status_code == 404
    assert response.json()["status"] == 404
    response = await http.post("/health", content=b"{}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    response = await http.get("/v1/auth/challenge")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


async def test_oversized_body_413(node: RunningNode) -> None:
    status, headers, body = await raw_http(
        node,
        b"POST /v1/auth/challenge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n",
    )
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(body)["status"] == 413


async def test_malformed_request_400(node: RunningNode) -> None:
    status, _, _ = await raw_http(node, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400


async def test_ws_path_without_upgrade_426(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/ws")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"


async def test_max_connections_refuses_the_extra_upgrade_with_503(
    node_factory: NodeFactory,
) -> None:
    node = await node_factory.start(max_connections=2)
    with trio.fail_after(20):
        async with ws_client(node) as first, ws_client(node) as second:
            status, _, body = await raw_http(node, UPGRADE_REQUEST)
            assert status == 503
            assert "too many connections" in json.loads(body)["error"]
            # HTTP routes are not connections and still answer.
            async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
                samples = parse_prometheus((await http.get("/metrics")).text)
            assert samples["llm_node_connections_refused_total"] == 1
            assert samples["llm_node_connections_open"] == 2
            await first.ping()
            await second.ping()
        await node.wait_no_connections()
        # Room again once they are gone.
        async with ws_client(node) as third:
            await third.ping()


async def test_head_is_get_without_the_body(node: RunningNode) -> None:
    status, headers, body = await raw_http(node, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) > 0  # the length the GET body would have
    assert body == b""
    status, _, body = await raw_http(node, b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
    assert body == b""


async def test_upgrade_elsewhere_or_broken_is_refused(node: RunningNode) -> None:
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    status, _, _ = await raw_http(
        node,
        b"GET /ws HTTP/1.1\r\nHost: x\r\n" + upgrade + key + b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert status == 404
    status, headers, _ = await raw_http(
        node,
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n" + upgrade + key + b"Sec-WebSocket-Version: 8\r\n\r\n",
    )
    assert status == 426
    assert headers["sec-websocket-version"] == "13"
    assert node.ctx.drivers == set()
