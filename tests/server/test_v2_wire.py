"""Protocol v2 on a real node over real sockets (127.0.0.1, OS-chosen ports).

The node side: the ``/v2/ws`` driver, ``--protocols``, ``/v1/version``, metrics by
protocol, receipts marked v2, and every attack the issue lists: a replayed first
message, a signature made for another handshake, tampered / dropped / reordered /
duplicated records (each closes 1008 and wipes the connection's keys).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from coincurve import PrivateKey
from trio_websocket import ConnectionClosed, wrap_client_stream

from node.client import open_session
from node.client.errors import ConnectFailed, DowngradeRefused
from node.crypto.curve import address_of
from node.protocol.v2 import (
    Chunk,
    ClientConnectionV2,
    Closed,
    End,
    Pong,
    SessionAccepted,
)
from node.protocol.v2.session import sign_session
from tests.server._support import (
    DEV_HOST_PUBLIC_HEX,
    UPGRADE_REQUEST,
    GatedBackend,
    RunningNode,
    build_node,
    parse_prometheus,
)
from tests.server._v2 import all_zero, gauges, raw_v2, terms
from tests.server.conftest import NodeFactory

GUARD_S = 20
HOST_PUB = bytes.fromhex(DEV_HOST_PUBLIC_HEX)
CLIENT = PrivateKey(bytes.fromhex("c3" * 32))


def metrics(node: RunningNode) -> dict[str, float]:
    return parse_prometheus(node.ctx.metrics.render())


async def test_full_session_through_node_client(node: RunningNode) -> None:
    with trio.fail_after(GUARD_S):
        async with open_session(node.url, model="echo", job_id=9, client_key=CLIENT) as session:
            assert session.protocol == "v2"
            pieces = [p async for p in session.stream("hello wide v2 world")]
            second = await session.complete("and again")
            assert await session.ping() >= 0
            live = gauges(node)
            assert live['llm_node_protocol_session_keys{protocol="v2"}'] == 1
            assert live['llm_node_protocol_connections_open{protocol="v2"}'] == 1
            assert live["llm_node_session_keys"] == 1
            assert live["llm_node_session_key_bytes"] > 0
        await node.wait_no_connections()
    assert "".join(pieces) == "hello wide v2 world"
    assert second.text == "and again"
    assert second.finish_reason == "stop"
    assert second.usage is not None
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (2, 2)
    assert session.client_address == address_of(CLIENT.public_key)
    assert session.keys_held == 0
    # Keys wiped: every gauge is back to 0 once the connection closed.
    assert all_zero(node), gauges(node)
    m = metrics(node)
    assert m['llm_node_noise_handshakes_total{result="accepted"}'] == 1
    # the client's goodbye ends the session; it is no refused handshake
    assert 'llm_node_noise_handshakes_total{result="refused"}' not in m
    assert m['llm_node_protocol_connections_total{protocol="v2"}'] == 1
    assert m['llm_node_requests_total{finish_reason="stop"}'] == 2
    assert m["llm_node_noise_handshake_seconds_count"] == 1
    # The ledger seam sees one v2 session: two requests, then its end (client goodbye).
    [started] = node.accounting.started
    assert started.protocol == "v2"
    assert started.job_id == 9
    assert started.client_address == session.client_address
    assert [r.finish_reason for _, _, r in node.accounting.finished] == ["stop", "stop"]
    [(ended, reason)] = node.accounting.ended
    assert ended is started
    assert reason == "closed"


async def test_version_lists_protocols(node_factory: NodeFactory) -> None:
    both = await node_factory.start()
    only_v1 = await node_factory.start(protocols=("v1",))
    only_v2 = await node_factory.start(protocols=("v2",))
    no_key = await node_factory.start(host_key=None)
    with trio.fail_after(GUARD_S):
        async with httpx.AsyncClient() as http:
            got = {
                name: (await http.get(n.url + "/v1/version")).json()["protocols"]
                for name, n in [("both", both), ("v1", only_v1), ("v2", only_v2), ("nokey", no_key)]
            }
        refused = await _upgrade(no_key.port or 0, "/v2/ws")
    assert got == {"both": ["v1", "v2"], "v1": ["v1"], "v2": ["v2"], "nokey": ["v1"]}
    assert refused.startswith(b"HTTP/1.1 403")
    assert b"protocol v2 needs a host key and this node has none" in refused


async def _upgrade(port: int, path: str) -> bytes:
    request = UPGRADE_REQUEST.replace(b"/v1/ws", path.encode())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        for _ in range(100):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


async def test_protocols_v2_refuses_v1(node_factory: NodeFactory) -> None:
    node = await node_factory.start(protocols=("v2",))
    with trio.fail_after(GUARD_S):
        answer = await _upgrade(node.port or 0, "/v1/ws")
        with pytest.raises(ConnectFailed, match="does not serve protocol v1"):
            async with open_session(
                node.url, model="echo", job_id=1, protocol="v1", host_public_key=HOST_PUB
            ):
                pass
        # auto finds v2 on this node and uses it
        async with open_session(
            node.url, model="echo", job_id=1, host_public_key=HOST_PUB
        ) as session:
            assert session.protocol == "v2"
            assert (await session.complete("fine")).text == "fine"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    error = json.loads(body)["error"]
    assert "protocol v1 is disabled on this node" in error
    assert "v2 at /v2/ws" in error
    assert metrics(node)['llm_node_protocol_refused_total{protocol="v1"}'] == 1


async def test_client_pinned_to_v2_never_downgrades(
    node_factory: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = await node_factory.start(protocols=("v1",))
    with trio.fail_after(GUARD_S):
        answer = await _upgrade(node.port or 0, "/v2/ws")
        with pytest.raises(DowngradeRefused, match="does not fall back"):
            async with open_session(
                node.url, model="echo", job_id=1, protocol="v2", host_public_key=HOST_PUB
            ):
                pass
        assert not node.accounting.started  # nothing reached the node's v1 path either
        # auto falls back to v1, with a warning
        with caplog.at_level("WARNING", logger="node.client"):
            async with open_session(
                node.url, model="echo", job_id=1, host_public_key=HOST_PUB
            ) as session:
                assert session.protocol == "v1"
                assert (await session.complete("old way")).text == "old way"
    assert any("falling back to protocol v1" in r.getMessage() for r in caplog.records)
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"protocol v2 is disabled on this node" in answer
    assert metrics(node)['llm_node_protocol_refused_total{protocol="v2"}'] == 1


async def test_replayed_first_message_gets_nowhere(node: RunningNode) -> None:
    port = node.port or 0
    with trio.fail_after(GUARD_S):
        async with raw_v2(port, HOST_PUB) as honest:
            msg1 = await honest.handshake()
            session_record = honest.conn.session(terms(), honest.client_key)
            await honest.send(session_record)
            (ack,) = await honest.events()
            assert isinstance(ack, SessionAccepted)
        # The attacker replays message 1 and the session record on a new connection.
        async with raw_v2(port, HOST_PUB) as attacker:
            await attacker.send(msg1)
            msg2 = await attacker.recv()
            assert len(msg2) >= 33 + 16  # the node answers (it cannot tell) ...
            await attacker.send(session_record)
            code, after = await attacker.wait_closed()
    # ... but its answer is under a fresh ephemeral key: the old records fail there.
    assert code == 1008
    assert after == []
    await node.wait_no_connections()
    assert len(node.accounting.started) == 1  # only the honest session
    assert metrics(node)["llm_node_record_auth_failures_total"] == 1
    assert all_zero(node)


async def test_signature_for_another_handshake_is_refused(node: RunningNode) -> None:
    port = node.port or 0
    key = PrivateKey()
    with trio.fail_after(GUARD_S):
        async with raw_v2(port, HOST_PUB) as first:
            await first.handshake()
            assert first.conn.handshake_hash is not None
            signature = sign_session(first.conn.handshake_hash, terms(), key)
        async with raw_v2(port, HOST_PUB) as second:
            await second.handshake()
            await second.send(
                second.conn.signed_session(terms(), address_of(key.public_key), signature)
            )
            (error,) = await second.events()
            code, _ = await second.wait_closed()
    assert type(error).__name__ == "ErrorReceived"
    assert error.code == "SESSION_AUTH_DENIED"  # type: ignore[union-attr]
    assert code == 1008
    assert not node.accounting.started
    await node.wait_no_connections()
    m = metrics(node)
    assert 'llm_node_noise_handshakes_total{result="accepted"}' not in m
    assert m['llm_node_noise_handshakes_total{result="refused"}'] == 1
    assert all_zero(node)


@pytest.mark.parametrize("attack", ["tampered", "dropped", "reordered", "duplicated"])
async def test_bad_client_records_close_1008_and_wipe(node: RunningNode, attack: str) -> None:
    port = node.port or 0
    with trio.fail_after(GUARD_S):
        async with raw_v2(port, HOST_PUB) as client:
            await client.open_session()
            assert metrics(node)['llm_node_protocol_session_keys{protocol="v2"}'] == 1
            first, second = client.conn.ping(), client.conn.ping()
            if attack == "tampered":
                sent = [first[:-1] + bytes((first[-1] ^ 1,))]
            elif attack == "dropped":
                sent = [second]
            elif attack == "reordered":
                sent = [second, first]
            else:
                sent = [first, first]
            for frame in sent:
                await client.send(frame)
            code, frames = await client.wait_closed()
    assert code == 1008
    # Only a duplicate gets one answer (to the genuine first copy); nothing after a failure.
    pongs = [client_events for client_events in frames]
    assert len(pongs) == (1 if attack == "duplicated" else 0)
    await node.wait_no_connections()
    assert metrics(node)["llm_node_record_auth_failures_total"] == 1
    assert all_zero(node), gauges(node)
    [(_, reason)] = node.accounting.ended
    assert reason == "error"


async def test_text_frames_are_refused(node: RunningNode) -> None:
    port = node.port or 0
    with trio.fail_after(GUARD_S):
        async with raw_v2(port, HOST_PUB) as before:
            await before.send('{"type":"ping"}')
            code_before, _ = await before.wait_closed()
        async with raw_v2(port, HOST_PUB) as after:
            await after.open_session()
            await after.send('{"type":"ping"}')
            code_after, _ = await after.wait_closed()
    assert (code_before, code_after) == (1003, 1008)
    await node.wait_no_connections()
    assert all_zero(node)


async def test_ping_pong_and_padding(node: RunningNode) -> None:
    with trio.fail_after(GUARD_S):
        async with raw_v2(node.port or 0, HOST_PUB, padding=64) as client:
            await client.open_session()
            await client.send(client.conn.ping())
            frame = await client.recv()
            assert (len(frame) - 16) % 64 == 0
            assert client.conn.receive(frame) == [Pong()]


async def test_handshake_deadline(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node()
    with trio.fail_after(300):
        for stage in ("nothing", "message 1"):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.server.handle_stream, server_stream)
                ws = await wrap_client_stream(
                    nursery,
                    client_stream,  # type: ignore[arg-type]
                    "127.0.0.1",
                    "/v2/ws",
                )
                started = trio.current_time()
                if stage == "message 1":
                    await trio.sleep(9)  # late but in time; the record is due 10 s after it
                    conn = ClientConnectionV2(HOST_PUB)
                    await ws.send_message(conn.start())
                    conn.receive(await ws.get_message())
                    conn.wipe()
                    started = trio.current_time()
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                waited = trio.current_time() - started
                await client_stream.aclose()
            assert info.value.reason is not None
            assert info.value.reason.code == 1008
            assert 10.0 <= waited < 10.5
    await node.wait_no_connections()
    assert metrics(node)['llm_node_noise_handshakes_total{result="timeout"}'] == 2
    assert all_zero(node)


async def test_cancel_through_node_client(node_factory: NodeFactory) -> None:
    backend = GatedBackend()
    node = await node_factory.start(backend=backend)
    with trio.fail_after(GUARD_S):
        async with open_session(
            node.url, model="gated", job_id=3, host_public_key=HOST_PUB, protocol="v2"
        ) as session:
            stream = session.stream("anything")
            assert await stream.__anext__() == "first"
            await session.cancel()
            rest = [p async for p in stream]
            assert stream.completion is not None
            assert stream.completion.finish_reason == "cancelled"
            assert (await session.ping()) >= 0  # the session goes on
    assert rest == []
    assert backend.cancelled.is_set()
    [(_, request_id, result)] = node.accounting.finished
    assert request_id == stream.request_id
    assert (result.finish_reason, result.completion_tokens) == ("cancelled", 1)


async def test_shutdown_mid_stream_ends_the_answer_then_says_goodbye(
    node_factory: NodeFactory,
) -> None:
    node = await node_factory.start(backend=GatedBackend())
    with trio.fail_after(GUARD_S):
        async with raw_v2(node.port or 0, HOST_PUB) as client:
            await client.open_session(terms(model="gated"))
            await client.send(client.conn.request("r1", prompt="x"))
            (chunk,) = await client.events()
            assert isinstance(chunk, Chunk)
            node.shutdown.set()
            (end,) = await client.events()
            (goodbye,) = await client.events()
            code, rest = await client.wait_closed()
    assert isinstance(end, End)
    assert (end.request_id, end.finish_reason) == ("r1", "cancelled")
    assert isinstance(goodbye, Closed)
    assert goodbye.reason == "server shutdown"
    assert (code, rest) == (1001, [])
    [(_, reason)] = node.accounting.ended
    assert reason == "shutdown"


async def test_idle_timeout_says_goodbye(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node(idle_timeout_s=30.0)
    with trio.fail_after(300):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.server.handle_stream, server_stream)
            ws = await wrap_client_stream(
                nursery,
                client_stream,  # type: ignore[arg-type]
                "127.0.0.1",
                "/v2/ws",
            )
            conn = ClientConnectionV2(HOST_PUB)
            await ws.send_message(conn.start())
            conn.receive(await ws.get_message())
            await ws.send_message(conn.session(terms(), PrivateKey()))
            conn.receive(await ws.get_message())
            opened = trio.current_time()
            (goodbye,) = conn.receive(await ws.get_message())
            idle = trio.current_time() - opened
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            await client_stream.aclose()
    assert isinstance(goodbye, Closed)
    assert goodbye.reason == "idle timeout"
    assert 30.0 <= idle < 30.5
    assert info.value.reason is not None
    assert info.value.reason.code == 1000
    await node.wait_no_connections()
    [(_, reason)] = node.accounting.ended
    assert reason == "idle_timeout"
    assert all_zero(node)


async def test_v2_sessions_take_the_allowances_and_the_storage_admission(
    node_factory: NodeFactory,
) -> None:
    """Protocol v2 sessions are bounded like v1's: the network and client address
    allowances, and ``--on-ledger-failure refuse`` while the ledger fails."""
    from node.client.errors import NodeErrorResponse

    node = await node_factory.start(address_init_burst=1, address_init_rate=0.0)
    with trio.fail_after(GUARD_S):
        async with open_session(node.url, model="echo", job_id=1, client_key=CLIENT) as session:
            assert session.protocol == "v2"
        with pytest.raises(NodeErrorResponse) as refused:
            async with open_session(node.url, model="echo", job_id=2, client_key=CLIENT):
                pass
        assert refused.value.code == "RATE_LIMITED"
    failing = await node_factory.start(on_ledger_failure="refuse")
    failing.ctx.storage.failed("ledger")
    with trio.fail_after(GUARD_S):
        with pytest.raises(NodeErrorResponse) as refused:
            async with open_session(failing.url, model="echo", job_id=3, client_key=CLIENT):
                pass
        assert refused.value.code == "STORAGE_UNAVAILABLE"
        failing.ctx.storage.recovered("ledger")
        async with open_session(failing.url, model="echo", job_id=4, client_key=CLIENT) as ok:
            assert (await ok.complete("fine")).text == "fine"


async def test_a_bug_closes_only_its_v2_connection(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.protocol.v2 import ServerConnectionV2

    real_receive = ServerConnectionV2.receive
    calls = {"n": 0}

    def receive(self: ServerConnectionV2, frame: bytes | bytearray) -> Any:
        if self.session is not None and self.session.job_id == 666:
            calls["n"] += 1
            raise RuntimeError("a bug in the v2 core")
        return real_receive(self, frame)

    monkeypatch.setattr(ServerConnectionV2, "receive", receive)
    port = node.port or 0
    with trio.fail_after(GUARD_S):
        async with raw_v2(port, HOST_PUB) as bystander, raw_v2(port, HOST_PUB) as victim:
            await bystander.open_session()
            await victim.open_session(terms(job_id=666))
            await victim.send(victim.conn.ping())
            code, frames = await victim.wait_closed()
            await bystander.send(bystander.conn.ping())
            assert await bystander.events() == [Pong()]
    assert (code, frames) == (1011, [])
    assert calls["n"] == 1
    assert node.ctx.metrics.errors["INTERNAL_ERROR"] == 1
    await node.wait_no_connections()
    assert all_zero(node)
