"""A small raw-protocol client and in-process node for integration tests.

It speaks the wire protocol directly (no node.client), so server and settlement tests
do not depend on the client library they may be checking.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from coincurve import PrivateKey
from trio_websocket import WebSocketConnection, wrap_client_stream

from node.config import NodeConfig
from node.crypto import aead, seal_session_init
from node.crypto.hostkey import HostKey
from node.inference.base import Backend
from node.inference.echo import EchoBackend
from node.protocol.replay import InitReplayCache, ReplayCache
from node.server.app import NodeServer
from node.server.context import Accounting, NoAccounting, NodeContext

SDK_HOST_KEY = "0xe7855c0ea54ccca55126d40f97d90868b2a73bad0363e92ccdec0c4fbd6c0ce2"


@asynccontextmanager
async def running_node(
    *,
    host_key: HostKey | None = None,
    backend: Backend | None = None,
    accounting: Accounting | None = None,
    config: NodeConfig | None = None,
    replay_cache: ReplayCache | None = None,
) -> AsyncIterator[tuple[NodeContext, str]]:
    """A node on 127.0.0.1 (OS-chosen port) in this Trio run; yields (ctx, ws_url)."""
    cfg = config or NodeConfig(port=0)
    if replay_cache is None:
        replay_cache = InitReplayCache(window_s=cfg.replay_window_s, clock=trio.current_time)
    ctx = NodeContext(
        config=cfg,
        host_key=host_key,
        backend=backend or EchoBackend(),
        replay_cache=replay_cache,
        accounting=accounting or NoAccounting(),
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(NodeServer(ctx).serve, shutdown)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield ctx, f"ws://127.0.0.1:{port}/v1/ws"
        finally:
            shutdown.set()


class WireClient:
    """Speaks the protocol frame by frame; keeps the session key to check chunks."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.key: bytes | None = None
        self.session_id = "1"
        self.next_index = 0
        self.client_key = PrivateKey()

    async def recv(self) -> dict[str, Any]:
        frame = json.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        return frame

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(obj))

    async def init_encrypted(
        self,
        host_public_key: bytes,
        *,
        session_id: str = "1",
        job_id: int = 1,
        price: int = 0,
        model: str = "echo",
    ) -> dict[str, Any]:
        self.key = os.urandom(32)
        self.session_id = session_id
        self.next_index = 0
        payload = seal_session_init(
            host_public_key,
            self.client_key,
            self.key,
            job_id=job_id,
            model_name=model,
            price_per_token=price,
        )
        await self.send(
            {
                "type": "encrypted_session_init",
                "session_id": session_id,
                "job_id": str(job_id),
                "chain_id": 84532,
                "payload": payload,
            }
        )
        return await self.recv()

    async def ask_encrypted(self, prompt: str, request_id: str = "r") -> tuple[str, dict[str, Any]]:
        """Send one encrypted prompt; return (decrypted text, stream_end frame)."""
        return await self.ask_encrypted_json(
            {"prompt": prompt, "model": "echo", "stream": True}, request_id
        )

    async def ask_encrypted_json(
        self, request: dict[str, Any], request_id: str = "r"
    ) -> tuple[str, dict[str, Any]]:
        """Send one encrypted request object; return (decrypted text, stream_end frame)."""
        assert self.key is not None
        nonce = os.urandom(24)
        aad = b"message_%d" % self.next_index
        self.next_index += 1
        body = json.dumps(request).encode()
        await self.send(
            {
                "type": "encrypted_message",
                "session_id": self.session_id,
                "id": request_id,
                "payload": {
                    "ciphertextHex": aead.seal(self.key, nonce, body, aad).hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": aad.hex(),
                },
            }
        )
        text = ""
        index = 0
        while True:
            frame = await self.recv()
            kind = frame["type"]
            if kind == "encrypted_chunk":
                p = frame["payload"]
                assert bytes.fromhex(p["aadHex"]) == b"chunk_%d" % index
                index += 1
                text += aead.open(
                    self.key,
                    bytes.fromhex(p["nonceHex"]),
                    bytes.fromhex(p["ciphertextHex"]),
                    bytes.fromhex(p["aadHex"]),
                ).decode()
            elif kind == "stream_end":
                return text, frame
            elif kind == "error":
                raise AssertionError(f"node error {frame['code']}: {frame['message']}")

    async def ask_plaintext(self, prompt: str, request_id: str = "p") -> tuple[str, dict[str, Any]]:
        await self.send({"type": "prompt", "prompt": prompt, "id": request_id})
        text = ""
        while True:
            frame = await self.recv()
            if frame["type"] == "stream_chunk":
                text += frame["content"]
            elif frame["type"] == "stream_end":
                return text, frame
            elif frame["type"] == "error":
                raise AssertionError(f"node error {frame['code']}: {frame['message']}")


@asynccontextmanager
async def wire_client(url: str) -> AsyncIterator[WireClient]:
    """A connected client. We own the TCP stream so it is closed even when the node died
    (trio-websocket skips closing it after an aborted connection)."""
    parsed = urlsplit(url)
    assert parsed.hostname is not None
    assert parsed.port is not None
    stream = await trio.open_tcp_stream(parsed.hostname, parsed.port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, parsed.hostname, parsed.path)
        client = WireClient(ws)
        connected = await client.recv()
        assert connected["type"] == "connected"
        try:
            yield client
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()
