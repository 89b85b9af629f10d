"""Test helpers for protocol v2 over real sockets: a raw v2 client and a hostile relay.

``raw_v2`` opens ``/v2/ws`` on a node over TCP (127.0.0.1) and hands back a
:class:`RawV2` that drives :class:`ClientConnectionV2` by hand, so a test can send
exactly the bytes it wants (a replayed message 1, a record signed for another
handshake, records out of order). ``Relay`` is a WebSocket man in the middle between a
client and the node: it forwards every message, records them (a transcript), and lets a
test drop, duplicate, reorder, tamper with or cut the traffic.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

import attrs
import trio
from coincurve import PrivateKey
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
)

from node.protocol.v2 import ClientConnectionV2, Event, SessionTerms
from tests.server._support import RECV_TIMEOUT_S, RunningNode, parse_prometheus

V2_PATH: Final = "/v2/ws"
MAX_FRAMES: Final = 10_000


def terms(job_id: int = 7, model: str = "echo", price: int = 3) -> SessionTerms:
    return SessionTerms(job_id=job_id, model=model, price_per_token=price, chain_id=84532)


def gauges(node: RunningNode) -> dict[str, float]:
    """The live-state gauges of the node's /metrics (keys of both protocols)."""
    samples = parse_prometheus(node.ctx.metrics.render())
    return {
        k: v
        for k, v in samples.items()
        if k.startswith(
            (
                "llm_node_session_keys",
                "llm_node_session_key_bytes",
                "llm_node_protocol_session_keys",
                "llm_node_protocol_connections_open",
                "llm_node_connections_open",
            )
        )
    }


def all_zero(node: RunningNode) -> bool:
    return all(v == 0 for v in gauges(node).values())


@attrs.define(eq=False)
class RawV2:
    """One raw ``/v2/ws`` connection and the test's own protocol core for it."""

    ws: WebSocketConnection
    stream: trio.SocketStream
    conn: ClientConnectionV2
    client_key: PrivateKey = attrs.field(factory=PrivateKey)

    async def send(self, frame: bytes | str) -> None:
        await self.ws.send_message(frame)

    async def recv(self, within_s: float = RECV_TIMEOUT_S) -> bytes:
        with trio.fail_after(within_s):
            frame = await self.ws.get_message()
        assert isinstance(frame, bytes), "the node sent a text frame on /v2/ws"
        return frame

    async def events(self, within_s: float = RECV_TIMEOUT_S) -> list[Event]:
        return self.conn.receive(await self.recv(within_s))

    async def handshake(self) -> bytes:
        """Messages 1 and 2; returns message 1 as sent."""
        msg1 = self.conn.start()
        await self.send(msg1)
        await self.events()
        return msg1

    async def open_session(self, session_terms: SessionTerms | None = None) -> None:
        await self.handshake()
        await self.send(self.conn.session(session_terms or terms(), self.client_key))
        (ack,) = await self.events()
        assert type(ack).__name__ == "SessionAccepted", ack

    async def wait_closed(self, within_s: float = RECV_TIMEOUT_S) -> tuple[int, list[bytes]]:
        """Read until the node closes: (close code, frames received before)."""
        frames: list[bytes] = []
        with trio.fail_after(within_s):
            for _ in range(MAX_FRAMES):
                try:
                    frame = await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    break
                assert isinstance(frame, bytes)
                frames.append(frame)
            else:
                raise AssertionError("the node never closed the connection")
        assert reason is not None
        return reason.code, frames


@asynccontextmanager
async def raw_v2(
    port: int, host_public_key: bytes, *, padding: int = 0, path: str = V2_PATH
) -> AsyncIterator[RawV2]:
    with trio.fail_after(RECV_TIMEOUT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(RECV_TIMEOUT_S):
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
            raw = RawV2(ws, stream, ClientConnectionV2(host_public_key, padding=padding))
            try:
                yield raw
            finally:
                raw.conn.wipe()
                with trio.move_on_after(RECV_TIMEOUT_S):
                    await ws.aclose()
                await stream.aclose()
    finally:
        await stream.aclose()


# A hook sees each message of one direction with its index in that direction and returns
# the messages to forward instead (none to drop, several to duplicate or release held ones).
Hook = Callable[[int, bytes | str], list[bytes | str]]


def forward(_: int, message: bytes | str) -> list[bytes | str]:
    return [message]


@attrs.define(eq=False)
class Relay:
    """A WebSocket man in the middle: client <-> relay <-> node ``/v2/ws``."""

    node_port: int
    up: Hook = forward  # client -> node
    down: Hook = forward  # node -> client
    path: str = V2_PATH
    port: int = 0
    transcript: list[tuple[str, bytes | str]] = attrs.field(factory=list)
    cut: trio.Event = attrs.field(factory=trio.Event)  # set to drop both connections

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    async def _pump(
        self, source: WebSocketConnection, sink: WebSocketConnection, direction: str, hook: Hook
    ) -> None:
        for index in range(MAX_FRAMES):
            try:
                message = await source.get_message()
            except ConnectionClosed:
                return
            self.transcript.append((direction, message))
            for out in hook(index, message):
                try:
                    await sink.send_message(out)
                except ConnectionClosed:
                    return

    async def _handle(self, request: WebSocketRequest) -> None:
        client = await request.accept()
        stream = await trio.open_tcp_stream("127.0.0.1", self.node_port)
        try:
            async with trio.open_nursery() as nursery:
                node = await wrap_client_stream(nursery, stream, "127.0.0.1", self.path)

                async def pump_then_stop(
                    source: WebSocketConnection,
                    sink: WebSocketConnection,
                    direction: str,
                    hook: Hook,
                ) -> None:
                    await self._pump(source, sink, direction, hook)
                    nursery.cancel_scope.cancel()

                async def cutter() -> None:
                    await self.cut.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump_then_stop, client, node, "up", self.up)
                nursery.start_soon(pump_then_stop, node, client, "down", self.down)
                nursery.start_soon(cutter)
        finally:
            await stream.aclose()
            # Abrupt on the client's side when cut: no close frame, as a network cut.
            if self.cut.is_set():
                await client._stream.aclose()  # type: ignore[attr-defined]
            else:
                with trio.move_on_after(1):
                    await client.aclose()

    def frames(self, direction: str) -> list[bytes]:
        return [m for d, m in self.transcript if d == direction and isinstance(m, bytes)]


@asynccontextmanager
async def relay(node_port: int, **hooks: Any) -> AsyncIterator[Relay]:
    r = Relay(node_port, **hooks)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, r._handle, "127.0.0.1", 0, None)  # OS-chosen port
        )
        r.port = server.port
        yield r
        nursery.cancel_scope.cancel()


def flip_last_byte(message: bytes | str) -> bytes | str:
    assert isinstance(message, bytes)
    return message[:-1] + bytes((message[-1] ^ 0x01,))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
