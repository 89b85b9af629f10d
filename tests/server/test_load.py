"""200 concurrent encrypted sessions on one node, each with its own key and prompt."""

from __future__ import annotations

import httpx
import trio

from tests.server._support import parse_prometheus, ws_client
from tests.server.conftest import NodeFactory

CLIENTS = 200


async def test_200_concurrent_encrypted_sessions(node_factory: NodeFactory) -> None:
    # All 200 clients come from 127.0.0.1 at once: lift the per-address allowance.
    node = await node_factory.start(address_init_burst=0)
    all_inited = trio.Event()
    inited = 0
    outputs: dict[int, str] = {}
    addresses: dict[int, str] = {}

    async def one_client(i: int) -> None:
        nonlocal inited
        prompt = f"client {i} asks: " + " ".join(f"t{i}x{j}" for j in range(i % 17 + 3))
        async with ws_client(node) as client:
            ack, session = await client.init(
                node.host_public_key, session_id=str(1000 + i), job_id=i
            )
            assert ack["client_address"] == session.client_address
            assert ack["job_id"] == i
            addresses[i] = ack["client_address"]
            inited += 1
            if inited == CLIENTS:
                all_inited.set()
            await all_inited.wait()  # every session is open at the same time
            result = await client.ask(session, prompt, request_id=f"r{i}")
            assert result.final_reason == "stop"
            assert result.end["session_id"] == str(1000 + i)
            outputs[i] = result.text
            assert result.text == prompt

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(CLIENTS):
                nursery.start_soon(one_client, i)
            await all_inited.wait()
            peak = parse_prometheus(node.ctx.metrics.render())
            assert peak["llm_node_session_keys"] == CLIENTS
            assert peak["llm_node_connections_open"] == CLIENTS
            assert peak['llm_node_sessions{mode="encrypted"}'] == CLIENTS
        assert len(outputs) == CLIENTS
        assert len(set(addresses.values())) == CLIENTS  # a distinct client key each
        await node.wait_no_connections()
        async with httpx.AsyncClient(base_url=node.url) as http:
            response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    print("\n--- /metrics after the 200-session test ---\n" + text)
    after = parse_prometheus(text)
    assert after["llm_node_session_keys"] == 0
    assert after["llm_node_session_key_bytes"] == 0
    assert after["llm_node_connections_open"] == 0
    assert after['llm_node_sessions{mode="encrypted"}'] == 0
    assert after["llm_node_connections_total"] == CLIENTS
    assert after['llm_node_inits_accepted_total{mode="encrypted"}'] == CLIENTS
    assert after['llm_node_requests_total{finish_reason="stop"}'] == CLIENTS
    assert after["llm_node_init_seconds_count"] == CLIENTS
    expected_tokens = sum(6 + i % 17 for i in range(CLIENTS))  # word pieces of the prompts
    assert after["llm_node_tokens_total"] == expected_tokens
    assert after['llm_node_init_seconds_bucket{le="+Inf"}'] == CLIENTS
    assert not any(k.startswith("llm_node_errors_total") for k in after)
    assert node.drivers.peak == CLIENTS
    assert len(node.accounting.ended) == CLIENTS
