"""node.client over protocol v2 against a real node, through a hostile relay.

A WebSocket relay between the client and the node (tests/server/_v2.py) tampers with,
drops, reorders or duplicates the node's records, or cuts the connection in the middle
of an answer; an impostor answers the handshake with another static key. The client must
notice every one of them, wipe its keys, and the node must wipe its own (gauges back to 0).
The last test shows forward secrecy on recorded transcripts: with the host private key
an attacker reads a recorded v1 session, and cannot read a recorded v2 session.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from node.client import ResponseStream, open_session
from node.client.errors import (
    ChunkAuthenticationFailed,
    ForeignFrame,
    HostVerificationFailed,
    InvalidFinishReason,
    NodeErrorResponse,
    SessionClosed,
    StreamTruncated,
    UnexpectedFrame,
)
from node.client.receiver import ResponseEnd, TextPiece
from node.client.session_v2 import ClientSessionV2, ResponseReaderV2
from node.crypto import aead
from node.crypto.errors import DecryptionFailed
from node.crypto.hostkey import HostKey
from node.crypto.noise import SECP256K1, SymmetricState, chachapoly_decrypt, hkdf2
from node.crypto.secret import SecretBytes
from node.crypto.session_init import open_session_init
from node.inference.base import GenerationRequest, GenerationResult
from node.inference.echo import EchoBackend
from node.inference.errors import InferenceFailed
from node.protocol.messages import EncryptedMessage, EncryptedSessionInit, decode
from node.protocol.v2 import (
    PROLOGUE,
    PROTOCOL_NAME,
    ClientConnectionV2,
    Closed,
    ErrorReceived,
    Pong,
    ServerConnectionV2,
)
from node.protocol.v2 import Chunk as V2Chunk
from node.protocol.v2 import End as V2End
from node.protocol.v2 import Usage as V2Usage
from node.protocol.v2.server import Send
from tests.server._support import DEV_HOST_KEY_HEX, RunningNode, build_node
from tests.server._v2 import Hook, all_zero, gauges, raw_v2, relay, terms

from .conftest import GUARD_S, GatedBackend

PROMPT = "one two three four five six"


@asynccontextmanager
async def v2_node(**config: Any) -> AsyncIterator[RunningNode]:
    """A v1+v2 node (SDK dev host key) listening on an OS-chosen port."""
    node = build_node(**config)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(node.server.serve, node.shutdown)
        node.port = listeners[0].socket.getsockname()[1]
        try:
            yield node
        finally:
            node.shutdown.set()


async def _read_into(stream: ResponseStream, got: list[str]) -> None:
    async for piece in stream:
        got.append(piece)


def _on_record(index: int, action: str) -> Hook:
    """A down hook that misbehaves on the node's record number ``index`` (0 is message 2,
    1 the session ack, 2... the chunks of the first answer)."""
    held: list[bytes | str] = []

    def hook(i: int, message: bytes | str) -> list[bytes | str]:
        if i != index and not (action == "reordered" and i == index + 1):
            return [message]
        if action == "tampered":
            assert isinstance(message, bytes)
            return [message[:-1] + bytes((message[-1] ^ 0x80,))]
        if action == "dropped":
            return []
        if action == "duplicated":
            return [message, message]
        if i == index:  # reordered: hold this one, send it after the next
            held.append(message)
            return []
        return [message, *held]

    return hook


@pytest.mark.parametrize("action", ["tampered", "dropped", "reordered", "duplicated"])
async def test_bad_node_records_break_the_session(action: str) -> None:
    with trio.fail_after(GUARD_S):
        async with (
            v2_node(coalesce=False) as node,
            relay(node.port or 0, down=_on_record(3, action)) as mitm,
        ):
            async with open_session(
                mitm.url, model="echo", job_id=5, host_public_key=node.host_public_key
            ) as session:
                assert session.protocol == "v2"
                stream = session.stream(PROMPT)
                got: list[str] = []
                with pytest.raises(ChunkAuthenticationFailed):
                    await _read_into(stream, got)
                assert session.keys_held == 0  # the client wiped its keys at once
                with pytest.raises(SessionClosed):
                    await session.complete("more")
            await node.wait_no_connections()
            assert all_zero(node), gauges(node)
    # Text that arrived before the bad record was authentic, and only that (a duplicate's
    # first copy is the genuine record).
    assert "".join(got) == ("one two" if action == "duplicated" else "one")


async def test_truncated_answer_is_detected() -> None:
    backend = GatedBackend(["first", " second"])
    cut_after_first_chunk: list[int] = []

    with trio.fail_after(GUARD_S):
        async with v2_node(backend=backend, coalesce=False) as node:

            def down(i: int, message: bytes | str) -> list[bytes | str]:
                if i == 3:  # the first chunk went through: cut the line
                    cut_after_first_chunk.append(i)
                    mitm.cut.set()
                    return []
                return [message]

            async with (
                relay(node.port or 0, down=down) as mitm,
                open_session(
                    mitm.url, model="gated", job_id=5, host_public_key=node.host_public_key
                ) as session,
            ):
                got: list[str] = []
                with pytest.raises(StreamTruncated, match="END record"):
                    await _read_into(session.stream("hi"), got)
                assert session.keys_held == 0
            await node.wait_no_connections()
            assert backend.cancelled  # the node stopped the model for the lost client
            assert all_zero(node)
    assert cut_after_first_chunk == [3]
    assert "".join(got) == "first"


async def _impostor(other: HostKey, request: WebSocketRequest) -> None:
    """Answers any message 1 with a genuine message 2 of a handshake under its own key."""
    ws = await request.accept()
    await ws.get_message()
    own = ClientConnectionV2(other.public_key)
    responder = ServerConnectionV2(host_key=other, clock=trio.current_time)
    (reply,) = [a for a in responder.receive(own.start()) if isinstance(a, Send)]
    await ws.send_message(reply.frame)
    own.wipe()
    responder.wipe()
    with trio.move_on_after(GUARD_S), contextlib.suppress(ConnectionClosed):
        await ws.get_message()  # the client leaves


async def test_man_in_the_middle_with_another_static_key_is_refused() -> None:
    real = HostKey.parse(DEV_HOST_KEY_HEX)
    other = HostKey.generate()
    with trio.fail_after(GUARD_S):
        # 1. An impostor that answers the handshake with its own key.
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, partial(_impostor, other), "127.0.0.1", 0, None)
            )
            with pytest.raises(HostVerificationFailed, match="does not authenticate"):
                async with open_session(
                    f"ws://127.0.0.1:{server.port}/v2/ws",
                    model="echo",
                    job_id=5,
                    host_public_key=real.public_key,
                ):
                    pass
            nursery.cancel_scope.cancel()
        # 2. A real node with another host key cannot even read message 1: it closes
        #    without message 2, which the client reports as host verification failed.
        async with v2_node(host_key=other) as impostor:
            with pytest.raises(HostVerificationFailed, match="does not hold that key"):
                async with open_session(
                    impostor.url.replace("http", "ws") + "/v2/ws",
                    model="echo",
                    job_id=5,
                    host_public_key=real.public_key,
                ):
                    pass
            await impostor.wait_no_connections()
            assert not impostor.accounting.started
            assert all_zero(impostor)


async def test_padding_through_node_client() -> None:
    with trio.fail_after(GUARD_S):
        async with (
            v2_node() as node,
            relay(node.port or 0) as mitm,
            open_session(
                mitm.url, model="echo", job_id=5, host_public_key=node.host_public_key, padding=32
            ) as session,
        ):
            assert (await session.complete("pad me")).text == "pad me"
    records = mitm.frames("down")[1:] + mitm.frames("up")[1:]
    assert records
    assert all((len(f) - 16) % 32 == 0 for f in records)


# ----------------------------------------------------------------- forward secrecy


def _v1_attack(host: HostKey, transcript: list[tuple[str, bytes | str]]) -> tuple[str, str]:
    """What the host key reveals of a recorded v1 session: (request, answer text)."""
    frames = [json.loads(m) for _, m in transcript if isinstance(m, str)]
    init = next(decode(json.dumps(f)) for f in frames if f["type"] == "encrypted_session_init")
    assert isinstance(init, EncryptedSessionInit)
    data = open_session_init(host, init.payload)
    key = data.session_key
    message = next(decode(json.dumps(f)) for f in frames if f["type"] == "encrypted_message")
    assert isinstance(message, EncryptedMessage)
    p = message.payload
    request = aead.open(key, p.nonce, p.ciphertext, p.aad).decode()
    answer = "".join(
        aead.open(
            key,
            bytes.fromhex(f["payload"]["nonceHex"]),
            bytes.fromhex(f["payload"]["ciphertextHex"]),
            bytes.fromhex(f["payload"]["aadHex"]),
        ).decode()
        for f in frames
        if f["type"] == "encrypted_chunk"
    )
    key.wipe()
    return request, answer


def _v2_keys(host: HostKey, msg1: bytes, msg2: bytes, ee: bytes | None) -> list[bytes]:
    """Every key the Noise NK schedule derives from the transcript, the host key and a
    value standing in for the ephemeral-ephemeral DH ``ee`` (which needs an ephemeral
    private key that no transcript contains)."""
    keys: list[bytes] = []
    sym = SymmetricState(PROTOCOL_NAME.encode())
    sym.mix_hash(PROLOGUE)
    sym.mix_hash(host.public_key)
    e_client, e_node = msg1[:33], msg2[:33]
    sym.mix_hash(e_client)
    es = SECP256K1.dh(host.noise_keypair(), SECP256K1.parse_public(e_client))
    keys.append(es.reveal())
    sym.mix_key(es)
    keys += [sym.ck.reveal(), sym.cipher.k.reveal()]  # type: ignore[union-attr]
    sym.decrypt_and_hash(msg1[33:])  # the host key does open message 1 (its padding)
    # Split right after es (as if ee were skipped):
    keys += [k.reveal() for k in sym.split()]
    sym.mix_hash(e_node)
    # The attacker's stand-ins for ee: the host key with the node's ephemeral key, es again.
    candidates = [
        SECP256K1.dh(host.noise_keypair(), SECP256K1.parse_public(e_node)).reveal(),
        keys[0],
    ]
    if ee is not None:
        candidates = [ee]
    for candidate in candidates:
        ck = SecretBytes(sym.ck.view())
        ck2, k2 = hkdf2(ck, candidate)
        keys += [candidate, ck2.reveal(), k2.reveal()]
        keys += [k.reveal() for k in hkdf2(ck2, b"")]  # Split() after this mix
    return keys


def _opens(keys: list[bytes], frames: list[bytes]) -> int:
    """How many (frame, key, nonce) tries decrypt (nonces up to the frame count)."""
    opened = 0
    for frame in frames:
        for key in keys:
            for n in range(len(frames) + 2):
                try:
                    chachapoly_decrypt(SecretBytes(key), n, b"", frame)
                except DecryptionFailed:
                    continue
                opened += 1
    return opened


async def test_forward_secrecy_on_recorded_transcripts() -> None:
    host = HostKey.parse(DEV_HOST_KEY_HEX)  # the attacker stole it after the sessions
    # The control connection's ephemeral key: one copy for the client (which wipes it),
    # one for the test.
    scalar = SECP256K1.generate_keypair().private.reveal()
    ephemeral = SECP256K1.keypair(SecretBytes(scalar))
    with trio.fail_after(GUARD_S):
        async with v2_node() as node:
            port = node.port or 0
            async with (
                relay(port, path="/v1/ws") as tap_v1,
                open_session(
                    tap_v1.url, model="echo", job_id=1, host_public_key=host.public_key
                ) as s1,
            ):
                assert s1.protocol == "v1"
                assert (await s1.complete("secret one")).text == "secret one"
            async with (
                relay(port) as tap_v2,
                open_session(
                    tap_v2.url, model="echo", job_id=2, host_public_key=host.public_key
                ) as s2,
            ):
                assert s2.protocol == "v2"
                assert (await s2.complete("secret two")).text == "secret two"
            # Control: a v2 session whose client ephemeral private key the test knows.
            async with relay(port) as tap_ctl, raw_v2(tap_ctl.port, host.public_key) as ctl:
                ctl.conn = ClientConnectionV2(
                    host.public_key, ephemeral=SECP256K1.keypair(SecretBytes(scalar))
                )
                await ctl.open_session(terms())
                await ctl.send(ctl.conn.request("r1", prompt="secret three"))
                for _ in range(10):
                    (event,) = await ctl.events()
                    if type(event).__name__ == "End":
                        break
    # v1: the host key alone reads the recorded session, request and answer.
    request, answer = _v1_attack(host, tap_v1.transcript)
    assert "secret one" in request
    assert answer == "secret one"
    # v2: no key derivable from the host key and the transcript opens any record, in
    # either direction, under any nonce the session used.
    ups, downs = tap_v2.frames("up"), tap_v2.frames("down")
    records = ups[1:] + downs[1:]
    assert len(records) >= 4  # session, request, ack, chunk(s), END, CLOSE ...
    keys = _v2_keys(host, ups[0], downs[0], None)
    assert len(keys) >= 10
    assert _opens(keys, records) == 0
    # Control: the same derivation, given the true ee (DH of the client's ephemeral
    # private key with the node's ephemeral public key), opens that session's records.
    # So the attack code is right, and what the attacker lacks is exactly that key.
    c_ups, c_downs = tap_ctl.frames("up"), tap_ctl.frames("down")
    ee = SECP256K1.dh(ephemeral, SECP256K1.parse_public(c_downs[0][:33])).reveal()
    assert _opens(_v2_keys(host, c_ups[0], c_downs[0], ee), c_ups[1:] + c_downs[1:]) > 0
    assert _opens(_v2_keys(host, c_ups[0], c_downs[0], None), c_ups[1:] + c_downs[1:]) == 0


# ----------------------------------------------------------------- reader and errors


def test_reader_checks_every_record() -> None:
    reader = ResponseReaderV2(session_id="s", request_id="r")
    assert reader.feed(V2Chunk("r", "hi", 1)) == TextPiece("hi", 1)
    with pytest.raises(ForeignFrame):
        reader.feed(V2Chunk("other", "x", 1))
    with pytest.raises(ForeignFrame):
        reader.feed(V2End("other", "stop", V2Usage(1, 1, 2)))
    with pytest.raises(ForeignFrame):
        reader.feed(ErrorReceived("INFERENCE_FAILED", "no", "other"))
    with pytest.raises(InvalidFinishReason):
        reader.feed(V2End("r", "exploded", V2Usage(1, 1, 2)))
    with pytest.raises(UnexpectedFrame):
        reader.feed(Pong())
    with pytest.raises(StreamTruncated, match="CLOSE record"):
        reader.feed(Closed("bye"))
    end = reader.feed(V2End("r", "length", V2Usage(3, 1, 4)))
    assert isinstance(end, ResponseEnd)
    assert end.finish_reason == "length"
    assert end.stream_end.usage is not None
    assert end.stream_end.usage.total_tokens == 4
    assert end.stream_end.reason == "complete"
    with pytest.raises(UnexpectedFrame, match="already ended"):
        reader.feed(V2Chunk("r", "late", 1))
    failing = ResponseReaderV2(session_id="s", request_id="r")
    with pytest.raises(NodeErrorResponse) as info:
        failing.feed(ErrorReceived("MODEL_NOT_FOUND", "no such model", "r"))
    assert info.value.code == "MODEL_NOT_FOUND"
    assert failing.done


class FailingBackend(EchoBackend):
    async def generate(self, request: GenerationRequest, emit: Any) -> GenerationResult:
        if "fail" in (request.prompt or ""):
            raise InferenceFailed("the model is unwell")
        return await super().generate(request, emit)


async def test_node_errors_reach_the_caller_and_the_session_goes_on() -> None:
    with trio.fail_after(GUARD_S):
        async with (
            v2_node(backend=FailingBackend()) as node,
            open_session(
                node.url, model="echo", job_id=5, host_public_key=node.host_public_key
            ) as session,
        ):
            with pytest.raises(NodeErrorResponse) as info:
                await session.complete("please fail")
            assert info.value.code == "INFERENCE_FAILED"
            assert (await session.complete("fine now")).text == "fine now"


async def test_refused_session_and_bad_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        ClientSessionV2(None, padding=7)  # type: ignore[arg-type]
    with trio.fail_after(GUARD_S):
        async with v2_node(allowed_clients=frozenset({"0x" + "11" * 20})) as node:
            with pytest.raises(NodeErrorResponse) as info:
                async with open_session(
                    node.url, model="echo", job_id=5, host_public_key=node.host_public_key
                ):
                    pass
            await node.wait_no_connections()
            assert all_zero(node)
    assert info.value.code == "SESSION_AUTH_DENIED"


async def test_a_clean_exit_says_goodbye_with_a_close_record() -> None:
    """Leaving ``open_session`` normally sends the authenticated CLOSE record before the
    keys are wiped: the node ends the session as closed by the client, not as a
    disconnect."""
    with trio.fail_after(GUARD_S):
        async with v2_node() as node:
            async with open_session(
                node.url, model="echo", job_id=5, host_public_key=node.host_public_key
            ) as session:
                assert (await session.complete("hello")).text == "hello"
            assert session.closed
            await node.wait_no_connections()
            assert [reason for _, reason in node.accounting.ended] == ["closed"]
