"""A client that disconnects mid-stream over a real socket: the backend's work is cancelled,
the connection's keys are zeroed, and a concurrent connection is unaffected.

Everything waits on events, not on time; the echo backend's per-piece delay only keeps the
stream going long enough for the client to leave in the middle of it.
"""

from __future__ import annotations

import time

import pytest
import trio

from node.inference.echo import EchoBackend
from tests.server._support import CancelProbe, ws_client
from tests.server.conftest import NodeFactory


@pytest.mark.parametrize("how", ["tcp-drop", "close-frame"])
async def test_disconnect_mid_stream_cancels_backend_and_wipes_keys(
    node_factory: NodeFactory, how: str
) -> None:
    probe = CancelProbe(EchoBackend(delay_s=0.002))
    node = await node_factory.start(backend=probe)
    long_a = "alpha " + " ".join(f"a{i}" for i in range(5000))  # ~10 s if not cancelled
    long_b = "bravo " + " ".join(f"b{i}" for i in range(300))
    with trio.fail_after(30):
        async with ws_client(node) as b_client:
            _, b_session = await b_client.init(node.host_public_key, session_id="2")
            async with ws_client(node) as a_client:
                _, a_session = await a_client.init(node.host_public_key, session_id="1")
                a_driver = next(d for d in node.ctx.drivers if "1" in d.state.sessions)
                a_key = a_driver.state.sessions["1"].key
                await a_client.send(a_session.message_frame({"prompt": long_a}))
                await b_client.send(b_session.message_frame({"prompt": long_b}))
                for _ in range(5):
                    await a_client.expect("encrypted_chunk")
                a_call = probe.call_for("alpha")
                assert a_call.outcome == "running"
                disconnected = time.perf_counter()
                if how == "tcp-drop":
                    assert a_client.raw_stream is not None
                    await a_client.raw_stream.aclose()
                else:
                    await a_client.ws.aclose()
                await a_call.done.wait()
                latency = (a_call.ended_perf or 0.0) - disconnected
            print(f"\ndisconnect ({how}) -> backend cancelled: {latency * 1000:.2f} ms")
            assert a_call.outcome == "cancelled"
            assert latency < 2.0  # generous; the figure is printed for the report
            await node.drivers.wait_until(lambda d: a_driver not in d)
            assert a_key is not None
            assert a_key.is_all_zero()
            assert a_driver.end_reason == "disconnect"
            # The other connection's stream completes, byte for byte.
            result = await b_client.collect(b_session)
            assert result.text == long_b
            assert result.final_reason == "stop"
            assert probe.call_for("bravo").outcome == "returned"
            assert len(node.held_keys()) == 1
    await node.wait_no_connections()
    assert node.held_keys() == []
