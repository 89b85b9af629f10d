"""A request that is cancelled or fails still accounts the prompt the backend processed."""

from __future__ import annotations

import json
import os
from typing import Any

import trio

from node.crypto import aead
from node.crypto.hostkey import HostKey
from node.inference.base import GenerationResult
from node.inference.echo import EchoBackend
from node.protocol.connection import Session
from tests.support.wire import SDK_HOST_KEY, running_node, wire_client

PROMPT = "one two three four five six seven eight nine ten"  # 10 prompt tokens for echo


class Recorder:
    def __init__(self) -> None:
        self.results: list[GenerationResult] = []

    async def session_started(self, session: Session) -> None:
        await trio.lowlevel.checkpoint()

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        self.results.append(result)
        await trio.lowlevel.checkpoint()

    async def session_ended(self, session: Session, reason: str) -> None:
        await trio.lowlevel.checkpoint()


async def _send_prompt(client: Any) -> None:
    nonce = os.urandom(24)
    body = json.dumps({"prompt": PROMPT}).encode()
    await client.send(
        {
            "type": "encrypted_message",
            "session_id": client.session_id,
            "id": "r",
            "payload": {
                "ciphertextHex": aead.seal(client.key, nonce, body, b"message_0").hex(),
                "nonceHex": nonce.hex(),
                "aadHex": b"message_0".hex(),
            },
        }
    )


async def test_a_cancelled_request_accounts_its_prompt() -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    accounting = Recorder()
    backend = EchoBackend(delay_s=0.05)
    async with running_node(host_key=host, backend=backend, accounting=accounting) as (_c, url):
        with trio.fail_after(20):
            async with wire_client(url) as client:
                await client.init_encrypted(host.public_key)
                await _send_prompt(client)
                first = await client.recv()
                assert first["type"] == "encrypted_chunk"
                await client.send({"type": "stream_cancel", "session_id": client.session_id})
                while (frame := await client.recv())["type"] != "stream_end":
                    pass
    assert frame["reason"] == "cancelled"
    assert frame["usage"]["prompt_tokens"] == 10
    assert 1 <= frame["usage"]["completion_tokens"] < 10
    (result,) = accounting.results
    assert result.finish_reason == "cancelled"
    assert result.prompt_tokens == 10
    assert result.completion_tokens == frame["usage"]["completion_tokens"]


async def test_a_failed_request_accounts_its_prompt() -> None:
    host = HostKey.parse(SDK_HOST_KEY)
    accounting = Recorder()
    backend = EchoBackend(fail_after_pieces=3)
    async with running_node(host_key=host, backend=backend, accounting=accounting) as (_c, url):
        with trio.fail_after(20):
            async with wire_client(url) as client:
                await client.init_encrypted(host.public_key)
                await _send_prompt(client)
                codes = []
                while (frame := await client.recv())["type"] != "stream_end":
                    if frame["type"] == "error":
                        codes.append(frame["code"])
    assert codes == ["INFERENCE_FAILED"]
    assert frame["reason"] == "error"
    assert frame["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    (result,) = accounting.results
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "error",
        10,
        3,
    )
