"""Faults: what happens to a stream when something breaks in the middle of it.

* the client vanishes (TCP drop, no close frame): the backend's work is cancelled, the
  connection's keys are zeroed, another connection streaming at the same time is unaffected;
* the backend raises a plain exception after streaming began: INFERENCE_FAILED, then the
  authenticated error ending, and the connection goes on;
* the node process gets SIGTERM: the stream ends ``cancelled``, the socket closes 1001,
  the process exits 0;
* the client reads slowly while the backend produces fast: the node's queue never holds
  more than ``stream_queue_size`` pieces and what queued up goes out coalesced;
* the ``openai`` backend's upstream engine is down: INFERENCE_FAILED, connection usable.

Everything in-process runs over memory streams under the autojump MockClock, so it waits
on events and virtual time, never on the speed of this machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio_websocket import wrap_client_stream

from node.crypto import aead
from node.inference.base import Emit, GenerationRequest, GenerationResult, ModelInfo, Piece
from node.inference.echo import EchoBackend
from node.inference.factory import create_backend
from tests.server._support import RunningNode

from ._support import (
    DEV_HOST_KEY_HEX,
    DEV_HOST_PUBLIC_HEX,
    WsClient,
    build_node,
    memory_client,
    ws_client,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
GUARD_S = 60


class HoldingBackend:
    """Echo, except that a prompt starting with "hold" emits one piece and then waits
    until cancelled (recording that it was); a prompt starting with "crash" emits two
    pieces and raises a plain RuntimeError."""

    name = "holding"

    def __init__(self) -> None:
        self.echo = EchoBackend()
        self.holding = trio.Event()
        self.cancelled = trio.Event()

    def models(self) -> list[ModelInfo]:
        return self.echo.models()

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self.echo.aclose()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        prompt = request.prompt or ""
        if prompt.startswith("hold"):
            await emit(Piece("held", 1))
            self.holding.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled.set()
                raise
        if prompt.startswith("crash"):
            await emit(Piece("one", 1))
            await emit(Piece(" two", 1))
            raise RuntimeError("the model fell over")
        return await self.echo.generate(request, emit)


# ------------------------------------------------------------------ client disconnect


async def test_client_vanishes_mid_stream(autojump_clock: trio.testing.MockClock) -> None:
    backend = HoldingBackend()
    node = build_node(backend=backend)
    words = " ".join(f"w{i}" for i in range(200))
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as other:
            _, other_session = await other.init(node.host_public_key, session_id="2")
            async with memory_client(node) as leaving:
                _, session = await leaving.init(node.host_public_key, session_id="1")
                [driver] = [d for d in node.ctx.drivers if "1" in d.state.sessions]
                key = driver.state.sessions["1"].key
                await leaving.send(session.message_frame({"prompt": "hold on"}))
                await leaving.expect("encrypted_chunk")
                await backend.holding.wait()
                assert leaving.raw_stream is not None
                await leaving.raw_stream.aclose()  # no close frame: the peer is just gone
                await backend.cancelled.wait()
            await node.drivers.wait_until(lambda d: driver not in d)
            assert key is not None
            assert key.is_all_zero()
            assert driver.end_reason == "disconnect"
            # The other connection streams on, unaffected.
            result = await other.ask(other_session, words)
            assert result.text == words
            assert result.final_reason == "stop"
            assert len(node.held_keys()) == 1
    assert ("1", "disconnect") in [(s.session_id, r) for s, r in node.accounting.ended]
    [finished] = [r for s, _, r in node.accounting.finished if s.session_id == "1"]
    assert finished.finish_reason == "cancelled"
    assert finished.completion_tokens == 1


# ------------------------------------------------------------------ backend crash


async def test_backend_crash_mid_stream(autojump_clock: trio.testing.MockClock) -> None:
    node = build_node(backend=HoldingBackend())
    with trio.fail_after(GUARD_S):
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key)
            result = await client.ask(session, "crash now", request_id="c")
            assert result.text == "one two"
            assert [e["code"] for e in result.errors] == ["INFERENCE_FAILED"]
            assert "fell over" not in result.errors[0]["message"]
            assert result.final_reason == "error"  # authenticated, inside the stream
            assert result.end["reason"] == "error"
            assert result.end["finish_reason"] == "error"
            assert result.end["tokens_used"] == 2
            # The connection and the session go on.
            await client.ping()
            assert (await client.ask(session, "and again")).text == "and again"
    assert node.ctx.metrics.requests["error"] == 1
    # A node-side failure does not count against the client's error budget.
    assert node.ctx.metrics.errors["INFERENCE_FAILED"] == 1


# ------------------------------------------------------------------ SIGTERM


LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


@asynccontextmanager
async def node_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``python -m node serve --backend echo --port 0`` with the dev host key; yields the
    process and the port it printed. Killed on the way out if it is still running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_NODE_")}
    env["HOST_PRIVATE_KEY"] = DEV_HOST_KEY_HEX
    command = [sys.executable, "-m", "node", "serve", "--backend", "echo", "--port", "0"]
    command += ["--ledger", str(tmp_path / "ledger.sqlite3"), "--log-level", "info", *args]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stderr is not None
        seen = b""
        port: int | None = None
        for _ in range(10_000):
            data = await process.stderr.receive_some(65536)
            if not data:
                break
            seen += data
            match = LISTENING.search(seen)
            if match:
                port = int(match.group(1))
                break
        assert port is not None, seen.decode(errors="replace")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stderr)
            yield process, port
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    for _ in range(1_000_000):
        if not await stream.receive_some(65536):
            return


async def test_sigterm_mid_stream_ends_cancelled_closes_1001_exits_0(tmp_path: Path) -> None:
    prompt = "term " + " ".join(f"t{i}" for i in range(1000))  # 30 s at 30 ms a piece
    with trio.fail_after(GUARD_S):
        async with node_process(tmp_path, "--echo-delay-ms", "30") as (process, port):
            async with ws_client(port) as client:
                _, session = await client.init(DEV_HOST_PUBLIC_HEX, session_id="4")
                await client.send(session.message_frame({"prompt": prompt}, request_id="q"))
                await client.expect("encrypted_chunk")
                process.send_signal(signal.SIGTERM)
                result = await client.collect(session, request_id="q", skip_chunks=1)
                code, after = await client.wait_closed()
            returncode = await process.wait()
    assert result.final_reason == "cancelled"
    assert result.end["reason"] == "cancelled"
    assert prompt.startswith(result.text)
    assert len(result.text) < len(prompt)
    assert code == 1001
    assert after == []
    assert returncode == 0


# ------------------------------------------------------------------ slow reader


class FloodBackend:
    """Emits ``count`` one-token pieces as fast as the node takes them, recording how many
    pieces sat in the node's queue (the memory channel behind ``emit``) after each one."""

    name = "flood"

    def __init__(self, count: int) -> None:
        self.count = count
        self.queue_lengths: list[int] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="flood", context_window=None, owned_by="tests")]

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        channel = _queue_behind(emit)
        for i in range(self.count):
            await emit(Piece(f"p{i} ", 1))
            self.queue_lengths.append(channel.statistics().current_buffer_used)
        return GenerationResult("stop", 1, self.count)


def _queue_behind(emit: Emit) -> trio.MemorySendChannel[Any]:
    """The node's memory channel behind ``emit`` (the driver's BackendEmit exposes it)."""
    candidates = [getattr(emit, "channel", None), getattr(emit, "__self__", None)]
    candidates += [cell.cell_contents for cell in getattr(emit, "__closure__", None) or ()]
    for candidate in candidates:
        if isinstance(candidate, trio.MemorySendChannel):
            return candidate
    raise AssertionError("cannot find the memory channel behind the backend's emit")


@asynccontextmanager
async def lockstep_client(node: RunningNode) -> AsyncIterator[WsClient]:
    """A client over lockstep streams: every byte the node sends waits until the client's
    WebSocket reader takes it, and that reader stops while a message is left unread."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.server.handle_stream, server_stream)
        ws = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "127.0.0.1",
            "/v1/ws",
            message_queue_size=1,
        )
        client = WsClient(ws, client_stream)
        await client.expect("connected")
        try:
            yield client
        finally:
            await ws.aclose()
            await client_stream.aclose()


async def test_slow_reader_backpressure_bounds_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pieces = 3_000
    queue_size = 8
    backend = FloodBackend(pieces)
    node = build_node(backend=backend, stream_queue_size=queue_size, idle_timeout_s=10_000.0)
    frames = 0
    with trio.fail_after(GUARD_S * 100):
        async with lockstep_client(node) as client:
            _, session = await client.init(node.host_public_key)
            await client.send(session.message_frame({"prompt": "go"}, request_id="f"))
            text = ""
            for _ in range(pieces + 10):
                await trio.sleep(0.05)  # a slow reader (virtual time)
                frame = await client.recv()
                if frame["type"] == "encrypted_chunk" and not frame.get("final"):
                    frames += 1
                    text += _open(session.key, frame)
                elif frame["type"] == "stream_end":
                    break
    expected = "".join(f"p{i} " for i in range(pieces))
    assert text == expected  # nothing lost, nothing reordered
    lengths = backend.queue_lengths
    assert len(lengths) == pieces
    assert max(lengths) <= queue_size  # bounded by the configured queue ...
    assert max(lengths) == queue_size  # ... and the reader really was slower
    # Pieces that queued while a frame was being written went out together.
    assert frames < pieces // 4


def _open(key: bytes, frame: dict[str, Any]) -> str:
    p = frame["payload"]
    return aead.open(
        key,
        bytes.fromhex(p["nonceHex"]),
        bytes.fromhex(p["ciphertextHex"]),
        bytes.fromhex(p["aadHex"]),
    ).decode()


# ------------------------------------------------------------------ upstream down


async def test_openai_upstream_down_is_inference_failed(node_factory: Any) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens here once it is closed
    backend = create_backend("openai", upstream_url=f"http://127.0.0.1:{closed_port}")
    try:
        node = await node_factory.start(backend=backend)
        with trio.fail_after(GUARD_S):
            async with ws_client(node) as client:
                _, session = await client.init(node.host_public_key)
                for attempt in ("first", "second"):
                    result = await client.ask(session, f"{attempt} try", request_id=attempt)
                    assert [e["code"] for e in result.errors] == ["INFERENCE_FAILED"]
                    assert "cannot reach" in result.errors[0]["message"]
                    assert result.text == ""
                    assert result.final_reason == "error"
                    assert result.end["reason"] == "error"
                    await client.ping()
                await client.init(node.host_public_key, session_id="2")
    finally:
        await backend.aclose()
