"""Generate the example frames and HTTP answers in docs/API.md from the code itself.

Every example is produced by the node's own code: client frames by ``node.crypto`` and
``node.client.frames``, the node's answers by the sans-I/O state machine
``node.protocol.connection.ConnectionState`` (the same object the server drives), HTTP
answers by ``node.server.app.NodeServer`` over an in-memory stream. Keys are fixed and
every random byte comes from a seeded SHA-256 stream, so the output is byte-for-byte
reproducible. Each generated block sits in docs/API.md between

    <!-- BEGIN GENERATED: name -->
    <!-- END GENERATED: name -->

Usage:
    python scripts/gen_api_examples.py          rewrite the generated blocks of docs/API.md
    python scripts/gen_api_examples.py --check  exit 1 (and name the blocks) when they differ

tests/docs/test_api_examples.py runs the check in CI, so the examples cannot drift.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing
from coincurve import PrivateKey

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.client import frames  # noqa: E402
from node.client.receiver import EncryptedResponseReader, PlaintextResponseReader  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.crypto import aead  # noqa: E402
from node.crypto.curve import (  # noqa: E402
    address_of,
    e2ee_v1_digest,
    parse_public_key,
    sha256,
    sign_recoverable,
)
from node.crypto.hostkey import HostKey  # noqa: E402
from node.crypto.kdf import ZERO_SALT, hkdf_sha256_fast32  # noqa: E402
from node.crypto.secret import SecretBytes  # noqa: E402
from node.crypto.session_init import ALG, seal_session_init  # noqa: E402
from node.inference.base import GenerationRequest, Piece  # noqa: E402
from node.inference.echo import EchoBackend  # noqa: E402
from node.inference.errors import InferenceError, ModelNotFound  # noqa: E402
from node.protocol.connection import (  # noqa: E402
    Action,
    CancelRequest,
    Close,
    ConnectionState,
    ProtocolConfig,
    Send,
    StartRequest,
)
from node.protocol.errors import ProtocolError  # noqa: E402
from node.protocol.messages import Connected, decode, encode  # noqa: E402
from node.protocol.replay import InitReplayCache  # noqa: E402
from node.protocol.storage import LEDGER, StorageHealth  # noqa: E402
from node.server.app import NodeServer  # noqa: E402
from node.server.context import NodeContext  # noqa: E402
from node.server.driver import CONNECTED_TEXT, _wire_error  # noqa: E402

API_MD = REPO / "docs" / "API.md"

#: Example keys. They are public (they are printed in docs/API.md): never use them.
HOST_KEY_HEX = "0x" + hashlib.sha256(b"llm-node docs: example host key").hexdigest()
CLIENT_KEY_HEX = "0x" + hashlib.sha256(b"llm-node docs: example client key").hexdigest()
OTHER_KEY_HEX = "0x" + hashlib.sha256(b"llm-node docs: some other key").hexdigest()
SESSION_ID = "42"
JOB_ID = "42"
CHAIN_ID = 84532
PRICE_PER_TOKEN = 100
MODEL = "echo"
PROMPT = "Hello, node"

BEGIN = "<!-- BEGIN GENERATED: {name} -->"
END = "<!-- END GENERATED: {name} -->"
_MARKER = re.compile(r"<!-- (BEGIN|END) GENERATED: ([a-z0-9-]+) -->")


class SeededRng:
    """``rng(n)``: n bytes of SHA-256(seed || counter), a reproducible stand-in for
    os.urandom. Only for examples: real code uses the OS CSPRNG."""

    def __init__(self, seed: str) -> None:
        self._seed = seed.encode()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = self._seed + self._counter.to_bytes(8, "big")
            self._buffer += hashlib.sha256(block).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def expect(condition: object, detail: object = "") -> None:
    """A check that survives ``python -O``: the generator refuses to write wrong examples."""
    if not condition:
        raise RuntimeError(f"generated example failed its own check: {detail}")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------- rendering


def pretty(frame_text: str) -> str:
    """One frame as indented JSON, keys in the order the code wrote them."""
    return json.dumps(json.loads(frame_text), indent=2, ensure_ascii=False)


def json_block(frame_text: str) -> str:
    return "```json\n" + pretty(frame_text) + "\n```"


def json_blocks(frame_texts: list[str]) -> str:
    return "\n\n".join(json_block(t) for t in frame_texts)


def text_block(text: str, lang: str = "text") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


# --------------------------------------------------------------------- node side


class NodeSide:
    """One connection's protocol state, answered the way the server's driver does."""

    def __init__(
        self,
        host: HostKey | None,
        *,
        replay: InitReplayCache,
        clock: FakeClock,
        config: ProtocolConfig | None = None,
        seed: str = "node",
        admission: Callable[[], None] | None = None,
    ) -> None:
        self.state = ConnectionState(
            host_key=host,
            replay_cache=replay,
            clock=clock,
            config=config,
            rng=SeededRng(seed),
            admission=admission,
        )
        self.started: StartRequest | None = None
        self.cancelled = False
        self.closed: Close | None = None

    def _sends(self, actions: list[Action]) -> list[str]:
        out: list[str] = []
        for action in actions:
            if isinstance(action, Send):
                out.append(encode(action.message))
            elif isinstance(action, StartRequest):
                self.started = action
            elif isinstance(action, CancelRequest):
                self.cancelled = True
            elif isinstance(action, Close):
                self.closed = action
        return out

    def receive(self, text: str) -> list[str]:
        """Decode one client frame and return the frames the node sends back."""
        try:
            message = decode(text)
        except ProtocolError as exc:
            return self._sends(self.state.reject(exc, exc.request_id))
        return self._sends(self.state.receive(message))

    def stream(self, pieces: list[Piece]) -> list[str]:
        return [encode(self.state.piece(p.text, p.tokens)) for p in pieces]

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> list[str]:
        return [
            encode(f)
            for f in self.state.finish(
                reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            )
        ]

    def fail(
        self, error: InferenceError, completion_tokens: int, prompt_tokens: int = 0
    ) -> list[str]:
        """The driver's failure ending; ``prompt_tokens`` as the backend reported them
        before it failed (0 when it failed before processing the prompt)."""
        wire = _wire_error(error)
        return self._sends(
            self.state.fail(wire, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        )


async def _echo(backend: EchoBackend, prompt: str) -> tuple[list[Piece], Any]:
    pieces: list[Piece] = []

    async def emit(piece: Piece) -> None:
        pieces.append(piece)
        await trio.lowlevel.checkpoint()

    try:
        result = await backend.generate(GenerationRequest(prompt=prompt), emit)
    except InferenceError as exc:
        return pieces, exc
    return pieces, result


def run_echo(prompt: str, **options: Any) -> tuple[list[Piece], Any]:
    return trio.run(_echo, EchoBackend(**options), prompt)


# ------------------------------------------------------------------- client side


class ClientSide:
    """Builds client frames the way ``node.client`` does, with seeded randomness."""

    def __init__(self, host_public: bytes, *, key_hex: str = CLIENT_KEY_HEX, seed: str) -> None:
        self.host_public = host_public
        self.key = PrivateKey(bytes.fromhex(key_hex[2:]))
        self.rng = SeededRng(seed)
        self.session_key = b""
        self.next_message = 0

    def init_payload(self, **overrides: Any) -> dict[str, Any]:
        self.session_key = self.rng(32)
        self.next_message = 0
        options: dict[str, Any] = {
            "job_id": JOB_ID,
            "model_name": MODEL,
            "price_per_token": PRICE_PER_TOKEN,
        }
        options.update(overrides)
        return seal_session_init(
            self.host_public, self.key, self.session_key, rng=self.rng, **options
        )

    def init_frame(self, payload: dict[str, Any] | None = None) -> str:
        return frames.encrypted_session_init_frame(
            payload if payload is not None else self.init_payload(),
            session_id=SESSION_ID,
            job_id=JOB_ID,
            chain_id=CHAIN_ID,
        )

    def message_frame(
        self, request: dict[str, Any] | str, request_id: str, *, aad: bytes | None = None
    ) -> str:
        body = (request if isinstance(request, str) else frames.dumps(request)).encode()
        if aad is None:
            aad = b"message_%d" % self.next_message
            self.next_message += 1
        nonce = self.rng(aead.NONCE_SIZE)
        return frames.encrypted_message_frame(
            session_id=SESSION_ID,
            request_id=request_id,
            ciphertext=aead.seal(self.session_key, nonce, body, aad),
            nonce=nonce,
            aad=aad,
        )

    def custom_init(self, session_json: bytes, *, signer: PrivateKey | None = None) -> str:
        """An init whose sealed session data is ``session_json`` (for error examples)."""
        eph = PrivateKey(self.rng(32))
        eph_pub = eph.public_key.format(compressed=True)
        host_point = parse_public_key(self.host_public)
        shared = host_point.multiply(eph.secret).format(compressed=True)[1:]
        key = bytes(hkdf_sha256_fast32(shared))
        nonce = self.rng(aead.NONCE_SIZE)
        digest = e2ee_v1_digest(eph_pub, self.host_public, ZERO_SALT, nonce, b"", b"")
        signature = sign_recoverable(signer or self.key, digest)
        payload = {
            "ephPubHex": eph_pub.hex(),
            "saltHex": ZERO_SALT.hex(),
            "nonceHex": nonce.hex(),
            "ciphertextHex": aead.seal(key, nonce, session_json, b"").hex(),
            "signatureHex": signature.hex(),
            "recid": signature[64],
            "alg": ALG,
            "info": "",
            "aadHex": "",
        }
        return self.init_frame(payload)


def request_body(prompt: str = PROMPT) -> dict[str, Any]:
    return {"prompt": prompt, "model": MODEL, "max_tokens": 64, "temperature": 0, "stream": True}


def check_stream(key: bytes, request_id: str, server_frames: list[str], text: str) -> None:
    """The client's strict reader must accept the node's frames and yield ``text``."""
    reader = EncryptedResponseReader(SecretBytes(key), session_id=SESSION_ID, request_id=request_id)
    got = ""
    for raw in server_frames:
        event = reader.feed(frames.parse_server_frame(raw))
        got += getattr(event, "text", "")
    expect(reader.done and got == text, "the client reader rejected the generated stream")


# ------------------------------------------------------------------------ HTTP


async def _http(ctx: NodeContext, requests: list[bytes]) -> list[bytes]:
    server = NodeServer(ctx)
    out: list[bytes] = []
    for raw in requests:
        client, server_side = trio.testing.memory_stream_pair()
        answer = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_stream, server_side)
            await client.send_all(raw)
            while True:
                data = await client.receive_some(65536)
                if not data:
                    break
                answer += data
        await client.aclose()
        out.append(bytes(answer))
    return out


def http_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"
    if body:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def show_http(raw_request: bytes, raw_response: bytes) -> str:
    request = raw_request.decode().replace("\r\n", "\n").rstrip("\n")
    response = raw_response.decode().replace("\r\n", "\n").rstrip("\n")
    return text_block(request, "http") + "\n\n" + text_block(response, "http")


# ---------------------------------------------------------------------- examples


def build_examples() -> dict[str, str]:
    out: dict[str, str] = {}
    host = HostKey.parse(HOST_KEY_HEX)
    clock = FakeClock()
    replay = InitReplayCache(window_s=900.0, clock=clock)

    # ---- inputs and key schedule ---------------------------------------------------
    client = ClientSide(host.public_key, seed="client")
    init_payload = client.init_payload()
    init_text = client.init_frame(init_payload)
    session_key = client.session_key
    eph_pub = bytes.fromhex(init_payload["ephPubHex"])
    nonce = bytes.fromhex(init_payload["nonceHex"])
    with host.ecdh_x(parse_public_key(eph_pub)) as shared:
        shared_x = shared.reveal()
    init_key = bytes(hkdf_sha256_fast32(shared_x))
    session_plain = aead.open(init_key, nonce, bytes.fromhex(init_payload["ciphertextHex"]))
    digest = e2ee_v1_digest(eph_pub, host.public_key, ZERO_SALT, nonce, b"", b"")
    preimage_note = (
        'E2EEv1 | E(33) | H(33) | S(32 zero bytes) | N(24) | I(empty)   (no AAD part: aadHex is "")'
    )
    out["inputs"] = text_block(
        "\n".join(
            [
                f"host private key      {HOST_KEY_HEX}",
                f"host public key       {host.public_key_hex}",
                f"host address          {host.address}",
                f"client private key    {CLIENT_KEY_HEX}",
                f"client address        {address_of(client.key.public_key)}",
                f"session key           {session_key.hex()}",
                "",
                "derived by the node from the init below:",
                f"ECDH x-coordinate     {shared_x.hex()}",
                f"init key (HKDF)       {init_key.hex()}",
                f"signed digest         {digest.hex()}",
                f"  over                {preimage_note}",
            ]
        )
    )
    out["session-plaintext"] = text_block(session_plain.decode(), "json")

    # ---- connection, init, ack ----------------------------------------------------------
    out["connected"] = json_block(encode(Connected(CONNECTED_TEXT)))
    node = NodeSide(host, replay=replay, clock=clock)
    out["encrypted-session-init"] = json_block(init_text)
    ack = node.receive(init_text)
    expect(len(ack) == 1 and '"session_init_ack"' in ack[0], ack)
    out["session-init-ack"] = json_block(ack[0])

    # ---- one encrypted request, streamed --------------------------------------------------
    body = request_body()
    out["request-plaintext"] = text_block(frames.dumps(body), "json")
    message_text = client.message_frame(body, "req-1")
    out["encrypted-message"] = json_block(message_text)
    expect(node.receive(message_text) == [] and node.started is not None)
    pieces, result = run_echo(PROMPT)
    streamed = node.stream(pieces)
    ending = node.finish(result.finish_reason, result.prompt_tokens, result.completion_tokens)
    check_stream(session_key, "req-1", streamed + ending, PROMPT)
    out["encrypted-chunks"] = json_blocks(streamed)
    out["encrypted-chunk-final"] = json_block(ending[0])
    out["encrypted-response"] = json_block(ending[1])
    out["stream-end"] = json_block(ending[2])

    # ---- ping --------------------------------------------------------------------------
    ping = frames.ping_frame("p-1")
    out["ping"] = json_block(ping) + "\n\n" + json_blocks(node.receive(ping))

    # ---- busy, then cancel ---------------------------------------------------------------
    second = client.message_frame(request_body("one two three four"), "req-2")
    expect(node.receive(second) == [])
    busy = client.message_frame(request_body("too soon"), "req-3")
    busy_answer = node.receive(busy)
    cancel = frames.stream_cancel_frame(session_id=SESSION_ID, reason="user pressed stop")
    first_piece = node.stream([Piece("one", 1)])
    expect(node.receive(cancel) == [] and node.cancelled)
    # The driver: the prompt tokens the backend reported (4 words for echo), and the
    # completion tokens delivered before the cancel.
    cancelled = node.finish("cancelled", 4, 1)
    check_stream(session_key, "req-2", first_piece + cancelled, "one")
    out["stream-cancel"] = (
        json_block(cancel)
        + "\n\nThe node stops the backend and ends the request (first chunk, then the ending):"
        + "\n\n"
        + json_blocks(first_piece + cancelled)
    )

    # ---- inference failure after streaming began -----------------------------------------
    out["inference-failed-stream"] = json_blocks(_failure_frames(host))

    # ---- plaintext (deprecated) mode ----------------------------------------------------
    plain = NodeSide(host, replay=replay, clock=clock, seed="node-plain")
    plain_init = frames.session_init_frame(session_id="7", job_id="7", chain_id=CHAIN_ID)
    plain_ack = plain.receive(plain_init)
    plain_prompt = frames.prompt_frame(
        session_id="7",
        request_id="p-1",
        request={"prompt": "hi there", "model": MODEL, "max_tokens": 16, "stream": True},
    )
    expect(plain.receive(plain_prompt) == [])
    pieces, result = run_echo("hi there")
    plain_frames = plain.stream(pieces) + plain.finish(
        result.finish_reason, result.prompt_tokens, result.completion_tokens
    )
    reader = PlaintextResponseReader(session_id="7", request_id="p-1")
    for raw in plain_frames:
        reader.feed(frames.parse_server_frame(raw))
    expect(reader.done)
    out["plaintext-session-init"] = json_block(plain_init) + "\n\n" + json_blocks(plain_ack)
    out["plaintext-prompt"] = json_block(plain_prompt) + "\n\n" + json_blocks(plain_frames)

    # ---- one example per error code -------------------------------------------------------
    out["error-examples"] = error_examples(host, busy_answer)

    # ---- HTTP ------------------------------------------------------------------------
    out.update(http_examples(host))
    host.wipe()
    return out


def error_examples(host: HostKey, busy_answer: list[str]) -> str:
    sections: list[tuple[str, str, str, list[str]]] = []  # (code, trigger, client frame, answer)

    def fresh(seed: str, **config: Any) -> tuple[NodeSide, ClientSide, FakeClock]:
        clock = FakeClock()
        replay = InitReplayCache(window_s=900.0, clock=clock)
        cfg = ProtocolConfig(**config) if config else None
        node = NodeSide(host, replay=replay, clock=clock, config=cfg, seed="n-" + seed)
        return node, ClientSide(host.public_key, seed="c-" + seed), clock

    def add(code: str, trigger: str, sent: str, answer: list[str]) -> None:
        errors = [a for a in answer if json.loads(a).get("type") == "error"]
        expect(errors and json.loads(errors[0])["code"] == code, (code, answer))
        sections.append((code, trigger, sent, answer))

    def init_with(seed: str, change: Callable[[dict[str, Any]], None]) -> tuple[str, list[str]]:
        node, client, _ = fresh(seed)
        payload = client.init_payload()
        change(payload)
        text = client.init_frame(payload)
        return text, node.receive(text)

    sent = '{"type":"hello","id":"x-1"}'
    node, client, clock = fresh("invalid-message")
    add(
        "INVALID_MESSAGE",
        "An unknown `type` (also: invalid JSON, a non-object, a binary frame, a bad `id`).",
        sent,
        node.receive(sent),
    )

    sent = frames.dumps({"type": "encrypted_session_init", "session_id": "42", "id": "x-2"})
    add(
        "MISSING_PAYLOAD",
        "`encrypted_session_init` without `payload`.",
        sent,
        fresh("missing-payload")[0].receive(sent),
    )

    def short_eph(p: dict[str, Any]) -> None:
        p["ephPubHex"] = p["ephPubHex"][:-2]

    add(
        "INVALID_PAYLOAD",
        "An ephemeral key of 32 bytes instead of 33 or 65.",
        *init_with("invalid-payload", short_eph),
    )

    def bad_hex(p: dict[str, Any]) -> None:
        p["nonceHex"] = "zz" + p["nonceHex"][2:]

    add(
        "INVALID_HEX_ENCODING",
        "A non-hex character in `nonceHex`.",
        *init_with("invalid-hex", bad_hex),
    )

    def short_nonce(p: dict[str, Any]) -> None:
        p["nonceHex"] = p["nonceHex"][:24]

    add(
        "INVALID_NONCE_SIZE",
        "A 12-byte nonce (XChaCha20 needs 24).",
        *init_with("nonce-size", short_nonce),
    )

    def tamper(p: dict[str, Any]) -> None:
        last = int(p["ciphertextHex"][-2:], 16) ^ 1
        p["ciphertextHex"] = p["ciphertextHex"][:-2] + f"{last:02x}"

    add(
        "DECRYPTION_FAILED",
        "One bit of `ciphertextHex` flipped (or sealed for another host key).",
        *init_with("decryption", tamper),
    )

    node, client, _ = fresh("signature")
    session = {
        "sessionKey": client.rng(32).hex(),
        "jobId": JOB_ID,
        "modelName": MODEL,
        "pricePerToken": PRICE_PER_TOKEN,
        "recoveryPublicKey": "0x" + client.key.public_key.format(compressed=True).hex(),
    }
    other = PrivateKey(bytes.fromhex(OTHER_KEY_HEX[2:]))
    sent = client.custom_init(frames.dumps(session).encode(), signer=other)
    add(
        "INVALID_SIGNATURE",
        "The init is signed by another key than its `recoveryPublicKey`.",
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("session-data")
    sent = client.custom_init(b'{"jobId":"42","modelName":"echo","pricePerToken":100}')
    add(
        "INVALID_SESSION_DATA",
        "The decrypted session data has no `sessionKey`.",
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("aad")
    node.receive(client.init_frame())
    sent = client.message_frame(request_body(), "x-3", aad=b"msg-0")
    add(
        "INVALID_AAD",
        "An `encrypted_message` whose AAD is `msg-0` instead of `message_<k>`.",
        sent,
        node.receive(sent),
    )

    node, client, clock = fresh("replay")
    sent = client.init_frame()
    node.receive(sent)
    again = NodeSide(host, replay=node.state.replay_cache, clock=clock, seed="n-replay-2")
    add(
        "REPLAY_DETECTED",
        "The same `encrypted_session_init` sent again (here on a second "
        "connection) within the replay window; also `message_<k>` with k below the next "
        "expected index.",
        sent,
        again.receive(sent),
    )

    node, client, _ = fresh("denied", allowed_clients=frozenset({"0x" + "00" * 19 + "01"}))
    sent = client.init_frame()
    add(
        "SESSION_AUTH_DENIED",
        "A client address not in `--allowed-clients`.",
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("not-found")
    node.receive(client.init_frame())
    sent = client.message_frame(request_body(), "x-4").replace(
        '"session_id":"42"', '"session_id":"43"'
    )
    add(
        "SESSION_KEY_NOT_FOUND",
        "An `encrypted_message` for a session this connection has not opened.",
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("missing-id")
    node.receive(client.init_frame())
    sent = client.message_frame(request_body(), "x-5").replace('"session_id":"42",', "")
    add(
        "MISSING_SESSION_ID",
        "An `encrypted_message` without `session_id`.",
        sent,
        node.receive(sent),
    )

    node, client, clock = fresh("expired")
    node.receive(client.init_frame())
    clock.now += node.state.config.session_ttl_s
    sent = client.message_frame(request_body(), "x-6")
    add(
        "SESSION_EXPIRED",
        "A message after the session's TTL (`--session-ttl`, default 24 h).",
        sent,
        node.receive(sent),
    )

    clock = FakeClock()
    keyless = NodeSide(None, replay=InitReplayCache(window_s=900.0, clock=clock), clock=clock)
    sent = ClientSide(host.public_key, seed="c-no-key").init_frame()
    add(
        "ENCRYPTION_NOT_SUPPORTED",
        "An encrypted request to a node without `HOST_PRIVATE_KEY`.",
        sent,
        keyless.receive(sent),
    )

    node, client, _ = fresh("required", require_encryption=True)
    sent = frames.session_init_frame(session_id="7", job_id="7", chain_id=CHAIN_ID)
    add(
        "ENCRYPTION_REQUIRED",
        "A plaintext `session_init` or `prompt` to a node started with `--require-encryption`.",
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("mixed")
    node.receive(client.init_frame())
    sent = frames.prompt_frame(session_id="42", request_id="x-7", request={"prompt": "hi"})
    add(
        "MIXED_MODE_REJECTED",
        "A plaintext `prompt` on a connection that holds an encrypted session.",
        sent,
        node.receive(sent),
    )

    add(
        "REQUEST_IN_PROGRESS",
        "A second request while one is streaming on the connection.",
        "(an encrypted_message with id req-3 while req-2 streams)",
        busy_answer,
    )

    node, client, _ = fresh("action")
    node.receive(client.init_frame())
    sent = client.message_frame({"action": "embed", "prompt": "x"}, "x-8")
    add(
        "UNSUPPORTED_ACTION",
        'Decrypted request `{"action":"embed",...}`.',
        sent,
        node.receive(sent),
    )

    node, client, _ = fresh("model")
    node.receive(client.init_frame())
    sent = client.message_frame({"prompt": "hi", "model": "gpt-9"}, "x-9")
    node.receive(sent)
    add(
        "MODEL_NOT_FOUND",
        "A `model` the backend does not serve (here the llama backend "
        "serving `SmolLM2-135M-Instruct.Q4_1`).",
        sent,
        node.fail(ModelNotFound(["SmolLM2-135M-Instruct.Q4_1"]), 0),
    )

    node, client, _ = fresh("tokens")
    node.receive(client.init_frame())
    long_prompt = "one two three four five six"
    sent = client.message_frame(request_body(long_prompt), "x-10")
    node.receive(sent)
    _, error = run_echo(long_prompt, context_window=4)
    add(
        "TOKEN_LIMIT_EXCEEDED",
        "A prompt longer than the context window (here 6 tokens for "
        "a window of 4). Extra fields `prompt_tokens` and `context_window_size`.",
        sent,
        node.fail(error, 0),
    )

    add(
        "INFERENCE_FAILED",
        "The backend failed (here after one piece had streamed). See "
        "[Failure after streaming began](#failure-after-streaming-began).",
        "(the request of that example)",
        [f for f in _failure_frames(host) if json.loads(f).get("type") == "error"],
    )

    node, client, _ = fresh("rate")
    answers: list[str] = []
    for i in range(node.state.config.init_burst + 1):
        sent = client.init_frame()
        answers = node.receive(sent)
        if i < node.state.config.init_burst:
            expect('"session_init_ack"' in answers[0])
    add(
        "RATE_LIMITED",
        "The 11th `encrypted_session_init` on one connection within a second "
        "(burst 10, refill 1 per second); also more new sessions from one network or client "
        "address than `--address-init-burst` allows, a full replay cache, or a full llama "
        "queue (`--queue-limit`).",
        "(the 11th init)",
        answers,
    )

    storage = StorageHealth(on_ledger_failure="refuse")
    storage.failed(LEDGER)
    clock = FakeClock()
    node = NodeSide(
        host,
        replay=InitReplayCache(window_s=900.0, clock=clock),
        clock=clock,
        seed="n-storage",
        admission=storage.admit,
    )
    client = ClientSide(host.public_key, seed="c-storage")
    sent = client.init_frame()
    add(
        "STORAGE_UNAVAILABLE",
        "The node cannot write what it must record: its replay cache (an init cannot be "
        "accepted unremembered), or its ledger while `--on-ledger-failure refuse` is set "
        "(new sessions and requests are refused until a write succeeds). Not charged to "
        "the error budget; the connection stays open.",
        "(any init or request)",
        node.receive(sent),
    )

    parts: list[str] = []
    for code, trigger, sent, answer in sections:
        parts.append(f"#### `{code}`\n\n{trigger}")
        if sent and not sent.startswith("(") and '"payload"' not in sent:
            parts.append("Sent: `" + sent + "`")
        shown = [a for a in answer if json.loads(a).get("type") == "error"]
        parts.append(json_blocks(shown))
        if len(shown) < len(answer):
            parts.append(
                "The `error` is followed by the error ending of the request: the final "
                "`encrypted_chunk`, an `encrypted_response` sealing `error` and a `stream_end` "
                "with reason `error` (see [Failure after streaming began]"
                "(#failure-after-streaming-began))."
            )
    return "\n\n".join(parts)


def _failure_frames(host: HostKey) -> list[str]:
    clock = FakeClock()
    node = NodeSide(
        host, replay=InitReplayCache(window_s=900.0, clock=clock), clock=clock, seed="node-fail"
    )
    client = ClientSide(host.public_key, seed="client-fail")
    node.receive(client.init_frame())
    node.receive(client.message_frame(request_body("alpha beta gamma"), "req-9"))
    got, error = run_echo("alpha beta gamma", fail_after_pieces=1)
    return node.stream(got) + node.fail(error, completion_tokens=1, prompt_tokens=3)


def http_examples(host: HostKey) -> dict[str, str]:
    clock = FakeClock()
    ctx = NodeContext(
        config=NodeConfig(port=0),
        host_key=host,
        backend=EchoBackend(),
        replay_cache=InitReplayCache(window_s=900.0, clock=clock),
    )
    challenge = sha256(b"llm-node docs: example challenge")
    challenge_body = frames.dumps({"challenge": challenge.hex()}).encode()
    named = [
        ("http-health", http_request("GET", "/health")),
        ("http-version", http_request("GET", "/v1/version")),
        ("http-models", http_request("GET", "/v1/models")),
        ("http-host-key", http_request("GET", "/v1/host-key")),
        ("http-challenge", http_request("POST", "/v1/auth/challenge", challenge_body)),
        ("http-challenge-bad", http_request("POST", "/v1/auth/challenge", b'{"challenge":"00"}')),
        ("http-ws-no-upgrade", http_request("GET", "/v1/ws")),
        ("http-not-found", http_request("GET", "/v1/chat")),
        ("http-wrong-method", http_request("POST", "/v1/models", b"{}")),
        ("http-metrics", http_request("GET", "/metrics")),
    ]
    answers = trio.run(_http, ctx, [raw for _, raw in named])
    out = {name: show_http(raw, answer) for (name, raw), answer in zip(named, answers, strict=True)}
    # The challenge answer, checked the way a client checks it.
    response = json.loads(answers[4].split(b"\r\n\r\n", 1)[1])
    signature = bytes.fromhex(response["signature"]) + bytes((response["recid"],))
    from node.crypto.curve import recover_public_key

    signer = recover_public_key(sha256(challenge), signature)
    expect(signer.format(compressed=True) == host.public_key)
    keyless = NodeContext(
        config=NodeConfig(port=0),
        host_key=None,
        backend=EchoBackend(),
        replay_cache=InitReplayCache(window_s=900.0, clock=clock),
    )
    (no_key,) = trio.run(_http, keyless, [http_request("GET", "/v1/host-key")])
    out["http-host-key-none"] = show_http(http_request("GET", "/v1/host-key"), no_key)
    return out


# ---------------------------------------------------------------------- the file


def apply(text: str, examples: dict[str, str]) -> str:
    """``text`` with every generated block replaced; raises ValueError on marker errors."""
    found: list[str] = []
    pieces: list[str] = []
    pos = 0
    for match in _MARKER.finditer(text):
        kind, name = match.groups()
        if kind == "BEGIN":
            if name not in examples:
                raise ValueError(f"docs/API.md names an unknown generated block {name!r}")
            if name in found:
                raise ValueError(f"generated block {name!r} appears twice")
            pieces.append(text[pos : match.end()])
            pieces.append("\n" + examples[name] + "\n")
            found.append(name)
            end = text.find(END.format(name=name), match.end())
            if end < 0:
                raise ValueError(f"generated block {name!r} has no END marker")
            pos = end
        elif not found or found[-1] != name or pos != match.start():
            raise ValueError(f"END marker of {name!r} without its BEGIN")
    pieces.append(text[pos:])
    missing = sorted(set(examples) - set(found))
    if missing:
        raise ValueError(f"docs/API.md lacks the generated blocks {', '.join(missing)}")
    return "".join(pieces)


def changed_blocks(current: str, wanted: str) -> list[str]:
    def blocks(text: str) -> dict[str, str]:
        return {
            m.group(1): m.group(2)
            for m in re.finditer(
                r"<!-- BEGIN GENERATED: ([a-z0-9-]+) -->(.*?)<!-- END GENERATED: \1 -->",
                text,
                re.S,
            )
        }

    a, b = blocks(current), blocks(wanted)
    return sorted(name for name in b if a.get(name) != b[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    parser.add_argument("--path", type=Path, default=API_MD)
    args = parser.parse_args(argv)
    current = args.path.read_text(encoding="utf-8")
    wanted = apply(current, build_examples())
    if args.check:
        if wanted != current:
            names = ", ".join(changed_blocks(current, wanted)) or "(outside the blocks)"
            print(
                f"{args.path}: generated examples are out of date: {names}\n"
                "run: python scripts/gen_api_examples.py",
                file=sys.stderr,
            )
            return 1
        print(f"{args.path}: generated examples are up to date")
        return 0
    if wanted != current:
        args.path.write_text(wanted, encoding="utf-8")
        print(f"updated {args.path}")
    else:
        print(f"{args.path}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
