"""What a client can make the node hold is bounded (issue 14, finding 2).

The outside review opened 4 connections with 64 sessions each, every init carrying a
``vectorDatabase`` of ``{},{},...`` as large as a frame allows. The node kept it parsed
for the session's life (about 20 times its text: roughly 10 MB a session) and went from
196 MB to 2,765 MB, inside every rate limit and without one error. Now each field is
bounded, a session keeps ``vectorDatabase`` as text, and every session reserves its
cost against a per-connection and a per-node budget (docs/API.md, "Limits").
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from contextlib import AsyncExitStack
from typing import Any, Final

import pytest
import trio
import trio.testing
from coincurve import PrivateKey

from node.crypto.errors import ErrorCode, NodeError
from node.crypto.session_init import (
    MAX_MODEL_NAME_CHARS,
    MAX_SESSION_DATA_BYTES,
    MAX_VECTOR_DATABASE_BYTES,
)
from node.protocol.connection import (
    MAX_SESSION_BYTES_PER_CONNECTION,
    SESSION_OVERHEAD_BYTES,
    SessionMemory,
    session_cost,
)
from tests.protocol._support import (
    error_code,
    frame,
    make_conn,
    make_init,
    sends,
)
from tests.server._support import build_node, init_frame, memory_client, seal_raw_init

CONNECTIONS: Final = 4
SESSIONS: Final = 64
GUARD_S: Final = 3600  # virtual seconds (MockClock): 64 inits at one a second fit


def empty_objects(size: int) -> dict[str, Any]:
    """``{"x":[{},{},...]}`` of exactly ``size`` characters as compact JSON (size >= 9):
    the shape that grows most once parsed (a dict per three characters)."""
    # {"x":[...]} with c empty objects is 3c + 7 characters; ,"p":"" adds 7 more.
    count = (size - 7) // 3 if (size - 7) % 3 == 0 else (size - 14) // 3
    value: dict[str, Any] = {"x": [{}] * count}
    pad = size - (3 * count + 7)
    if pad:
        value["p"] = "a" * (pad - 7)
    assert len(json.dumps(value, separators=(",", ":"))) == size
    return value


LARGEST: Final = empty_objects(MAX_VECTOR_DATABASE_BYTES)
COST: Final = session_cost("echo", json.dumps(LARGEST, separators=(",", ":")))
PER_CONNECTION: Final = MAX_SESSION_BYTES_PER_CONNECTION // COST  # sessions that fit


# ------------------------------------------------------------------ single fields


def test_vector_database_over_its_limit_is_refused() -> None:
    conn = make_conn()
    at_limit = make_init(b"\x01" * 32, vector_database=LARGEST)
    assert sends(conn.receive(at_limit))[0].type == "session_init_ack"
    over = make_init(
        b"\x02" * 32,
        session_id="43",
        vector_database=empty_objects(MAX_VECTOR_DATABASE_BYTES + 1),
    )
    assert error_code(conn.receive(over)) is ErrorCode.INVALID_SESSION_DATA


def test_the_session_keeps_the_vector_database_as_text() -> None:
    conn = make_conn()
    conn.receive(make_init(b"\x01" * 32, vector_database={"manifestPath": "m", "n": [1, {}]}))
    session = conn.sessions["42"]
    assert session.vector_database_json == '{"manifestPath":"m","n":[1,{}]}'
    assert session.vector_database == {"manifestPath": "m", "n": [1, {}]}
    assert session.cost == session_cost(session.model_name, session.vector_database_json)
    assert not any(isinstance(v, dict | list) for v in vars_of(session))


def vars_of(obj: Any) -> list[Any]:
    return [getattr(obj, name) for name in obj.__slots__ if hasattr(obj, name)]


@pytest.mark.parametrize(
    ("name", "accepted"),
    [("m" * MAX_MODEL_NAME_CHARS, True), ("m" * (MAX_MODEL_NAME_CHARS + 1), False)],
)
def test_model_name_length_is_bounded(name: str, accepted: bool) -> None:
    conn = make_conn()
    actions = conn.receive(make_init(b"\x01" * 32, model_name=name))
    if accepted:
        assert conn.sessions["42"].model_name == name
    else:
        assert error_code(actions) is ErrorCode.INVALID_SESSION_DATA
        assert not conn.sessions


def test_session_data_over_its_limit_is_refused_before_decrypting() -> None:
    from node.crypto.session_init import open_session_init, parse_init_payload
    from tests.protocol._support import HOST

    payload = seal_raw_init(HOST.public_key, PrivateKey(), b" " * (MAX_SESSION_DATA_BYTES + 1))
    bad = bytearray.fromhex(payload["ciphertextHex"])
    bad[0] ^= 1  # would not decrypt: the size alone decides
    payload["ciphertextHex"] = bad.hex()
    with pytest.raises(NodeError, match="16384") as info:
        open_session_init(HOST, parse_init_payload(payload))
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA


# ------------------------------------------------------------------ budgets


def fill(conn: Any, count: int, start: int = 1) -> list[ErrorCode | None]:
    """``count`` inits with the largest vectorDatabase; the error code of each, or None."""
    out: list[ErrorCode | None] = []
    for i in range(start, start + count):
        actions = conn.receive(
            make_init(
                bytes([i % 256]) * 32,
                session_id=str(i),
                job_id=i,
                vector_database=LARGEST,
                model_name="echo",
                client=PrivateKey(),
            )
        )
        codes = [m.code for m in sends(actions) if m.type == "error"]
        out.append(ErrorCode(codes[0]) if codes else None)
    return out


def test_one_connection_holds_at_most_its_budget() -> None:
    conn = make_conn(init_burst=1000)
    results = fill(conn, PER_CONNECTION + 2)
    assert results[:PER_CONNECTION] == [None] * PER_CONNECTION
    assert results[PER_CONNECTION:] == [ErrorCode.RATE_LIMITED] * 2
    assert conn.session_bytes == PER_CONNECTION * COST <= MAX_SESSION_BYTES_PER_CONNECTION
    # re-initialising a held session id with less data frees room for another session
    conn.receive(make_init(b"\xf9" * 32, session_id="1", job_id=1, model_name="echo"))
    assert conn.session_bytes == (PER_CONNECTION - 1) * COST + session_cost("echo", None)
    assert fill(conn, 1, start=500) == [None]


def test_the_node_budget_is_shared_by_its_connections_and_released_on_close() -> None:
    memory = SessionMemory(3 * COST)
    first = make_conn(init_burst=1000)
    second = make_conn(init_burst=1000)
    first.memory = second.memory = memory
    assert fill(first, 2) == [None, None]
    assert fill(second, 2, start=10) == [None, ErrorCode.RATE_LIMITED]
    assert memory.held == 3 * COST
    first.close()
    assert memory.held == COST
    assert fill(second, 2, start=20) == [None, None]
    second.close()
    assert memory.held == 0


def test_expiry_and_reinit_release_what_a_session_held() -> None:
    from tests.protocol._support import Clock

    clock = Clock()
    memory = SessionMemory(10**9)
    conn = make_conn(clock=clock, session_ttl_s=60.0, init_burst=1000)
    conn.memory = memory
    fill(conn, 3)
    assert memory.held == conn.session_bytes == 3 * COST
    conn.receive(make_init(b"\x05" * 32, session_id="2", job_id=99, model_name="echo"))
    assert memory.held == 2 * COST + session_cost("echo", None)  # a new session replaced it
    clock.advance(61)
    conn.expire_sessions()
    assert memory.held == conn.session_bytes == 0


def test_plaintext_sessions_count_too() -> None:
    memory = SessionMemory(2 * SESSION_OVERHEAD_BYTES)
    conn = make_conn()
    conn.memory = memory
    opened = [conn.receive(frame({"type": "session_init", "session_id": str(i)})) for i in range(3)]
    assert [error_code(a) if any(m.type == "error" for m in sends(a)) else None for a in opened][
        2
    ] is ErrorCode.RATE_LIMITED
    assert memory.held == 2 * SESSION_OVERHEAD_BYTES
    prompt = conn.receive(frame({"type": "prompt", "session_id": "9", "prompt": "hi"}))
    assert error_code(prompt) is ErrorCode.RATE_LIMITED
    conn.close()
    assert memory.held == 0


# ------------------------------------------------------------------ the attack


def traced(*, collect: bool = True) -> int:
    if collect:
        gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_the_reviewers_attack_leaves_node_memory_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """4 connections, each first sending an init whose vectorDatabase of ``{},`` is as
    large as a frame allows, then 64 inits with one as large as the node accepts, one a
    second (inside the init rate limit).

    The bounds, in bytes traced by tracemalloc (node and test client share the process):
    the huge init may leave each connection's transport buffers grown to a few times the
    frame (``FRAME_ALLOWANCE``: memory streams and WebSocket buffers keep their capacity),
    but no session data; the sessions after it hold at most what the per-connection
    budgets allow (the node budget, 64 MiB, is larger), with half again for the
    allocator's bookkeeping: ``bound``. The code before the fix held about 10 MB after
    the first huge init alone."""
    huge = empty_objects(400_000)  # an init frame of about 0.8 MiB
    frame_allowance = 4 * 800_000
    bound = CONNECTIONS * MAX_SESSION_BYTES_PER_CONNECTION * 3 // 2 + 512 * 1024
    node = build_node(max_errors=1000)
    accepted = 0
    tracemalloc.start()
    try:
        with trio.fail_after(GUARD_S):
            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(memory_client(node)) for _ in range(CONNECTIONS)
                ]
                start = traced()
                for n, client in enumerate(clients, 1):
                    first, _ = init_frame(
                        node.host_public_key, session_id="0", vector_database=huge
                    )
                    await client.send(first)
                    reply = await client.recv()
                    await client.ping()  # the node has moved past that frame
                    del first
                    held = traced() - start
                    assert held <= n * frame_allowance, f"huge inits left {held:,} bytes"
                    assert reply.get("code") == "INVALID_SESSION_DATA", reply
                assert node.ctx.session_memory.held == 0
                baseline = traced()
                for client in clients:
                    for i in range(1, SESSIONS + 1):
                        frame_, _ = init_frame(
                            node.host_public_key, session_id=str(i), vector_database=LARGEST
                        )
                        await client.send(frame_)
                        reply = await client.recv()
                        del frame_
                        await trio.sleep(1.0)  # the init rate limit: one a second
                        if reply["type"] == "session_init_ack":
                            accepted += 1
                            await client.ping()
                            held = traced(collect=False) - baseline
                            assert held <= bound, f"{accepted} sessions hold {held:,} bytes"
                        else:
                            assert reply["code"] == "RATE_LIMITED", reply
                held = traced() - baseline
                assert (
                    node.ctx.session_memory.held <= CONNECTIONS * MAX_SESSION_BYTES_PER_CONNECTION
                )
                print(
                    f"sessions accepted {accepted}, reserved {node.ctx.session_memory.held:,} "
                    f"bytes, traced growth {held:,} bytes (bound {bound:,})"
                )
            await node.wait_no_connections()
    finally:
        tracemalloc.stop()
    assert held <= bound
    assert accepted == CONNECTIONS * PER_CONNECTION
    assert node.ctx.session_memory.held == 0
