"""A frame fuzzer against a whole node (driver, protocol core, crypto, echo backend) over
in-memory WebSocket streams.

Each example opens one connection and sends a generated sequence: random text and binary
frames, arbitrary JSON, frames built from the protocol's own keys, the SDK's recorded
frames (a real init, then its messages) with mutations, oversized and deeply nested
frames. After every frame a ping must be answered (the node is alive and not stuck), and
every frame the node sends must be UTF-8 JSON of a known type, every error must carry a
code from :class:`ErrorCode`; the only closes allowed are 1008 (error budget) and 1009
(frame too big). Afterwards a well-behaved encrypted session on a new connection works,
and no connection or key is left behind. The node never crashes: an exception in it would
fail the test through the nursery.

``scripts/fuzz_node.py`` does the same at scale against a node process.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from tests.conftest import load_vector

from ._support import build_node, check_reply, memory_client

EXAMPLES: Final = 300
MAX_FRAME: Final = 16_384
SDK: Final = load_vector("sdk/session_init_dev.json")
CASES: Final = [
    (case["wire_text"], [m["wire_text"] for m in case["messages"]]) for case in SDK["cases"]
]
TYPES: Final = [
    "ping",
    "encrypted_session_init",
    "session_init",
    "encrypted_message",
    "prompt",
    "inference",
    "stream_cancel",
]
KEYS: Final = [
    "type",
    "id",
    "session_id",
    "sessionId",
    "job_id",
    "jobId",
    "chain_id",
    "prompt",
    "request",
    "payload",
    "reason",
    "model",
    "max_tokens",
    "stream",
]
PAYLOAD_KEYS: Final = [
    "ephPubHex",
    "ciphertextHex",
    "nonceHex",
    "signatureHex",
    "aadHex",
    "saltHex",
    "info",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
    | st.binary(max_size=40).map(bytes.hex)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
protocol_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=6)},
    optional={
        **{k: json_values for k in KEYS if k not in ("type", "payload")},
        "payload": st.dictionaries(st.sampled_from(PAYLOAD_KEYS), json_values, max_size=7)
        | json_values,
    },
)


@st.composite
def mutated(draw: st.DrawFn, wire: str) -> str:
    """One to three mutations of a recorded frame: drop, replace or corrupt a field, flip
    a character of the text, or truncate it."""
    kind = draw(st.sampled_from(["fields", "fields", "chars", "truncate", "none"]))
    if kind == "none":
        return wire
    if kind == "truncate":
        return wire[: draw(st.integers(0, len(wire) - 1))]
    if kind == "chars":
        text = list(wire)
        for _ in range(draw(st.integers(1, 3))):
            text[draw(st.integers(0, len(text) - 1))] = draw(st.characters(codec="utf-8"))
        return "".join(text)
    obj: dict[str, Any] = json.loads(wire)
    for _ in range(draw(st.integers(1, 3))):
        target = obj
        if isinstance(obj.get("payload"), dict) and draw(st.booleans()):
            target = obj["payload"]
        if not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        op = draw(st.sampled_from(["drop", "replace", "hexflip", "prefix"]))
        value = target[key]
        if op == "drop":
            del target[key]
        elif op == "replace" or not isinstance(value, str) or not value:
            target[key] = draw(json_values)
        elif op == "hexflip":
            i = draw(st.integers(0, len(value) - 1))
            target[key] = value[:i] + draw(st.sampled_from("0123456789abcdefxZ ")) + value[i + 1 :]
        else:
            target[key] = draw(st.sampled_from(["0x", "0X", "-", " "])) + value
    return json.dumps(obj)


Frame = str | bytes
single_frames: st.SearchStrategy[Frame] = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    json_values.map(json.dumps),
    protocol_objects.map(json.dumps),
    st.sampled_from([w for init, msgs in CASES for w in (init, *msgs)]).flatmap(mutated),
    st.integers(MAX_FRAME + 1, 3 * MAX_FRAME).map(lambda n: '{"type":"ping","x":"' + "a" * n),
    st.integers(60, 5_000).map(lambda n: "[" * n + "]" * n),
    st.just('{"type":"ping","id":"p"}'),
    st.just('{"type":"stream_cancel"}'),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[Frame]:
    """Random frames, optionally around a real SDK init and its (possibly mutated)
    messages, so that the fuzzing also reaches the encrypted-session states."""
    frames: list[Frame] = draw(st.lists(single_frames, min_size=1, max_size=6))
    if draw(st.booleans()):
        init, messages = draw(st.sampled_from(CASES))
        tail = [draw(mutated(m)) if draw(st.booleans()) else m for m in messages]
        at = draw(st.integers(0, len(frames)))
        frames[at:at] = [init, *tail[: draw(st.integers(0, len(tail)))]]
    return frames


async def _until_pong(client: Any, ping_id: str, streaming: list[bool]) -> None:
    """Read (and check) every frame up to the pong for ``ping_id``."""
    for _ in range(5_000):
        frame = check_reply(await client.ws.get_message())
        kind = frame["type"]
        if kind in ("stream_chunk", "encrypted_chunk", "encrypted_response"):
            streaming[0] = True
        elif kind == "stream_end":
            streaming[0] = False
        elif kind == "pong" and frame.get("id") == ping_id:
            return
    raise AssertionError("no pong")


class FailureLog(logging.Handler):
    """Connection failures the server contained (logged instead of crashing the node)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.error_types: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "WebSocket connection failed":
            self.error_types.append(str(getattr(record, "error_type", "?")))


async def _fuzz_one(frames: list[Frame]) -> None:
    failures = FailureLog()
    server_log = logging.getLogger("node.server")
    server_log.addHandler(failures)
    try:
        await _fuzz_connection(frames)
    finally:
        server_log.removeHandler(failures)
    # Only trio-websocket's closing-window race may end a connection abnormally (see
    # test_crash_resistance); anything else would be a bug in the node's own code.
    assert set(failures.error_types) <= {"LocalProtocolError"}, failures.error_types


async def _fuzz_connection(frames: list[Frame]) -> None:
    node = build_node(max_frame_bytes=MAX_FRAME, idle_timeout_s=1_000.0)
    closed_with: int | None = None
    with trio.fail_after(30):
        async with memory_client(node) as client:
            streaming = [False]
            try:
                for i, frame in enumerate(frames):
                    await client.ws.send_message(frame)
                    ping_id = f"fuzz-check-{i}"
                    await client.ws.send_message(json.dumps({"type": "ping", "id": ping_id}))
                    await _until_pong(client, ping_id, streaming)
                for _ in range(5_000):  # let a started answer finish
                    if not streaming[0]:
                        break
                    frame = check_reply(await client.ws.get_message())
                    streaming[0] = frame["type"] != "stream_end"
            except ConnectionClosed as exc:
                closed_with = exc.reason.code if exc.reason is not None else -1
        assert closed_with in (None, 1008, 1009), closed_with
        await node.wait_no_connections()
        assert node.held_keys() == []
        # A well-behaved client is served normally afterwards.
        async with memory_client(node) as client:
            _, session = await client.init(node.host_public_key, session_id="777")
            result = await client.ask(session, "still serving", request_id="ok")
            assert result.text == "still serving"
            assert result.final_reason == "stop"
        await node.wait_no_connections()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(conversations())
def test_the_node_survives_generated_and_mutated_frames(frames: list[Frame]) -> None:
    trio.run(_fuzz_one, frames)
