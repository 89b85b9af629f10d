"""The proxy in front of a node with ``--no-v1-challenge``: v2 needs no challenge (each
session's handshake proves the host key), v1 still does. Real sockets on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from node.cli import main
from node.client import ConnectFailed, HostKeyMismatch
from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.proxy.link import SessionPool
from tests.proxy.conftest import proxy_stack
from tests.support.nodeproc import echo_node_process, proxy_process
from tests.support.wire import running_node

NO_CHALLENGE = NodeConfig(port=0, v1_challenge=False)
STARTUP_S = 60.0


@pytest.mark.parametrize("protocol", ["auto", "v2"])
async def test_the_proxy_speaks_v2_to_a_node_without_the_challenge(protocol: str) -> None:
    with trio.fail_after(30):
        async with proxy_stack(node_config=NO_CHALLENGE, protocol=protocol) as stack:
            assert stack.pool.protocol == "v2"
            assert stack.pool.host.address == stack.host_key.address
            client = stack.openai_client()
            reply = await stack.call(
                lambda: client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "no challenge"}]
                )
            )
            assert reply.choices[0].message.content == "no challenge"
            assert stack.node.metrics.http_requests.get("403", 0) == 0


async def test_the_proxy_on_v1_still_needs_the_challenge() -> None:
    host_key = HostKey.generate()
    with trio.fail_after(30):
        async with running_node(host_key=host_key, config=NO_CHALLENGE) as (ctx, ws_url):
            url = ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
            with pytest.raises(ConnectFailed, match="--no-v1-challenge"):
                async with SessionPool.open(url, protocol="v1"):
                    pytest.fail("the pool started without the challenge")  # pragma: no cover
            assert ctx.metrics.http_requests["403"] == 1
            assert ctx.metrics.connections_total == 0


async def test_a_wrong_pin_stops_the_proxy_before_any_session() -> None:
    host_key = HostKey.generate()
    with trio.fail_after(30):
        async with running_node(host_key=host_key, config=NO_CHALLENGE) as (ctx, ws_url):
            url = ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
            with pytest.raises(HostKeyMismatch, match=host_key.address):
                async with SessionPool.open(url, expected_host_address="0x" + "00" * 19 + "01"):
                    pytest.fail("the pool started with a wrong pin")  # pragma: no cover
            assert ctx.metrics.connections_total == 0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOST_PRIVATE_KEY", "LLM_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def test_llm_node_proxy_end_to_end_without_the_challenge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``llm-node serve --no-v1-challenge`` and ``llm-node proxy`` as processes; an HTTP
    chat completion through both. ``--protocol v1`` then refuses to start, naming the flag."""
    host_key = HostKey.generate()
    env = _env()
    env["HOST_PRIVATE_KEY"] = host_key.private_key_hex()
    try:
        with echo_node_process(
            tmp_path / "l.sqlite3", env, startup_s=STARTUP_S, extra_args=("--no-v1-challenge",)
        ) as (node_url, _):
            with proxy_process(node_url, _env(), startup_s=STARTUP_S) as (proxy_url, log):
                reply = httpx.post(
                    proxy_url + "/v1/chat/completions",
                    json={"model": "echo", "messages": [{"role": "user", "content": "hi v2"}]},
                    timeout=30,
                )
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["message"]["content"] == "hi v2"
                assert any("protocol v2" in line for line in log)
            status = main(
                ["proxy", "--node", node_url, "--protocol", "v1", "--listen", "127.0.0.1:0"]
            )
            assert status == 1
            err = capsys.readouterr().err
            assert "error [CONNECT_FAILED]" in err
            assert "--no-v1-challenge" in err
    finally:
        host_key.wipe()
