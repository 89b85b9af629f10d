"""Frames sent right after a stream_cancel wait for the cancelled stream's end.

The SDK stops an answer with ``stream_cancel`` and, without waiting for ``stream_end``,
sends a new ``encrypted_session_init`` and the next prompt. Those frames are held, in
order, at most ``max_held_frames`` of them and for at most ``hold_timeout_s``, and are
handled as soon as the cancelled stream has ended. A request that arrives while a stream
runs without a cancel is still refused with REQUEST_IN_PROGRESS.
"""

from __future__ import annotations

import os

import pytest

from node.crypto.errors import ErrorCode
from node.protocol import CancelRequest, HoldTimer, SessionStarted, StartRequest
from node.protocol.connection import HOLD_TIMEOUT_S, MAX_HELD_FRAMES, ConnectionState
from node.protocol.messages import Ping, Pong, SessionInitAck, StreamCancel, StreamEnd
from tests.protocol._support import (
    Clock,
    error_code,
    errors,
    frame,
    kinds,
    make_conn,
    make_init,
    message_frame,
    sends,
)

E = ErrorCode


def streaming_conn(clock: Clock | None = None, **config: object) -> tuple[ConnectionState, bytes]:
    """A connection with session 42 streaming request r0."""
    conn = make_conn(clock=clock, **config)
    key = os.urandom(32)
    conn.receive(make_init(key))
    assert kinds(conn.receive(message_frame(key, 0, request_id="r0"))) == ["StartRequest"]
    return conn, key


def release_all(conn: ConnectionState) -> list[list[str]]:
    out = []
    while (released := conn.release_held()) is not None:
        out.append(kinds(released[1]))
    return out


def test_sdk_burst_after_cancel_is_held_then_handled_in_order() -> None:
    conn, _ = streaming_conn()
    assert conn.receive(StreamCancel(session_id="42")) == [CancelRequest("client requested cancel")]
    new_key = os.urandom(32)
    init = make_init(new_key)
    message = message_frame(new_key, 0, request_id="r1")
    assert conn.receive(init) == [HoldTimer(HOLD_TIMEOUT_S)]  # the first held frame
    assert conn.receive(message) == []
    assert conn.held_frames == 2
    assert conn.hold_remaining() == HOLD_TIMEOUT_S
    assert conn.release_held() is None  # the cancelled stream has not ended yet
    ended = conn.finish("cancelled", prompt_tokens=1)
    assert isinstance(ended[-1], StreamEnd)
    assert ended[-1].reason == "cancelled"
    released = conn.release_held()
    assert released is not None
    assert released[0] is init
    ack = sends(released[1])[-1]
    assert isinstance(ack, SessionInitAck)
    released = conn.release_held()
    assert released is not None
    assert released[0] is message
    (start,) = [a for a in released[1] if isinstance(a, StartRequest)]
    assert start.request_id == "r1"
    assert start.session.key is not None
    assert start.session.key.equals(new_key)
    assert conn.release_held() is None
    assert conn.held_frames == 0
    assert conn.hold_remaining() is None
    assert conn.error_count == 0


def test_without_a_cancel_a_request_is_still_in_progress() -> None:
    conn, _ = streaming_conn()
    actions = conn.receive(make_init(os.urandom(32), session_id="5"))
    assert error_code(actions) is E.REQUEST_IN_PROGRESS
    assert conn.held_frames == 0
    assert conn.release_held() is None


def test_ping_is_answered_at_once_while_frames_are_held() -> None:
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    conn.receive(make_init(os.urandom(32)))
    assert sends(conn.receive(Ping("p"))) == [Pong("p")]
    assert conn.held_frames == 1


def test_frames_after_the_stream_ended_queue_behind_the_held_ones() -> None:
    """Between finish() and the driver's release, a new frame must not overtake."""
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    key = os.urandom(32)
    conn.receive(make_init(key))
    conn.finish("cancelled", prompt_tokens=0)
    later = message_frame(key, 0, request_id="later")
    assert conn.receive(later) == []  # held: the init before it is not handled yet
    assert release_all(conn) == [["Send"], ["StartRequest"]]


def test_a_held_cancel_stops_the_request_a_held_message_started() -> None:
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    key = os.urandom(32)
    conn.receive(make_init(key))
    conn.receive(message_frame(key, 0, request_id="r1"))
    conn.receive(StreamCancel(reason="again"))
    conn.receive(make_init(os.urandom(32)))  # waits for r1's end in turn
    conn.finish("cancelled", prompt_tokens=0)
    assert release_all(conn) == [["Send"], ["StartRequest"], ["CancelRequest"]]
    assert conn.held_frames == 1
    assert conn.streaming
    conn.finish("cancelled", prompt_tokens=0)
    assert release_all(conn) == [["Send"]]
    assert conn.held_frames == 0


def test_a_held_request_meets_a_stream_a_held_message_started() -> None:
    """Held frames are handled as if they arrived then: a second request while the
    first held one streams (not cancelled) is REQUEST_IN_PROGRESS."""
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    key = os.urandom(32)
    conn.receive(make_init(key))
    conn.receive(message_frame(key, 0, request_id="r1"))
    conn.receive(message_frame(key, 1, request_id="r2"))
    conn.finish("cancelled", prompt_tokens=0)
    released = []
    while (item := conn.release_held()) is not None:
        released.append(item[1])
    assert kinds(released[1]) == ["StartRequest"]
    assert error_code(released[2]) is E.REQUEST_IN_PROGRESS
    assert sends(released[2])[0].id == "r2"


def test_at_most_max_held_frames_wait_and_the_next_is_rate_limited() -> None:
    conn, _ = streaming_conn(max_errors=100)
    conn.receive(StreamCancel())
    for i in range(MAX_HELD_FRAMES):
        conn.receive(frame({"type": "prompt", "prompt": "p", "id": i}))
    assert conn.held_frames == MAX_HELD_FRAMES == 16
    over = conn.receive(frame({"type": "prompt", "prompt": "p", "id": "over"}))
    assert error_code(over) is E.RATE_LIMITED
    assert sends(over)[0].id == "over"
    assert conn.held_frames == MAX_HELD_FRAMES
    assert conn.error_count == 1  # the overflow counts against the error budget


def test_the_hold_count_is_configurable() -> None:
    conn, _ = streaming_conn(max_held_frames=1)
    conn.receive(StreamCancel())
    assert sends(conn.receive(Ping())) == [Pong()]  # pings are never held
    conn.receive(make_init(os.urandom(32)))
    assert error_code(conn.receive(make_init(os.urandom(32)))) is E.RATE_LIMITED


def test_the_hold_ends_after_its_timeout_with_request_in_progress() -> None:
    clock = Clock()
    conn, _ = streaming_conn(clock)
    conn.receive(StreamCancel())
    clock.advance(1.0)
    conn.receive(make_init(os.urandom(32), session_id="7"))
    conn.receive(StreamCancel())  # dropped at expiry: its stream is being cancelled
    conn.receive(frame({"type": "prompt", "prompt": "p", "id": "p1"}))
    clock.advance(HOLD_TIMEOUT_S - 0.001)
    assert conn.hold_remaining() == pytest.approx(0.001)
    assert conn.expire_held() == []  # not yet
    assert conn.held_frames == 3
    clock.advance(0.001)
    expired = conn.expire_held()
    assert [(m.code, m.id, m.session_id) for m in errors(expired)] == [
        ("REQUEST_IN_PROGRESS", "init-1", "7"),
        ("REQUEST_IN_PROGRESS", "p1", None),
    ]
    assert "did not end within 10 s" in errors(expired)[0].message
    assert conn.held_frames == 0
    assert conn.error_count == 0  # the node was slow, not the client
    assert "7" not in conn.sessions
    # The same stream still runs: later frames are refused at once, not held again.
    assert error_code(conn.receive(make_init(os.urandom(32)))) is E.REQUEST_IN_PROGRESS
    assert conn.expire_held() == []
    conn.finish("cancelled", prompt_tokens=0)
    assert conn.release_held() is None
    # The next cancelled stream holds again.
    key = os.urandom(32)
    conn.receive(make_init(key))
    conn.receive(message_frame(key, 0))
    conn.receive(StreamCancel())
    assert conn.receive(make_init(os.urandom(32))) == [HoldTimer(HOLD_TIMEOUT_S)]


def test_a_late_timer_after_the_stream_ended_leaves_the_frames_to_release() -> None:
    clock = Clock()
    conn, _ = streaming_conn(clock, hold_timeout_s=2.0)
    conn.receive(StreamCancel())
    assert conn.receive(make_init(os.urandom(32))) == [HoldTimer(2.0)]
    conn.finish("cancelled", prompt_tokens=0)
    clock.advance(5.0)
    assert conn.expire_held() == []  # the stream ended in time: release handles them
    assert release_all(conn) == [["Send"]]  # a re-init of session 42


def test_an_old_timer_does_not_end_a_newer_hold() -> None:
    clock = Clock()
    conn, _ = streaming_conn(clock, hold_timeout_s=2.0)
    conn.receive(StreamCancel())
    key = os.urandom(32)
    conn.receive(make_init(key))
    conn.receive(message_frame(key, 0))
    conn.finish("cancelled", prompt_tokens=0)
    release_all(conn)  # the message streams now
    clock.advance(1.5)
    conn.receive(StreamCancel())
    assert conn.receive(make_init(os.urandom(32))) == [HoldTimer(2.0)]
    clock.advance(0.5)  # the first hold's timer fires now
    assert conn.expire_held() == []
    assert conn.held_frames == 1


def test_close_drops_held_frames() -> None:
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    conn.receive(make_init(os.urandom(32)))
    assert [e.session.session_id for e in conn.close()] == ["42"]
    assert conn.held_frames == 0
    assert conn.release_held() is None
    assert conn.expire_held() == []


def test_held_inits_start_sessions_only_when_released() -> None:
    conn, _ = streaming_conn()
    conn.receive(StreamCancel())
    conn.receive(make_init(os.urandom(32), session_id="9"))
    assert "9" not in conn.sessions
    conn.finish("cancelled", prompt_tokens=0)
    released = conn.release_held()
    assert released is not None
    assert isinstance(released[1][0], SessionStarted)
    assert "9" in conn.sessions
