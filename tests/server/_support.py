"""Test helpers for the server suite: building nodes, a tiny WebSocket client, frames.

The client here is deliberately small and strict: it checks every frame it decrypts
against the order PROTOCOL.md section 4 promises (chunk ``i`` under AAD ``chunk_<i>``,
one empty final chunk, ``encrypted_response`` under ``encrypted_response_final``, then a
plaintext ``stream_end``), so a test that collects a stream also checks that order.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio
import trio.testing
from coincurve import PrivateKey
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from node.config import NodeConfig
from node.crypto import aead
from node.crypto.curve import address_of, e2ee_v1_digest, parse_public_key, sign_recoverable
from node.crypto.hostkey import HostKey
from node.crypto.kdf import ZERO_SALT, hkdf_sha256_fast32
from node.crypto.secret import SecretBytes
from node.crypto.session_init import seal_session_init
from node.inference.base import (
    Backend,
    Emit,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Piece,
)
from node.inference.echo import EchoBackend
from node.protocol.connection import Session
from node.protocol.replay import InitReplayCache
from node.server.app import NodeServer
from node.server.context import NodeContext

# The SDK's fixed dev host key (also the host key of every SDK vector).
DEV_HOST_KEY_HEX: Final = "0xe7855c0ea54ccca55126d40f97d90868b2a73bad0363e92ccdec0c4fbd6c0ce2"
DEV_HOST_PUBLIC_HEX: Final = "0398408743050ae24fc99f49dbf832e5177fb9f6cbfa9c9cc56615084a26b01e9e"
DEV_HOST_ADDRESS: Final = "0x4594F755F593B517Bb3194F4DeC20C48a3f04504"

RECV_TIMEOUT_S: Final = 10.0
MAX_STREAM_FRAMES: Final = 20_000
RESPONSE_FINAL_AAD: Final = b"encrypted_response_final"
_DEFAULT: Final[Any] = object()
_STREAM_FRAMES: Final = ("encrypted_chunk", "encrypted_response", "stream_chunk", "stream_end")

# A complete WebSocket upgrade request head, for raw-socket tests.
UPGRADE_REQUEST: Final = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


# ------------------------------------------------------------------ node side


class RecordingAccounting:
    """An ``Accounting`` that remembers every call, in order."""

    def __init__(self) -> None:
        self.started: list[Session] = []
        self.finished: list[tuple[Session, Any, GenerationResult]] = []
        self.ended: list[tuple[Session, str]] = []

    async def session_started(self, session: Session) -> None:
        self.started.append(session)
        await trio.lowlevel.checkpoint()

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        self.finished.append((session, request_id, result))
        await trio.lowlevel.checkpoint()

    async def session_ended(self, session: Session, reason: str) -> None:
        self.ended.append((session, reason))
        await trio.lowlevel.checkpoint()


class DriverSet(set[Any]):
    """``NodeContext.drivers`` that lets a test wait for connections to end.

    The driver removes itself from this set in its ``finally``, right after it wiped its
    keys, so "the set is empty" means "every connection's keys are gone".
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()
        self.peak = 0

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    def add(self, item: Any) -> None:
        super().add(item)
        self.peak = max(self.peak, len(self))
        self._notify()

    def discard(self, item: Any) -> None:
        super().discard(item)
        self._notify()

    async def wait_until(self, predicate: Any, within_s: float = RECV_TIMEOUT_S) -> None:
        with trio.fail_after(within_s):
            for _ in range(100_000):
                if predicate(self):
                    return
                await self._changed.wait()
            raise AssertionError("driver set never reached the expected state")


@attrs.define(eq=False)
class RunningNode:
    ctx: NodeContext
    server: NodeServer
    accounting: RecordingAccounting
    drivers: DriverSet
    shutdown: trio.Event = attrs.field(factory=trio.Event)
    port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "this node has no listener (memory streams only)"
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/v1/ws"

    @property
    def host_public_key(self) -> bytes:
        assert self.ctx.host_key is not None
        return self.ctx.host_key.public_key

    async def wait_no_connections(self, within_s: float = RECV_TIMEOUT_S) -> None:
        await self.drivers.wait_until(lambda d: not d, within_s)

    def only_driver(self) -> Any:
        assert len(self.ctx.drivers) == 1, f"expected one connection, got {len(self.ctx.drivers)}"
        return next(iter(self.ctx.drivers))

    def held_keys(self) -> list[SecretBytes]:
        """References to every session key the live connections hold right now."""
        keys = []
        for driver in self.ctx.drivers:
            keys += [s.key for s in driver.state.sessions.values() if s.key is not None]
        return keys


def build_node(
    *,
    host_key: HostKey | None = _DEFAULT,
    backend: Backend | None = None,
    replay_max_entries: int = 1_000_000,
    **config: Any,
) -> RunningNode:
    """A node context + server (not yet listening). Config defaults suit tests."""
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", 0)
    config.setdefault("backend", "echo")
    config.setdefault("shutdown_grace_s", 2.0)
    cfg = NodeConfig(**config)
    key = HostKey.parse(DEV_HOST_KEY_HEX) if host_key is _DEFAULT else host_key
    accounting = RecordingAccounting()
    drivers = DriverSet()
    ctx = NodeContext(
        config=cfg,
        host_key=key,
        backend=backend if backend is not None else EchoBackend(),
        replay_cache=InitReplayCache(
            window_s=cfg.replay_window_s, max_entries=replay_max_entries, clock=trio.current_time
        ),
        accounting=accounting,
        clock=trio.current_time,
        drivers=drivers,
    )
    return RunningNode(ctx=ctx, server=NodeServer(ctx), accounting=accounting, drivers=drivers)


# ------------------------------------------------------------------ backends


class GatedBackend:
    """Emits ``"first"``, then waits for :attr:`release` before ``" second"``."""

    name = "gated"

    def __init__(self) -> None:
        self.streaming = trio.Event()
        self.release = trio.Event()
        self.cancelled = trio.Event()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="gated", context_window=None, owned_by="tests")]

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        await emit(Piece("first", 1))
        self.streaming.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        await emit(Piece(" second", 1))
        return GenerationResult("stop", 1, 2)


@attrs.define(eq=False)
class Generation:
    """What :class:`CancelProbe` saw of one ``generate`` call."""

    prompt: str
    outcome: str = "running"  # running | returned | cancelled | raised
    ended_at: float | None = None  # trio.current_time() at the end
    ended_perf: float | None = None  # time.perf_counter() at the end
    done: trio.Event = attrs.field(factory=trio.Event)


class CancelProbe:
    """Wraps a backend and records how each generation ended (returned or Cancelled)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[Generation] = []
        self.started = trio.Event()

    def models(self) -> list[ModelInfo]:
        return self.inner.models()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def call_for(self, prompt_prefix: str) -> Generation:
        matches = [c for c in self.calls if c.prompt.startswith(prompt_prefix)]
        assert len(matches) == 1, f"expected one generation for {prompt_prefix!r}"
        return matches[0]

    async def generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        call = Generation(prompt=request.prompt or "")
        self.calls.append(call)
        self.started.set()
        try:
            result = await self.inner.generate(request, emit)
        except trio.Cancelled:
            call.outcome = "cancelled"
            raise
        except BaseException:
            call.outcome = "raised"
            raise
        else:
            call.outcome = "returned"
            return result
        finally:
            call.ended_at = trio.current_time()
            call.ended_perf = time.perf_counter()
            call.done.set()


# ------------------------------------------------------------------ client side


@attrs.define(eq=False)
class ClientSession:
    """The client's half of an encrypted session."""

    session_id: str
    key: bytes = attrs.field(repr=False)
    client_key: PrivateKey = attrs.field(repr=False)
    next_index: int = 0

    @property
    def client_address(self) -> str:
        return address_of(self.client_key.public_key)

    def message_frame(
        self,
        request: Mapping[str, Any] | str | bytes,
        *,
        index: int | None = None,
        request_id: str | int | None = None,
        key: bytes | None = None,
        aad: bytes | None = None,
        nonce: bytes | None = None,
    ) -> dict[str, Any]:
        """An ``encrypted_message`` frame for ``request`` under AAD ``message_<index>``."""
        if index is None:
            index = self.next_index
        self.next_index = index + 1
        if isinstance(request, Mapping):
            data = json.dumps(request).encode()
        elif isinstance(request, str):
            data = request.encode()
        else:
            data = request
        nonce = os.urandom(24) if nonce is None else nonce
        aad = b"message_%d" % index if aad is None else aad
        sealed = aead.seal(self.key if key is None else key, nonce, data, aad)
        frame: dict[str, Any] = {
            "type": "encrypted_message",
            "session_id": self.session_id,
            "payload": {
                "ciphertextHex": sealed.hex(),
                "nonceHex": nonce.hex(),
                "aadHex": aad.hex(),
            },
        }
        if request_id is not None:
            frame["id"] = request_id
        return frame


def init_frame(
    host_public_key: bytes | str,
    *,
    session_id: str = "1",
    job_id: int | str | None = None,
    client_key: PrivateKey | None = None,
    session_key: bytes | None = None,
    request_id: str | int | None = None,
    chain_id: int | None = None,
    model_name: str = "echo",
    **seal: Any,
) -> tuple[dict[str, Any], ClientSession]:
    """An ``encrypted_session_init`` frame built the SDK way, and the client session."""
    client_key = PrivateKey() if client_key is None else client_key
    session_key = os.urandom(32) if session_key is None else session_key
    job = session_id if job_id is None else job_id
    payload = seal_session_init(
        host_public_key, client_key, session_key, job_id=job, model_name=model_name, **seal
    )
    frame: dict[str, Any] = {
        "type": "encrypted_session_init",
        "session_id": session_id,
        "job_id": str(job),
        "payload": payload,
    }
    if chain_id is not None:
        frame["chain_id"] = chain_id
    if request_id is not None:
        frame["id"] = request_id
    return frame, ClientSession(session_id, session_key, client_key)


def seal_raw_init(
    host_public_key: bytes, client_key: PrivateKey, plaintext: bytes
) -> dict[str, Any]:
    """An init payload around arbitrary session plaintext (for INVALID_SESSION_DATA)."""
    host = parse_public_key(host_public_key).format(compressed=True)
    eph = PrivateKey()
    eph_pub = eph.public_key.format(compressed=True)
    shared = parse_public_key(host).multiply(eph.secret).format(compressed=True)[1:]
    init_key = bytes(hkdf_sha256_fast32(shared))
    nonce = os.urandom(24)
    ciphertext = aead.seal(init_key, nonce, plaintext, b"")
    signature = sign_recoverable(
        client_key, e2ee_v1_digest(eph_pub, host, ZERO_SALT, nonce, b"", b"")
    )
    return {
        "ephPubHex": eph_pub.hex(),
        "saltHex": ZERO_SALT.hex(),
        "nonceHex": nonce.hex(),
        "ciphertextHex": ciphertext.hex(),
        "signatureHex": signature.hex(),
        "aadHex": "",
        "info": "",
    }


@attrs.define(eq=False)
class StreamResult:
    """One request's answer as the client saw it."""

    pieces: list[str]
    tokens: list[int]
    final_reason: str | None
    end: dict[str, Any]
    errors: list[dict[str, Any]]
    other: list[dict[str, Any]]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class WsClient:
    """A strict little protocol client over one trio-websocket connection."""

    _ids = itertools.count(1)

    def __init__(self, ws: WebSocketConnection, raw_stream: trio.abc.Stream | None = None) -> None:
        self.ws = ws
        self.raw_stream = raw_stream

    async def send(self, frame: Mapping[str, Any] | str | bytes) -> None:
        if isinstance(frame, Mapping):
            frame = json.dumps(frame)
        await self.ws.send_message(frame)

    async def recv(self, within_s: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        with trio.fail_after(within_s):
            text = await self.ws.get_message()
        assert isinstance(text, str), "the node sent a binary frame"
        obj = json.loads(text)
        assert isinstance(obj, dict), text
        return obj

    async def expect(self, kind: str, within_s: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        message = await self.recv(within_s)
        assert message["type"] == kind, f"expected {kind}, got {message}"
        return message

    async def expect_error(
        self, code: str, *, request_id: str | int | None = None
    ) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["code"] == code, message
        assert isinstance(message["message"], str)
        assert message["message"]
        if request_id is not None:
            assert message.get("id") == request_id, message
        return message

    async def ping(self) -> None:
        """The connection is still usable: a ping with an id gets its pong."""
        ping_id = f"ping-{next(self._ids)}"
        await self.send({"type": "ping", "id": ping_id})
        assert await self.recv() == {"type": "pong", "id": ping_id}

    async def wait_closed(
        self, within_s: float = RECV_TIMEOUT_S
    ) -> tuple[int, list[dict[str, Any]]]:
        """Read until the node closes; returns the close code and the frames before it."""
        frames: list[dict[str, Any]] = []
        with trio.fail_after(within_s):
            for _ in range(MAX_STREAM_FRAMES):
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    break
                frames.append(json.loads(text))
            else:
                raise AssertionError("the node never closed the connection")
        assert reason is not None
        return reason.code, frames

    async def init(
        self, host_public_key: bytes | str, **kw: Any
    ) -> tuple[dict[str, Any], ClientSession]:
        frame, session = init_frame(host_public_key, **kw)
        await self.send(frame)
        ack = await self.expect("session_init_ack")
        return ack, session

    async def ask(
        self,
        session: ClientSession,
        prompt: str | Mapping[str, Any],
        *,
        request_id: str | int | None = None,
    ) -> StreamResult:
        request = {"prompt": prompt} if isinstance(prompt, str) else prompt
        await self.send(session.message_frame(request, request_id=request_id))
        return await self.collect(session, request_id=request_id)

    async def collect(
        self,
        session: ClientSession | None,
        *,
        request_id: str | int | None = None,
        within_s: float = RECV_TIMEOUT_S,
        skip_chunks: int = 0,
    ) -> StreamResult:
        """Read one answer up to ``stream_end``, checking the order of PROTOCOL.md s.4.

        ``skip_chunks``: how many chunks of this answer the caller already read itself.
        """
        pieces: list[str] = []
        tokens: list[int] = []
        errors: list[dict[str, Any]] = []
        other: list[dict[str, Any]] = []
        final_seen = False
        final_reason: str | None = None
        for _ in range(MAX_STREAM_FRAMES):
            m = await self.recv(within_s)
            kind = m["type"]
            if request_id is not None and kind in _STREAM_FRAMES:
                assert m.get("id") == request_id, m
            if kind == "encrypted_chunk":
                assert session is not None, "an encrypted chunk on a plaintext request"
                assert not final_seen, "chunk after the final chunk"
                assert m["session_id"] == session.session_id
                i = skip_chunks + len(pieces)
                payload = m["payload"]
                aad = b"chunk_%d" % i
                assert payload["index"] == i, (payload["index"], i)
                assert payload["aadHex"] == aad.hex()
                assert len(bytes.fromhex(payload["nonceHex"])) == 24
                data = aead.open(
                    session.key,
                    bytes.fromhex(payload["nonceHex"]),
                    bytes.fromhex(payload["ciphertextHex"]),
                    aad,
                )
                if m.get("final"):
                    assert data == b"", "final chunk must be empty"
                    assert m["tokens"] == 0
                    final_seen = True
                else:
                    assert "final" not in m
                    pieces.append(data.decode("utf-8"))
                    tokens.append(m["tokens"])
            elif kind == "encrypted_response":
                assert session is not None
                assert final_seen, "encrypted_response before the final chunk"
                payload = m["payload"]
                assert payload["aadHex"] == RESPONSE_FINAL_AAD.hex()
                final_reason = aead.open(
                    session.key,
                    bytes.fromhex(payload["nonceHex"]),
                    bytes.fromhex(payload["ciphertextHex"]),
                    RESPONSE_FINAL_AAD,
                ).decode()
            elif kind == "stream_chunk":
                assert session is None, "a plaintext chunk on an encrypted session"
                pieces.append(m["content"])
                tokens.append(m["tokens"])
            elif kind == "stream_end":
                if session is not None:
                    assert final_reason is not None, "stream_end before encrypted_response"
                    assert m["session_id"] == session.session_id
                return StreamResult(pieces, tokens, final_reason, m, errors, other)
            elif kind == "error":
                errors.append(m)
            else:
                other.append(m)
        raise AssertionError("no stream_end")


@asynccontextmanager
async def ws_client(node: RunningNode | int) -> AsyncIterator[WsClient]:
    """A client over a real TCP socket to ``node`` (or a port on 127.0.0.1); the
    ``connected`` greeting is consumed.

    The test owns the TCP stream (``client.raw_stream``) so it can also drop it abruptly.
    (trio-websocket's own ``open_websocket_url`` leaves the socket open when the server
    closes first, which ``-W error`` reports as an unclosed socket.)
    """
    port = node if isinstance(node, int) else node.port
    assert port, "this node is not listening"
    with trio.fail_after(RECV_TIMEOUT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(RECV_TIMEOUT_S):
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/v1/ws")
            client = WsClient(ws, stream)
            await client.expect("connected")
            try:
                yield client
            finally:
                with trio.move_on_after(RECV_TIMEOUT_S):
                    await ws.aclose()
                await stream.aclose()
    finally:
        await stream.aclose()


@asynccontextmanager
async def url_client(node: RunningNode) -> AsyncIterator[WsClient]:
    """A client through ``open_websocket_url`` (the URL the SDK derives from the HTTP base).

    Only for tests where the client closes first: when the node closes first,
    trio-websocket leaves this client's socket open (``ws_client`` handles that case).
    """
    async with open_websocket_url(
        node.ws_url, connect_timeout=RECV_TIMEOUT_S, disconnect_timeout=RECV_TIMEOUT_S
    ) as ws:
        client = WsClient(ws)
        await client.expect("connected")
        yield client


@asynccontextmanager
async def memory_client(node: RunningNode) -> AsyncIterator[WsClient]:
    """A client wired to ``node.server.handle_stream`` through in-memory streams.

    No socket and no real time is involved, so this works with an autojump MockClock.
    The nursery waits for the node's side of the connection to finish too.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.server.handle_stream, server_stream)
        # trio-websocket's annotation says SocketStream, but any trio Stream works.
        ws = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "127.0.0.1",
            "/v1/ws",
        )
        client = WsClient(ws, client_stream)
        await client.expect("connected")
        try:
            yield client
        finally:
            await ws.aclose()
            await client_stream.aclose()


# ------------------------------------------------------------------ metrics text

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\})? (?P<value>\S+)$'
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Parse exposition text strictly: every sample line is ``name{labels} value`` and its
    metric family was declared by ``# TYPE`` first. Returns ``{"name{labels}": value}``."""
    assert text.endswith("\n"), "exposition text must end with a newline"
    declared: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE"), line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                declared[parts[2]] = parts[3]
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not a Prometheus sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or family in declared, f"{name} has no # TYPE line"
        value = float(match["value"])  # raises on garbage
        key = name + (match["labels"] or "")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = value
    return samples
