"""A Hypothesis state machine drives one ConnectionState with a model of what it must do.

Invariants: inbound counters only increase, no downgrade to plaintext once encrypted, at
most one request in flight, no key survives being replaced or close(), a session key
serves one init only, frames sent after a stream_cancel wait (in order) for the cancelled
stream's end, and every error code is a member of ErrorCode. Run longer with
PROTOCOL_FUZZ_SCALE (see test_fuzz.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from node.crypto import aead
from node.crypto.errors import ErrorCode
from node.crypto.secret import SecretBytes
from node.protocol import Action, CancelRequest, HoldTimer, Send, StartRequest
from node.protocol.connection import MAX_HELD_FRAMES, RESPONSE_FINAL_AAD, Session
from node.protocol.messages import (
    EncryptedChunk,
    EncryptedMessage,
    EncryptedResponse,
    ErrorMessage,
    Ping,
    Pong,
    SessionInitAck,
    StreamCancel,
    StreamChunk,
    StreamEnd,
)
from tests.protocol._support import (
    Clock,
    frame,
    fuzz_settings,
    make_conn,
    make_init,
    message_frame,
    sends,
)

SESSION_IDS = st.sampled_from(["1", "2", "3"])
E = ErrorCode


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.conn = make_conn(clock=self.clock, max_errors=10**9, init_burst=10**6)
        self.keys: dict[str, bytes] = {}  # model: the live key of each encrypted session
        self.next: dict[str, int] = {}
        self.plain: set[str] = set()
        self.plain_at_upgrade: set[str] = set()
        self.encrypted_used = False
        self.plain_used = False
        self.streaming = False
        self.stream_key: bytes | None = None
        self.cancelled = False
        self.pieces = 0
        self.closed = False
        self.steps = 0
        self.secrets: list[SecretBytes] = []
        self.accepted: list[tuple[str, bytes, int, EncryptedMessage]] = []
        # (session, its key, last next_index seen): a counter belongs to one key
        self.seen_keys: list[tuple[Session, SecretBytes, int]] = []
        self.used_keys: set[bytes] = set()  # session keys of accepted inits
        self.keys_before: dict[str, SecretBytes | None] = {}
        self.held: list[Callable[[list[Action]], None]] = []  # checks of held frames

    # ----------------------------------------------------------------- helpers

    def receive(self, message: Any) -> list[Action]:
        self.steps += 1
        actions = self.conn.receive(message)
        for m in sends(actions):
            if isinstance(m, ErrorMessage):
                assert m.code in ErrorCode.__members__, m.code
        return actions

    def expect_error(self, actions: list[Action], code: ErrorCode) -> None:
        codes = [m.code for m in sends(actions) if isinstance(m, ErrorMessage)]
        assert codes == [code.value], (codes, code)
        assert not any(isinstance(a, StartRequest) for a in actions)

    @property
    def holding(self) -> bool:
        """After a stream_cancel, frames wait until the cancelled stream has ended."""
        return (self.streaming and self.cancelled) or bool(self.held)

    def submit(self, message: Any, check: Callable[[list[Action]], None]) -> None:
        """Send ``message``; ``check`` judges its actions now, or when it is released."""
        self.note_keys()
        actions = self.receive(message)
        if self.closed:
            assert actions == []
            return
        if self.holding:
            if len(self.held) >= MAX_HELD_FRAMES:
                self.expect_error(actions, E.RATE_LIMITED)
                return
            assert all(isinstance(a, HoldTimer) for a in actions), actions
            assert len(actions) == (0 if self.held else 1)
            self.held.append(check)
            return
        check(actions)

    def note_keys(self) -> None:
        """The session keys right before a frame is handled (a re-init must wipe them)."""
        self.keys_before = {sid: s.key for sid, s in self.conn.sessions.items()}

    def busy(self, actions: list[Action]) -> bool:
        """A request while another streams (not cancelled) is refused."""
        if self.streaming:
            self.expect_error(actions, E.REQUEST_IN_PROGRESS)
            return True
        return False

    # ------------------------------------------------------------------- rules

    @rule(sid=SESSION_IDS, job=st.sampled_from([1, 2]), key=st.binary(min_size=32, max_size=32))
    def encrypted_init(self, sid: str, job: int, key: bytes) -> None:
        def check(actions: list[Action]) -> None:
            if self.busy(actions):
                return
            if key in self.used_keys:  # one init per session key (within the window)
                self.expect_error(actions, E.REPLAY_DETECTED)
                return
            old_key = self.keys_before.get(sid)
            ack = sends(actions)[-1]
            assert isinstance(ack, SessionInitAck)
            assert ack.client_address is not None
            session = self.conn.sessions[sid]
            assert session.encrypted
            assert session.next_index == 0
            assert session.key is not None
            assert session.key.equals(key)
            if old_key is not None:
                assert old_key is not session.key
                assert old_key.wiped
                assert old_key.is_all_zero()
            self.secrets.append(session.key)
            self.seen_keys.append((session, session.key, 0))
            self.used_keys.add(key)
            self.keys[sid] = key
            self.next[sid] = 0
            self.plain.discard(sid)
            if not self.encrypted_used:
                self.plain_at_upgrade = set(self.plain)
            self.encrypted_used = True

        self.submit(make_init(key, session_id=sid, job_id=job), check)

    @rule(sid=SESSION_IDS)
    def plaintext_init(self, sid: str) -> None:
        def check(actions: list[Action]) -> None:
            if self.busy(actions):
                return
            if self.encrypted_used:
                self.expect_error(actions, E.MIXED_MODE_REJECTED)
                return
            assert isinstance(sends(actions)[-1], SessionInitAck)
            self.plain.add(sid)
            self.plain_used = True

        self.submit(frame({"type": "session_init", "session_id": sid, "job_id": sid}), check)

    @rule(sid=st.none() | SESSION_IDS)
    def plaintext_prompt(self, sid: str | None) -> None:
        def check(actions: list[Action]) -> None:
            if self.busy(actions):
                return
            if self.encrypted_used:
                self.expect_error(actions, E.MIXED_MODE_REJECTED)
                return
            assert [type(a) for a in actions if isinstance(a, StartRequest)] == [StartRequest]
            if sid is not None:
                self.plain.add(sid)  # a prompt naming an unknown session opens it
            self.plain_used = True
            self.streaming = True
            self.stream_key = None

        self.submit(frame({"type": "prompt", "prompt": "p", "session_id": sid}), check)

    def check_message(
        self, actions: list[Action], sid: str, key: bytes, index: int
    ) -> list[StartRequest]:
        """The outcome the rules of an encrypted message predict; the StartRequest if any."""
        if self.busy(actions):
            return []
        if sid not in self.keys:
            self.expect_error(actions, E.SESSION_KEY_NOT_FOUND)
            return []
        if index < self.next[sid]:
            self.expect_error(actions, E.REPLAY_DETECTED)
            return []
        if key != self.keys[sid]:  # made under a key this session no longer has
            self.expect_error(actions, E.DECRYPTION_FAILED)
            return []
        starts = [a for a in actions if isinstance(a, StartRequest)]
        assert len(starts) == 1, actions
        return starts

    @rule(sid=SESSION_IDS, skip=st.integers(0, 3), text=st.text(max_size=8))
    def valid_message(self, sid: str, skip: int, text: str) -> None:
        text = "t" + text  # never starts with "{": the bare-prompt path
        key = self.keys.get(sid, bytes(32))
        index = self.next.get(sid, 0) + skip
        message = message_frame(key, index, text, session_id=sid, request_id=f"r{index}")

        def check(actions: list[Action]) -> None:
            starts = self.check_message(actions, sid, key, index)
            if not starts:
                return
            assert starts[0].request.prompt == text  # not a JSON object: the bare prompt
            self.next[sid] = index + 1
            self.accepted.append((sid, key, index, message))
            self.streaming = True
            self.stream_key = key

        self.submit(message, check)

    @precondition(
        lambda self: bool(self.keys) and not self.streaming and not self.closed and not self.held
    )
    @rule(data=st.data(), pieces=st.lists(st.text(max_size=4), max_size=3))
    def whole_request(self, data: st.DataObject, pieces: list[str]) -> None:
        """A message, its pieces and its end in one step (keeps the stream short)."""
        sid = data.draw(st.sampled_from(sorted(self.keys)))
        self.valid_message(sid, data.draw(st.integers(0, 2)), "q")
        for text in pieces:
            self.piece(text)
        self.finish(data.draw(st.sampled_from(["stop", "length"])))

    @precondition(lambda self: bool(self.accepted) and not self.streaming)
    @rule(data=st.data())
    def replayed_message(self, data: st.DataObject) -> None:
        sid, key, index, message = data.draw(st.sampled_from(self.accepted))

        def check(actions: list[Action]) -> None:
            before = self.next.get(sid)
            assert not self.check_message(actions, sid, key, index), "a replay was accepted"
            assert self.next.get(sid) == before

        self.submit(message, check)

    @rule(sid=SESSION_IDS, skip=st.integers(0, 2))
    def tampered_message(self, sid: str, skip: int) -> None:
        key = self.keys.get(sid, bytes(32))
        index = self.next.get(sid, 0) + skip
        good = message_frame(key, index, "x", session_id=sid)
        bad = attrs.evolve(
            good,
            payload=attrs.evolve(good.payload, ciphertext=os.urandom(len(good.payload.ciphertext))),
        )

        def check(actions: list[Action]) -> None:
            if self.busy(actions):
                return
            if sid not in self.keys:
                self.expect_error(actions, E.SESSION_KEY_NOT_FOUND)
            elif index < self.next[sid]:
                self.expect_error(actions, E.REPLAY_DETECTED)
            else:
                self.expect_error(actions, E.DECRYPTION_FAILED)

        self.submit(bad, check)

    @rule(reason=st.none() | st.text(max_size=5))
    def cancel(self, reason: str | None) -> None:
        def check(actions: list[Action]) -> None:
            if not self.streaming or self.cancelled:
                assert actions == []
                return
            assert len(actions) == 1
            assert isinstance(actions[0], CancelRequest)
            self.cancelled = True

        self.submit(StreamCancel(reason=reason), check)

    @rule(request_id=st.none() | st.integers(0, 9))
    def ping(self, request_id: int | None) -> None:
        actions = self.receive(Ping(request_id))
        assert actions == ([] if self.closed else [Send(Pong(request_id))])

    @precondition(lambda self: self.streaming and not self.closed)
    @rule(text=st.text(max_size=6))
    def piece(self, text: str) -> None:
        message = self.conn.piece(text, 1)
        if self.stream_key is None:
            assert isinstance(message, StreamChunk)
            assert message.content == text
        else:
            assert isinstance(message, EncryptedChunk)
            p = message.payload
            assert p.aad == b"chunk_%d" % self.pieces == b"chunk_%d" % (p.index or 0)
            assert aead.open(self.stream_key, p.nonce, p.ciphertext, p.aad) == text.encode()
        self.pieces += 1

    @precondition(lambda self: self.streaming and not self.closed)
    @rule(reason=st.sampled_from(["stop", "length", "cancelled", "error"]))
    def finish(self, reason: str) -> None:
        frames = self.conn.finish(reason, prompt_tokens=2)
        end = frames[-1]
        assert isinstance(end, StreamEnd)
        assert end.tokens_used == self.pieces
        assert end.usage.total_tokens == self.pieces + 2
        if self.stream_key is not None:
            final, response = frames[0], frames[1]
            assert isinstance(final, EncryptedChunk)
            assert final.final
            assert final.payload.aad == b"chunk_%d" % self.pieces
            assert isinstance(response, EncryptedResponse)
            p = response.payload
            assert p.aad == RESPONSE_FINAL_AAD
            assert aead.open(self.stream_key, p.nonce, p.ciphertext, p.aad) == reason.encode()
        else:
            assert len(frames) == 1
        self.streaming = False
        self.cancelled = False
        self.pieces = 0
        # What waited for this stream is handled now, in order, as the driver does.
        self.note_keys()
        while (released := self.conn.release_held()) is not None:
            self.held.pop(0)(released[1])
            self.note_keys()
        assert not self.held or (self.streaming and self.cancelled)

    @precondition(lambda self: self.steps >= 20)
    @rule()
    def close(self) -> None:
        ended = self.conn.close()
        if self.closed:
            assert ended == []
        self.closed = True
        self.streaming = False
        self.plain.clear()
        self.held.clear()

    # -------------------------------------------------------------- invariants

    @invariant()
    def counters_only_increase(self) -> None:
        updated = []
        for session, key, last in self.seen_keys:
            if session.key is key and not key.wiped:
                assert session.next_index >= last
                updated.append((session, key, session.next_index))
        self.seen_keys = updated
        for sid, session in self.conn.sessions.items():
            if session.key is not None:
                assert session.next_index == self.next[sid]

    @invariant()
    def no_downgrade(self) -> None:
        assert self.conn.used_encryption == self.encrypted_used
        plaintext_ids = {sid for sid, s in self.conn.sessions.items() if not s.encrypted}
        assert plaintext_ids == self.plain
        if self.encrypted_used:
            # plaintext sessions can only have been made before the upgrade
            assert plaintext_ids <= self.plain_at_upgrade

    @invariant()
    def at_most_one_request_in_flight(self) -> None:
        assert self.conn.streaming == self.streaming
        assert self.conn.held_frames == len(self.held)

    @invariant()
    def no_key_outlives_its_session(self) -> None:
        live = {id(s.key) for s in self.conn.sessions.values() if s.key is not None}
        for secret in self.secrets:
            if id(secret) not in live:
                assert secret.wiped
                assert secret.is_all_zero()
        if self.closed:
            assert self.conn.keys_held == 0
            assert all(s.is_all_zero() for s in self.secrets)

    def teardown(self) -> None:
        self.conn.close()
        assert all(s.is_all_zero() for s in self.secrets)


ProtocolMachine.TestCase.settings = fuzz_settings(80, stateful_step_count=40)
test_stateful_protocol = ProtocolMachine.TestCase
