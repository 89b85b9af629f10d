"""Protocol v2 secrets never leave the node or the client in clear.

A v2 session through a live node with every logger at DEBUG: prompts, a backend crash
with the prompt in its exception text, a record that fails authentication. Then logs,
``/metrics``, the other HTTP routes, exception texts and ``repr``s are searched for the
host key, the client's signing key, its ephemeral scalar, the es DH output, both
directions' transport keys and chaining keys, and every prompt, in every spelling the
v1 test uses. Afterwards the captured key buffers are all zero (wiped).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio
from coincurve import PrivateKey

from node.client import ClientError, open_session
from node.client.session_v2 import ClientSessionV2
from node.crypto.hostkey import HostKey
from node.crypto.noise import SECP256K1
from node.crypto.secret import SecretBytes
from tests.server._v2 import raw_v2

from .test_secrets_in_output import (
    CRASH_PROMPT,
    PROMPTS,
    LeakyBackend,
    RecordingRng,
    _render,
    leaks,
    spellings,
    text_spellings,
)

GUARD_S = 60


async def test_no_v2_key_or_plaintext_in_logs_metrics_or_exceptions(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host = HostKey.generate()
    host_scalar = bytes.fromhex(host.private_key_hex()[2:])
    node = await node_factory.start(host_key=host, backend=LeakyBackend())
    rng = RecordingRng()
    client_key = PrivateKey()
    live_keys: list[SecretBytes] = []
    texts: dict[str, str] = {}
    answers: list[str] = []
    with trio.fail_after(GUARD_S):
        async with open_session(
            node.url, model="echo", job_id=78, client_key=client_key, rng=rng, protocol="v2"
        ) as session:
            assert isinstance(session, ClientSessionV2)
            for prompt in PROMPTS:
                answers.append((await session.complete(prompt)).text)
            conn = session._conn
            for cipher in (conn._send, conn._recv):
                assert cipher is not None
                live_keys += list(cipher.secrets_for_tests())
            live_values = [k.reveal() for k in live_keys]  # transport keys and chaining keys
            texts["repr session"] = repr(session)
            texts["repr conn"] = repr(conn)
            texts["repr driver state"] = repr([d.state for d in node.ctx.drivers])
            with pytest.raises(ClientError) as info:
                await session.complete(CRASH_PROMPT)
            texts["exception"] = f"{info.value} {info.value!r} {info.value.code}"
        async with raw_v2(node.port or 0, host.public_key) as raw:
            await raw.open_session()
            ping = raw.conn.ping()
            await raw.send(ping[:-1] + bytes((ping[-1] ^ 1,)))
            code, _ = await raw.wait_closed()
            assert code == 1008
        async with httpx.AsyncClient(base_url=node.url) as http:
            for path in ("/metrics", "/health", "/v1/version"):
                texts[f"http {path}"] = (await http.get(path)).text
        await node.wait_no_connections()
        texts["metrics after"] = node.ctx.metrics.render()
    assert answers == PROMPTS
    assert all(k.wiped and k.is_all_zero() for k in live_keys)

    secrets = {"host key": host_scalar, "client key": client_key.secret}
    for i, out in enumerate(o for o in rng.outputs if len(o) == 32):
        secrets[f"client rng {i}"] = out
        try:
            pair = SECP256K1.keypair(SecretBytes(out))
        except ValueError:
            continue
        es = SECP256K1.dh(pair, SECP256K1.parse_public(host.public_key))
        secrets[f"es from rng {i}"] = es.reveal()
        es.wipe()
        pair.wipe()
    for i, value in enumerate(live_values):
        secrets[f"transport secret {i}"] = value
    needles = {name: spellings(value) for name, value in secrets.items()}
    for i, prompt in enumerate([*PROMPTS, CRASH_PROMPT]):
        needles[f"prompt {i}"] = text_spellings(prompt)
    assert len(live_keys) == 4
    haystacks = dict(texts)
    for i, record in enumerate(caplog.records):
        haystacks[f"log record {i} ({record.name})"] = _render(record)
    found = leaks(needles, haystacks)
    assert not found, "\n".join(found[:20])
    assert any(r.name == "node.server" for r in caplog.records)  # the capture is real
