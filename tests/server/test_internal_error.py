"""A bug while handling one frame ends that connection with INTERNAL_ERROR / 1011 only."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from node.crypto.hostkey import HostKey
from node.protocol.connection import ConnectionState
from node.protocol.messages import Ping
from tests.support.wire import SDK_HOST_KEY, running_node, wire_client


async def test_a_bug_closes_only_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    real_receive = ConnectionState.receive

    def receive(self: ConnectionState, message: Any) -> Any:
        if isinstance(message, Ping) and message.id == "boom":
            raise RuntimeError("a bug in the protocol core")
        return real_receive(self, message)

    monkeypatch.setattr(ConnectionState, "receive", receive)
    host = HostKey.parse(SDK_HOST_KEY)
    async with running_node(host_key=host) as (ctx, url):
        with trio.fail_after(20):
            async with wire_client(url) as bystander, wire_client(url) as victim:
                await bystander.init_encrypted(host.public_key)
                await victim.init_encrypted(host.public_key, session_id="2", job_id=2)
                keys = {s.session_id: s.key for d in ctx.drivers for s in d.state.sessions.values()}
                await victim.send({"type": "ping", "id": "boom"})
                reply = await victim.recv()
                assert reply["code"] == "INTERNAL_ERROR"
                assert "bug" not in reply["message"]  # no internals on the wire
                with pytest.raises(ConnectionClosed) as closed:
                    await victim.recv()
                assert closed.value.reason.code == 1011
                text, _ = await bystander.ask_encrypted("still here")
                assert text == "still here"
                victim_key, bystander_key = keys["2"], keys["1"]
                assert victim_key is not None
                assert victim_key.is_all_zero()
                assert bystander_key is not None
                assert not bystander_key.is_all_zero()
    assert ctx.metrics.errors["INTERNAL_ERROR"] == 1
