"""The client against a scripted node that misbehaves: every deviation is an error, and no
text is ever yielded from a frame that did not authenticate.

Each script answers the prompt with chunks "A", "B", "C" (honest) or with a fault. A
piece that must never surface is spelled SECRET; the tests assert it never does.
"""

from __future__ import annotations

import os

import pytest
import trio

from node.client import (
    ChunkAuthenticationFailed,
    ChunkOutOfOrder,
    ClientError,
    ForeignFrame,
    InvalidFinishReason,
    MalformedFrame,
    NodeErrorResponse,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
    UnexpectedFrame,
    open_session,
)

from ._hostile import Exchange, HostileNode, Script, memory_websocket, serve_hostile
from .conftest import GUARD_S

# ----------------------------------------------------------------------- scripts


async def honest_abc(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "B"), ex.chunk(2, "C"), *ex.honest_tail(3))


async def reorder(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(2, "SECRET"), ex.chunk(1, "B"), *ex.honest_tail(3))


async def duplicate(ex: Exchange) -> None:
    b = ex.chunk(1, "B")
    await ex.send(ex.chunk(0, "A"), b, b, ex.chunk(2, "C"), *ex.honest_tail(3))


async def duplicate_fresh_nonce(ex: Exchange) -> None:
    # Same index again, properly sealed with a new nonce: still not the next chunk.
    await ex.send(ex.chunk(0, "A"), ex.chunk(0, "SECRET"), *ex.honest_tail(1))


async def drop(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(2, "SECRET"), *ex.honest_tail(3))


async def truncate_mid_stream(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "B"))
    await ex.close()


async def truncate_before_stream_end(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("stop"))
    await ex.close()


async def truncate_after_final_chunk(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1))
    await ex.close()


async def stream_end_without_final(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.end("stop", completion=1))


async def stream_end_without_response(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.end("stop", completion=1))


async def tamper(ex: Exchange) -> None:
    await ex.send(
        ex.chunk(0, "A"), ex.chunk(1, "SECRET", tamper=True), ex.chunk(2, "C"), *ex.honest_tail(3)
    )


async def swapped_key(ex: Exchange) -> None:
    other = os.urandom(32)
    await ex.send(
        ex.chunk(0, "A"), ex.chunk(1, "SECRET", key=other), ex.chunk(2, "C"), *ex.honest_tail(3)
    )


async def foreign_session(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "SECRET", session_id="999"), *ex.honest_tail(2))


async def foreign_request(ex: Exchange) -> None:
    await ex.send(
        ex.chunk(0, "A"), ex.chunk(1, "SECRET", request_id="another-request"), *ex.honest_tail(2)
    )


async def aad_index_mismatch(ex: Exchange) -> None:
    # Sealed (validly) under AAD chunk_5 while claiming index 1: the SDK would accept it.
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "SECRET", aad=b"chunk_5"), *ex.honest_tail(2))


async def index_field_mismatch(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "SECRET", payload_index=4), *ex.honest_tail(2))


async def unknown_finish_reason(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("bogus"), ex.end("stop"))


async def disagreeing_finish_reason(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("stop"), ex.end("length"))


async def disagreeing_end_reason(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), *ex.honest_tail(1)[:2], ex.end("stop", reason="cancelled"))


async def tampered_response(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("stop", tamper=True), ex.end())


async def response_swapped_key(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("stop", key=os.urandom(32)), ex.end())


async def response_wrong_aad(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.response("stop", aad=b"chunk_2"), ex.end())


async def downgrade(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.plain_chunk("SECRET"), *ex.honest_tail(1))


async def chunk_after_final(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.final(1), ex.chunk(2, "SECRET"), *ex.honest_tail(3)[1:])


async def final_with_text(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), ex.chunk(1, "SECRET", final=True, tokens=0))


async def garbage_frame(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"), "{not json")


async def binary_frame(ex: Exchange) -> None:
    await ex.send(ex.chunk(0, "A"))
    await ex.ws.send_message(b"SECRET")


async def node_error(ex: Exchange) -> None:
    await ex.send(
        ex.chunk(0, "A"),
        ex.error("INFERENCE_FAILED", "the backend failed"),
        *ex.honest_tail(1, "error", completion=1),
    )


SCENARIOS: list[tuple[Script, type[ClientError], list[str]]] = [
    (reorder, ChunkOutOfOrder, ["A"]),
    (duplicate, ChunkOutOfOrder, ["A", "B"]),
    (duplicate_fresh_nonce, ChunkOutOfOrder, ["A"]),
    (drop, ChunkOutOfOrder, ["A"]),
    (truncate_mid_stream, StreamTruncated, ["A", "B"]),
    (truncate_before_stream_end, StreamTruncated, ["A"]),
    (truncate_after_final_chunk, StreamTruncated, ["A"]),
    (stream_end_without_final, StreamTruncated, ["A"]),
    (stream_end_without_response, StreamTruncated, ["A"]),
    (tamper, ChunkAuthenticationFailed, ["A"]),
    (swapped_key, ChunkAuthenticationFailed, ["A"]),
    (foreign_session, ForeignFrame, ["A"]),
    (foreign_request, ForeignFrame, ["A"]),
    (aad_index_mismatch, ChunkOutOfOrder, ["A"]),
    (index_field_mismatch, ChunkOutOfOrder, ["A"]),
    (unknown_finish_reason, InvalidFinishReason, ["A"]),
    (disagreeing_finish_reason, InvalidFinishReason, ["A"]),
    (disagreeing_end_reason, InvalidFinishReason, ["A"]),
    (tampered_response, ChunkAuthenticationFailed, ["A"]),
    (response_swapped_key, ChunkAuthenticationFailed, ["A"]),
    (response_wrong_aad, MalformedFrame, ["A"]),
    (downgrade, UnexpectedFrame, ["A"]),
    (chunk_after_final, UnexpectedFrame, ["A"]),
    (final_with_text, UnexpectedFrame, ["A"]),
    (garbage_frame, MalformedFrame, ["A"]),
    (binary_frame, MalformedFrame, ["A"]),
    (node_error, NodeErrorResponse, ["A"]),
]


async def test_honest_script_streams_the_text() -> None:
    node = HostileNode(honest_abc)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            pieces = [p async for p in session.stream("hi")]
            assert session.client_address == node.client_addresses[0]
    assert pieces == ["A", "B", "C"]


@pytest.mark.parametrize(
    ("script", "expected", "pieces"), SCENARIOS, ids=[s[0].__name__ for s in SCENARIOS]
)
async def test_misbehaving_node_is_caught(
    script: Script, expected: type[ClientError], pieces: list[str]
) -> None:
    node = HostileNode(script)
    yielded: list[str] = []
    caught: ClientError | None = None
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            response = session.stream("hi")
            try:
                async for piece in response:
                    yielded.append(piece)
            except ClientError as exc:
                caught = exc
            assert response.completion is None
            # A failed stream is over, like a generator that raised.
            assert [p async for p in response] == []
            if expected is not NodeErrorResponse:
                # After a violation or a truncation the key is wiped at once and the
                # session is not used again.
                assert session._key is not None
                assert session._key.wiped
                with pytest.raises(SessionClosed):
                    await session.complete("again")
    assert type(caught) is expected, caught
    assert yielded == pieces
    assert "SECRET" not in "".join(yielded)


async def test_complete_never_returns_a_truncated_answer() -> None:
    node = HostileNode(truncate_before_stream_end)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            with pytest.raises(StreamTruncated):
                await session.complete("hi")


async def test_node_error_carries_the_wire_code_and_the_session_goes_on() -> None:
    calls = 0

    async def first_fails(ex: Exchange) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await node_error(ex)
        else:
            await honest_abc(ex)

    node = HostileNode(first_fails)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            with pytest.raises(NodeErrorResponse) as info:
                await session.complete("first")
            # The closing frames of the failed request arrive late and are dropped.
            completion = await session.complete("second")
    assert info.value.code == "INFERENCE_FAILED"
    assert info.value.message == "the backend failed"
    assert completion.text == "ABC"
    assert completion.finish_reason == "stop"


async def test_a_second_init_ack_mid_stream_is_unexpected() -> None:
    async def stray_ack(ex: Exchange) -> None:
        await ex.send(
            ex.chunk(0, "A"),
            '{"type":"session_init_ack","status":"success","session_id":"5","job_id":5,'
            '"chain_id":84532,"message":"x"}',
        )

    node = HostileNode(stray_ack)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            with pytest.raises(UnexpectedFrame):
                await session.complete("hi")


# ------------------------------------------------------ timeouts (memory + MockClock)


async def _timed_stream(
    script: Script, *, first_chunk_timeout: float, chunk_timeout: float
) -> tuple[list[str], ClientError | None, list[float]]:
    node = HostileNode(script)
    pieces: list[str] = []
    times: list[float] = []
    caught: ClientError | None = None
    with trio.fail_after(1000):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=5,
                first_chunk_timeout=first_chunk_timeout,
                chunk_timeout=chunk_timeout,
            ) as session,
        ):
            times.append(trio.current_time())
            try:
                async for piece in session.stream("hi"):
                    pieces.append(piece)
                    times.append(trio.current_time())
            except ClientError as exc:
                caught = exc
            times.append(trio.current_time())
            if caught is not None:
                with pytest.raises(SessionClosed):
                    await session.ping()
            else:
                assert await session.ping() >= 0
    return pieces, caught, times


async def test_first_chunk_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def silent(ex: Exchange) -> None:
        await trio.lowlevel.checkpoint()

    pieces, caught, times = await _timed_stream(silent, first_chunk_timeout=7, chunk_timeout=2)
    assert type(caught) is StreamTimeout
    assert pieces == []
    assert times[-1] - times[0] == pytest.approx(7)


async def test_between_chunk_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def stalls(ex: Exchange) -> None:
        await ex.send(ex.chunk(0, "A"))

    pieces, caught, times = await _timed_stream(stalls, first_chunk_timeout=50, chunk_timeout=3)
    assert type(caught) is StreamTimeout
    assert isinstance(caught, StreamTruncated)
    assert pieces == ["A"]
    assert times[-1] - times[1] == pytest.approx(3)


async def test_a_slow_but_steady_stream_is_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(ex: Exchange) -> None:
        await trio.sleep(4)  # under the first-chunk timeout
        for i, piece in enumerate(["A", "B", "C"]):
            await ex.send(ex.chunk(i, piece))
            await trio.sleep(2.5)  # each gap under the chunk timeout
        await ex.send(*ex.honest_tail(3))

    pieces, caught, times = await _timed_stream(slow, first_chunk_timeout=5, chunk_timeout=3)
    assert caught is None
    assert pieces == ["A", "B", "C"]
    assert times[1] - times[0] == pytest.approx(4)


async def test_disconnect_over_memory_is_truncation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pieces, caught, _ = await _timed_stream(
        truncate_mid_stream, first_chunk_timeout=5, chunk_timeout=5
    )
    assert type(caught) is StreamTruncated
    assert pieces == ["A", "B"]


async def test_an_interrupted_reinit_breaks_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = HostileNode(honest_abc, reinit_ack_delay_s=5)
    with trio.fail_after(1000):
        async with (
            memory_websocket(node) as ws,
            open_session(
                "ws://memory/v1/ws",
                websocket=ws,
                host_public_key=node.host_key.public_key,
                model="m",
                job_id=5,
            ) as session,
        ):
            assert (await session.complete("hi")).text == "ABC"
            with trio.move_on_after(1) as scope:
                await session.reinit()  # the init goes out, the ack comes too late
            assert scope.cancelled_caught
            assert len(node.session_keys) == 2  # the node did switch keys
            with pytest.raises(SessionClosed):
                await session.complete("hi")


async def test_completion_repr_hides_the_text() -> None:
    node = HostileNode(honest_abc)
    with trio.fail_after(GUARD_S):
        async with (
            serve_hostile(node) as url,
            open_session(
                url, host_public_key=node.host_key.public_key, model="m", job_id=5
            ) as session,
        ):
            completion = await session.complete("hi")
    assert completion.text == "ABC"
    assert "ABC" not in repr(completion)


@pytest.mark.parametrize(
    "named",
    [
        None,  # no address at all
        "0x" + "11" * 20,  # another client's address
        "recovered-other-case",  # the right address in other letter case: accepted
    ],
)
async def test_an_ack_naming_another_client_is_refused(named: str | None) -> None:
    """The node must say which client it authenticated, and it must be us: an ack that
    names nobody or someone else means the init was not opened as we sealed it."""
    from coincurve import PrivateKey

    from node.client import ProtocolViolation
    from node.crypto.curve import address_of

    client_key = PrivateKey()
    ours = address_of(client_key.public_key)
    swapped = ours.lower() if named == "recovered-other-case" else named
    node = HostileNode(honest_abc, ack_client_address=swapped)
    with trio.fail_after(GUARD_S):
        async with serve_hostile(node) as url:
            if named == "recovered-other-case":
                async with open_session(
                    url,
                    host_public_key=node.host_key.public_key,
                    model="m",
                    job_id=5,
                    client_key=client_key,
                ) as session:
                    assert session.client_address == ours.lower()
                    assert (await session.complete("hi")).text == "ABC"
                return
            with pytest.raises(ProtocolViolation, match="another client address"):
                async with open_session(
                    url,
                    host_public_key=node.host_key.public_key,
                    model="m",
                    job_id=5,
                    client_key=client_key,
                ):
                    pass  # pragma: no cover - the ack is refused first
