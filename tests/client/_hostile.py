"""A scripted, possibly hostile node for the client tests.

It speaks just enough of the protocol to get a client into a streaming request: it sends
``connected``, really opens the client's ``encrypted_session_init`` with its host key
(``open_session_init``), acks it, decrypts each ``encrypted_message`` with the session key,
and then hands an :class:`Exchange` to a script that decides what the "node" answers:
honest frames, or reordered, duplicated, dropped, tampered, re-keyed, foreign frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
    wrap_server_stream,
)

from node.crypto import HostKey, aead, open_session_init
from node.protocol.messages import (
    ChunkPayload,
    Connected,
    EncryptedChunk,
    EncryptedMessage,
    EncryptedResponse,
    EncryptedSessionInit,
    ErrorMessage,
    Ping,
    Pong,
    SessionInitAck,
    StreamCancel,
    StreamChunk,
    StreamEnd,
    Usage,
    decode,
    encode,
)

RESPONSE_AAD = b"encrypted_response_final"


@attrs.define
class Exchange:
    """One request the hostile node received, with helpers to build its answer."""

    ws: WebSocketConnection
    key: bytes
    session_id: str
    request_id: str | int | None
    request: dict[str, Any]
    cancels: list[StreamCancel]

    def chunk(
        self,
        index: int,
        text: str,
        *,
        final: bool = False,
        tokens: int | None = None,
        aad: bytes | None = None,
        payload_index: int | None = None,
        key: bytes | None = None,
        session_id: str | None = None,
        request_id: str | int | None = None,
        tamper: bool = False,
    ) -> str:
        nonce = os.urandom(24)
        aad = b"chunk_%d" % index if aad is None else aad
        sealed = aead.seal(self.key if key is None else key, nonce, text.encode(), aad)
        if tamper:
            sealed = bytes([sealed[0] ^ 0x01]) + sealed[1:]
        return encode(
            EncryptedChunk(
                tokens=(0 if final else 1) if tokens is None else tokens,
                payload=ChunkPayload(
                    sealed, nonce, aad, index if payload_index is None else payload_index
                ),
                id=self.request_id if request_id is None else request_id,
                session_id=self.session_id if session_id is None else session_id,
                final=final,
            )
        )

    def final(self, index: int, **kw: Any) -> str:
        return self.chunk(index, "", final=True, **kw)

    def response(
        self,
        reason: str = "stop",
        *,
        key: bytes | None = None,
        aad: bytes = RESPONSE_AAD,
        tamper: bool = False,
    ) -> str:
        nonce = os.urandom(24)
        sealed = aead.seal(self.key if key is None else key, nonce, reason.encode(), aad)
        if tamper:
            sealed = bytes([sealed[0] ^ 0x01]) + sealed[1:]
        return encode(
            EncryptedResponse(ChunkPayload(sealed, nonce, aad), self.request_id, self.session_id)
        )

    def end(
        self,
        finish_reason: str = "stop",
        *,
        reason: str | None = None,
        completion: int = 0,
        session_id: str | None = None,
    ) -> str:
        end_reason = {"cancelled": "cancelled", "error": "error"}.get(finish_reason, "complete")
        return encode(
            StreamEnd(
                reason=end_reason if reason is None else reason,
                tokens_used=completion,
                finish_reason=finish_reason,
                usage=Usage(1, completion, 1 + completion),
                id=self.request_id,
                session_id=self.session_id if session_id is None else session_id,
            )
        )

    def honest_tail(self, index: int, reason: str = "stop", completion: int = 0) -> list[str]:
        """The final chunk, encrypted_response and stream_end after ``index`` chunks."""
        return [self.final(index), self.response(reason), self.end(reason, completion=completion)]

    def plain_chunk(self, text: str) -> str:
        return encode(StreamChunk(text, 1, self.request_id, self.session_id))

    def error(self, code: str, message: str) -> str:
        return encode(ErrorMessage(code, message, self.request_id, self.session_id))

    async def send(self, *frames: str) -> None:
        for frame in frames:
            await self.ws.send_message(frame)

    async def close(self) -> None:
        await self.ws.aclose()


Script = Callable[[Exchange], Awaitable[None]]


async def honest(ex: Exchange) -> None:
    """Echo the prompt back word by word, the way the real node would."""
    words = ex.request["prompt"].split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    frames = [ex.chunk(i, p) for i, p in enumerate(pieces)]
    await ex.send(*frames, *ex.honest_tail(len(pieces), completion=len(pieces)))


class HostileNode:
    """Serves one script per request; records what the client sent."""

    def __init__(
        self,
        script: Script = honest,
        *,
        host_key: HostKey | None = None,
        reinit_ack_delay_s: float = 0.0,
        ack_client_address: Any = "recovered",
    ) -> None:
        self.script = script
        # What the acks name as the client: the recovered address, or this value.
        self.ack_client_address = ack_client_address
        self.reinit_ack_delay_s = reinit_ack_delay_s
        self.host_key = host_key if host_key is not None else HostKey.generate()
        self.received: list[str] = []
        self.cancels: list[StreamCancel] = []
        self.session_keys: list[bytes] = []
        self.client_addresses: list[str] = []
        self.requests: list[dict[str, Any]] = []

    async def handle_request(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        await self.handle(ws)

    async def handle(self, ws: WebSocketConnection) -> None:
        try:
            await ws.send_message(encode(Connected("hostile test node")))
            key: bytes | None = None
            session_id = ""
            while True:
                text = await ws.get_message()
                assert isinstance(text, str)
                self.received.append(text)
                message = decode(text)
                if isinstance(message, EncryptedSessionInit):
                    data = open_session_init(self.host_key, message.payload)
                    key = data.session_key.reveal()
                    data.session_key.wipe()
                    session_id = message.session_id
                    self.session_keys.append(key)
                    self.client_addresses.append(data.client_address)
                    if len(self.session_keys) > 1 and self.reinit_ack_delay_s:
                        await trio.sleep(self.reinit_ack_delay_s)
                    await ws.send_message(
                        encode(
                            SessionInitAck(
                                session_id=message.session_id,
                                job_id=data.job_id,
                                chain_id=message.chain_id,
                                message="ok",
                                client_address=data.client_address
                                if self.ack_client_address == "recovered"
                                else self.ack_client_address,
                                id=message.id,
                            )
                        )
                    )
                elif isinstance(message, EncryptedMessage):
                    assert key is not None
                    p = message.payload
                    request = json.loads(aead.open(key, p.nonce, p.ciphertext, p.aad))
                    self.requests.append(request)
                    await self.script(
                        Exchange(ws, key, session_id, message.id, request, self.cancels)
                    )
                elif isinstance(message, StreamCancel):
                    self.cancels.append(message)
                elif isinstance(message, Ping):
                    await ws.send_message(encode(Pong(message.id)))
        except ConnectionClosed:
            return


@asynccontextmanager
async def serve_hostile(node: HostileNode) -> AsyncIterator[str]:
    """Serve ``node`` on 127.0.0.1 (port 0); yields its ws:// URL."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, node.handle_request, "127.0.0.1", 0, None)
        )
        yield f"ws://127.0.0.1:{server.port}/v1/ws"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def memory_websocket(node: HostileNode) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket connected to ``node`` over in-memory streams (for MockClock)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await wrap_server_stream(nursery, server_stream)
            await node.handle(await request.accept())

        nursery.start_soon(serve)
        ws = await wrap_client_stream(nursery, client_stream, "127.0.0.1", "/v1/ws")
        yield ws
        nursery.cancel_scope.cancel()
