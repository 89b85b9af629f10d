"""Helpers of the security suite.

Two ways to attack the node:

* the sans-I/O :class:`ConnectionState`, fed frame text the way the driver feeds it
  (``decode`` -> ``receive``, or ``reject`` for a frame that does not decode): thousands of
  variants per second, used for the byte-by-byte sweeps;
* a real node (``tests.server._support``): over in-memory streams (``memory_client``, no
  socket and no real time, works under MockClock) or over TCP on 127.0.0.1 (``ws_client``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from node.crypto.errors import ErrorCode
from node.crypto.hostkey import HostKey
from node.protocol import (
    Action,
    ConnectionState,
    InitReplayCache,
    ProtocolConfig,
    ProtocolError,
    Send,
    SessionStarted,
    StartRequest,
    decode,
)
from node.protocol.messages import (
    EncryptedChunk,
    EncryptedResponse,
    ErrorMessage,
    OutboundMessage,
    SessionInitAck,
    StreamChunk,
    StreamEnd,
)
from tests.server._support import (
    DEV_HOST_KEY_HEX,
    DEV_HOST_PUBLIC_HEX,
    ClientSession,
    RunningNode,
    WsClient,
    build_node,
    init_frame,
    memory_client,
    ws_client,
)

__all__ = [
    "DEV_HOST_KEY_HEX",
    "DEV_HOST_PUBLIC_HEX",
    "ERROR_CODES",
    "REPLY_TYPES",
    "ClientSession",
    "FixedClock",
    "WsClient",
    "build_node",
    "check_reply",
    "flip",
    "init_frame",
    "memory_client",
    "memory_websocket",
    "outputs",
    "protocol_state",
    "receive_text",
    "refused_code",
    "with_payload",
    "ws_client",
]

ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)
# Every frame type the node may send (PROTOCOL.md sections 1, 3, 4 and 6).
REPLY_TYPES: Final = frozenset(
    {
        "connected",
        "pong",
        "session_init_ack",
        "encrypted_chunk",
        "encrypted_response",
        "stream_chunk",
        "stream_end",
        "error",
    }
)
# Outbound messages that mean "the attack got somewhere": an ack or any model output.
_PROGRESS: Final = (SessionInitAck, EncryptedChunk, EncryptedResponse, StreamChunk, StreamEnd)


class FixedClock:
    """A clock that only moves when the test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def protocol_state(
    host_key: HostKey,
    *,
    replay_cache: InitReplayCache | None = None,
    clock: FixedClock | None = None,
    **config: Any,
) -> ConnectionState:
    """A connection's protocol core with budgets large enough for a sweep.

    The error budget and the init rate limit are lifted (they are tested on their own) so
    that thousands of refused variants can go through one state.
    """
    clock = clock or FixedClock()
    config.setdefault("max_errors", 10**9)
    config.setdefault("init_burst", 10**9)
    return ConnectionState(
        host_key=host_key,
        replay_cache=replay_cache or InitReplayCache(window_s=900.0, clock=clock),
        clock=clock,
        config=ProtocolConfig(**config),
    )


def receive_text(state: ConnectionState, text: str | bytes) -> list[Action]:
    """What the driver does with one text frame: decode it, or reject it with its code."""
    try:
        message = decode(text)
    except ProtocolError as exc:
        return state.reject(exc)
    return state.receive(message)


def outputs(actions: list[Action]) -> list[OutboundMessage]:
    return [a.message for a in actions if isinstance(a, Send)]


def refused_code(actions: list[Action]) -> str:
    """Assert the actions are one ``error`` frame and nothing else of consequence: no ack,
    no started session or request, no chunk. Returns the error code."""
    assert not any(isinstance(a, SessionStarted | StartRequest) for a in actions), actions
    sent = outputs(actions)
    assert not any(isinstance(m, _PROGRESS) for m in sent), sent
    errors = [m for m in sent if isinstance(m, ErrorMessage)]
    assert len(errors) == 1, sent
    assert errors[0].code in ERROR_CODES
    assert errors[0].message
    return errors[0].code


def flip(data: bytes, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def with_payload(frame: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A deep copy of ``frame`` with payload fields replaced (bytes are written as hex)."""
    out = copy.deepcopy(dict(frame))
    for name, value in fields.items():
        out["payload"][name] = value.hex() if isinstance(value, bytes | bytearray) else value
    return out


def check_reply(text: str | bytes) -> dict[str, Any]:
    """One frame from the node: UTF-8 JSON object of a known type; errors carry a known
    code and a message. Returns the parsed frame."""
    assert isinstance(text, str), "the node sent a binary frame"
    frame = json.loads(text)
    assert isinstance(frame, dict), text
    assert frame.get("type") in REPLY_TYPES, text[:200]
    if frame["type"] == "error":
        assert frame.get("code") in ERROR_CODES, text[:200]
        assert isinstance(frame.get("message"), str)
        assert frame["message"]
    return frame


@asynccontextmanager
async def memory_websocket(node: RunningNode) -> AsyncIterator[WebSocketConnection]:
    """A raw client WebSocket wired to ``node`` through in-memory streams, with the
    ``connected`` greeting still unread (for ``node.client.open_session(websocket=...)``)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.server.handle_stream, server_stream)
        ws = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "127.0.0.1",
            "/v1/ws",
        )
        try:
            yield ws
        finally:
            await ws.aclose()
            await client_stream.aclose()
