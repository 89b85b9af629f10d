"""The per-connection protocol state machine (sans-I/O).

:class:`ConnectionState` owns no socket and no task. The driver hands it decoded
messages (:meth:`receive`) or decode failures (:meth:`reject`) and gets back a list of
actions: frames to send, an inference request to start or cancel, sessions that began or
ended, or a close. While a request streams, the driver turns each backend piece into a
frame with :meth:`piece` and ends the stream with :meth:`finish` or :meth:`fail`.
Every session key lives in a :class:`SecretBytes` owned here and is zeroed by
:meth:`close`, which the driver calls when the connection's scope exits.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs

from node.crypto import aead
from node.crypto.encoding import loads_bounded
from node.crypto.errors import ErrorCode, NodeError
from node.crypto.hostkey import HostKey
from node.crypto.secret import SecretBytes, constant_time_equal
from node.crypto.session_init import open_session_init
from node.protocol.errors import CLOSE_POLICY_VIOLATION, ProtocolError
from node.protocol.messages import (
    ChunkPayload,
    EncryptedChunk,
    EncryptedMessage,
    EncryptedResponse,
    EncryptedSessionInit,
    ErrorMessage,
    InboundMessage,
    OutboundMessage,
    Ping,
    Pong,
    PromptRequest,
    RequestId,
    SessionInit,
    SessionInitAck,
    StreamCancel,
    StreamChunk,
    StreamEnd,
    Usage,
    encode,
    encrypted_chunk_text,
)
from node.protocol.ratelimit import AddressRateLimiter
from node.protocol.replay import ReplayCache
from node.protocol.requests import InferenceRequest, parse_request_plaintext

RESPONSE_FINAL_AAD: Final = b"encrypted_response_final"
ENCRYPTED_ACK_TEXT: Final = "Encrypted session initialized successfully"
PLAINTEXT_ACK_TEXT: Final = (
    "Session initialized in plaintext mode (deprecated: switch to encrypted_session_init)"
)
MAX_EXPIRED_IDS: Final = 256
# Replay-cache entries for session keys start with this (init entries are 57 bytes of
# ephemeral x-coordinate, "|" and nonce, so the two kinds never meet).
SESSION_KEY_ENTRY: Final = b"session-key|"
FINISH_REASONS: Final = frozenset({"stop", "length", "cancelled", "error"})
# After a stream_cancel, frames that arrive before the cancelled stream has ended wait
# for its stream_end (clients such as the SDK send cancel, a new init and the next prompt
# in one burst). At most this many wait; a frame beyond that gets RATE_LIMITED ...
MAX_HELD_FRAMES: Final = 16
# ... and they wait at most this long: then each gets REQUEST_IN_PROGRESS.
HOLD_TIMEOUT_S: Final = 10.0
# Errors caused by the node itself do not count against the client's error budget.
_NODE_SIDE_CODES: Final = frozenset(
    {ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL_ERROR, ErrorCode.STORAGE_UNAVAILABLE}
)


# What holding one session costs beyond the client's own fields (the Session, its key
# buffer, ids, the ledger's running totals), counted against the limits below.
SESSION_OVERHEAD_BYTES: Final = 2048
MAX_SESSION_BYTES_PER_CONNECTION: Final = 256 * 1024


@attrs.define
class ProtocolConfig:
    require_encryption: bool = False
    session_ttl_s: float = 24 * 3600.0
    max_errors: int = 10
    init_burst: int = 10  # session inits (either mode) a connection may send at once ...
    init_refill_per_s: float = 1.0  # ... and how fast that allowance comes back
    allowed_clients: frozenset[str] | None = None  # lowercase addresses; None = anyone
    # With an allow-list, plaintext sessions (which prove no address) only if this is on.
    allow_plaintext_with_allowlist: bool = False
    max_sessions: int = 64  # sessions one connection may hold at once
    max_session_bytes: int = MAX_SESSION_BYTES_PER_CONNECTION  # what they may hold in all
    max_held_frames: int = MAX_HELD_FRAMES  # frames waiting for a cancelled stream's end
    hold_timeout_s: float = HOLD_TIMEOUT_S  # ... and how long they may wait


class SessionMemory:
    """Bytes of session data held by all connections of one node process.

    Every connection reserves what a session will hold (``session_cost``) before keeping
    it and releases it when the session ends; a reservation past ``limit`` is refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


def session_cost(model_name: str | None, vector_database_json: str | None) -> int:
    """What one session is charged: a fixed overhead plus the client-chosen text it keeps."""
    return (
        SESSION_OVERHEAD_BYTES
        + len(model_name or "") * 4  # up to 4 bytes a character
        + len(vector_database_json or "")  # ASCII
    )


@attrs.define(repr=False, eq=False)
class Session:
    """One session held by one connection. ``key`` is None in plaintext mode."""

    session_id: str
    job_id: int | None
    chain_id: int
    encrypted: bool
    created_at: float
    key: SecretBytes | None = None
    next_index: int = 0
    client_address: str | None = None
    model_name: str | None = None
    price_per_token: int = 0
    vector_database_json: str | None = None  # compact JSON text, bounded at the init
    cost: int = 0  # bytes reserved for this session (see ``session_cost``)

    @property
    def vector_database(self) -> dict[str, Any] | None:
        """The client's ``vectorDatabase`` object, parsed from the kept text."""
        if self.vector_database_json is None:
            return None
        value: dict[str, Any] = loads_bounded(self.vector_database_json)
        return value

    protocol: str = "v1"  # "v2" for sessions of node.protocol.v2

    def wipe(self) -> None:
        if self.key is not None:
            self.key.wipe()

    def __repr__(self) -> str:
        return (
            f"Session(id={self.session_id}, job={self.job_id}, encrypted={self.encrypted}, "
            f"client={self.client_address})"
        )


# ------------------------------------------------------------------------ actions


@attrs.frozen
class Send:
    message: OutboundMessage


@attrs.frozen
class StartRequest:
    request: InferenceRequest
    session: Session
    request_id: RequestId | None


@attrs.frozen
class CancelRequest:
    reason: str


@attrs.frozen
class Close:
    code: int
    reason: str


@attrs.frozen
class SessionStarted:
    session: Session


@attrs.frozen
class SessionEnded:
    session: Session
    reason: str  # reinit | ttl_expired | the driver's end reason on close


@attrs.frozen
class PlaintextDeprecated:
    """Emitted once per connection, the first time plaintext mode is used."""


@attrs.frozen
class HoldTimer:
    """Frames are now held for a cancelled stream: call :meth:`ConnectionState.expire_held`
    after ``delay_s`` seconds (of the clock the state was given)."""

    delay_s: float


Action = (
    Send
    | StartRequest
    | CancelRequest
    | Close
    | SessionStarted
    | SessionEnded
    | PlaintextDeprecated
    | HoldTimer
)


@attrs.define(eq=False)
class ActiveRequest:
    session: Session
    request_id: RequestId | None
    next_chunk: int = 0
    completion_tokens: int = 0
    cancel_requested: bool = False
    hold_expired: bool = False  # its stream outlived the hold: later frames are refused


class ConnectionState:
    """Protocol rules for one WebSocket connection."""

    def __init__(
        self,
        *,
        host_key: HostKey | None,
        replay_cache: ReplayCache,
        clock: Callable[[], float],
        config: ProtocolConfig | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        memory: SessionMemory | None = None,
        address_limiter: AddressRateLimiter | None = None,
        remote_address: str | None = None,
        admission: Callable[[], None] | None = None,
    ) -> None:
        """``address_limiter`` (node-wide) bounds new sessions per ``remote_address``
        and per client address across connections; ``admission`` raises a
        :class:`NodeError` when the node must refuse new sessions and requests (its
        ledger is failing under ``--on-ledger-failure refuse``)."""
        self.host_key = host_key
        self.address_limiter = address_limiter
        self.remote_address = remote_address
        self._admission = admission
        self.replay_cache = replay_cache
        self.config = config or ProtocolConfig()
        # The node's shared budget; a connection on its own gets one of its own.
        self.memory = memory if memory is not None else SessionMemory(2**62)
        self.session_bytes = 0  # what this connection's sessions hold (their costs)
        self._clock = clock
        self._rng = rng
        self.sessions: dict[str, Session] = {}
        self.active: ActiveRequest | None = None
        self.error_count = 0
        self.used_encryption = False
        self.used_plaintext = False
        self.closed = False
        self._anonymous: Session | None = None
        self._expired_ids: set[str] = set()
        self._init_allowance = float(self.config.init_burst)
        self._allowance_at = clock()
        self._held: deque[InboundMessage] = deque()
        self._hold_deadline: float | None = None

    # ------------------------------------------------------------------ queries

    @property
    def keys_held(self) -> int:
        return sum(1 for s in self.sessions.values() if s.key is not None and not s.key.wiped)

    @property
    def streaming(self) -> bool:
        return self.active is not None

    # ------------------------------------------------------------------ input

    @property
    def held_frames(self) -> int:
        """Frames waiting for a cancelled stream to end."""
        return len(self._held)

    def _holding(self) -> bool:
        """Whether the active request was cancelled and frames wait for its end."""
        active = self.active
        return active is not None and active.cancel_requested and not active.hold_expired

    def receive(self, message: InboundMessage) -> list[Action]:
        """Decide what to do with one decoded inbound message.

        After a ``stream_cancel``, every frame but a ping that arrives before the cancelled
        stream has ended is held, in order, and handled by :meth:`release_held` once the
        stream's closing frames are out.
        """
        if self.closed:
            return []
        if not isinstance(message, Ping) and (self._held or self._holding()):
            return self._hold(message)
        return self._dispatch(message)

    def _dispatch(self, message: InboundMessage) -> list[Action]:
        try:
            if isinstance(message, Ping):
                return [Send(Pong(message.id))]
            if isinstance(message, StreamCancel):
                return self._on_cancel(message)
            if self.active is not None:
                raise ProtocolError(
                    ErrorCode.REQUEST_IN_PROGRESS,
                    "a request is already streaming on this connection; wait for stream_end "
                    "or send stream_cancel",
                )
            if isinstance(message, EncryptedSessionInit):
                return self._on_encrypted_init(message)
            if isinstance(message, EncryptedMessage):
                return self._on_encrypted_message(message)
            if isinstance(message, SessionInit):
                return self._on_plaintext_init(message)
            return self._on_prompt(message)
        except NodeError as exc:
            return self._error(exc, _id_of(message), _session_of(message))

    def _hold(self, message: InboundMessage) -> list[Action]:
        if len(self._held) >= self.config.max_held_frames:
            return self._error(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"{len(self._held)} frames already wait for the cancelled request to "
                    "end; send this one again after its stream_end",
                ),
                _id_of(message),
                _session_of(message),
            )
        self._held.append(message)
        if self._hold_deadline is not None:
            return []
        self._hold_deadline = self._clock() + self.config.hold_timeout_s
        return [HoldTimer(self.config.hold_timeout_s)]

    def hold_remaining(self) -> float | None:
        """Seconds until the current hold times out; None when nothing is held."""
        if self._hold_deadline is None:
            return None
        return max(0.0, self._hold_deadline - self._clock())

    def release_held(self) -> tuple[InboundMessage, list[Action]] | None:
        """Handle the oldest held frame, if the stream it waited for has ended.

        Returns the frame and its actions, or None when nothing is held or frames must
        still wait (a released ``stream_cancel`` may have cancelled the next request).
        The driver calls this after each request's closing frames until it gets None.
        """
        if not self._held or self._holding() or self.closed:
            return None
        message = self._held.popleft()
        if not self._held:
            self._hold_deadline = None
        return message, self._dispatch(message)

    def expire_held(self) -> list[Action]:
        """The hold's time is up: answer every held request with REQUEST_IN_PROGRESS.

        Does nothing before the deadline, or when the stream has ended meanwhile (then
        :meth:`release_held` handles the frames). Frames arriving later, while the same
        stream still runs, are refused at once.
        """
        deadline = self._hold_deadline
        active = self.active
        if deadline is None or self._clock() < deadline or active is None or not self._holding():
            return []
        active.hold_expired = True
        self._hold_deadline = None
        actions: list[Action] = []
        while self._held:
            message = self._held.popleft()
            if isinstance(message, StreamCancel):
                continue  # the stream it would stop is still being cancelled
            error = ProtocolError(
                ErrorCode.REQUEST_IN_PROGRESS,
                f"the cancelled request did not end within {self.config.hold_timeout_s:g} s; "
                "send this again after its stream_end",
            )
            # The node was slow, not the client: no charge to the error budget.
            actions += self._error(error, _id_of(message), _session_of(message), charge=False)
        return actions

    def reject(self, error: NodeError, request_id: RequestId | None = None) -> list[Action]:
        """A frame that could not be decoded: answer with its code, count it."""
        if self.closed:
            return []
        return self._error(error, request_id, None)

    # ---------------------------------------------------------------- handlers

    def _on_cancel(self, message: StreamCancel) -> list[Action]:
        active = self.active
        if active is None or active.cancel_requested:
            return []  # nothing in flight (it may just have finished): nothing to do
        active.cancel_requested = True
        return [CancelRequest(message.reason or "client requested cancel")]

    def _take_init_allowance(self) -> None:
        now = self._clock()
        cfg = self.config
        self._init_allowance = min(
            float(cfg.init_burst),
            self._init_allowance + (now - self._allowance_at) * cfg.init_refill_per_s,
        )
        self._allowance_at = now
        if self._init_allowance < 1.0:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, "too many session inits on this connection; slow down"
            )
        self._init_allowance -= 1.0

    def _take_address_allowance(self, kind: str, address: str | None) -> None:
        """One new session for this network or client address, node-wide."""
        limiter = self.address_limiter
        if limiter is None or address is None:
            return
        if not limiter.take(f"{kind}:{address}"):
            what = "your network address" if kind == "ip" else f"client {address}"
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many new sessions from {what}; slow down"
            )

    def _admit(self) -> None:
        if self._admission is not None:
            self._admission()

    def _take_new_session(self) -> None:
        """The allowances a new plaintext session (or re-init) uses up."""
        self._take_init_allowance()
        self._take_address_allowance("ip", self.remote_address)

    def _on_encrypted_init(self, message: EncryptedSessionInit) -> list[Action]:
        if self.host_key is None:
            raise ProtocolError(
                ErrorCode.ENCRYPTION_NOT_SUPPORTED, "this node has no host key; use plaintext mode"
            )
        self._admit()
        self._take_init_allowance()
        self._take_address_allowance("ip", self.remote_address)
        self._check_session_room(message.session_id)
        payload = message.payload
        data = open_session_init(self.host_key, payload)
        try:
            allowed = self.config.allowed_clients
            if allowed is not None and data.client_address.lower() not in allowed:
                raise ProtocolError(
                    ErrorCode.SESSION_AUTH_DENIED,
                    f"client {data.client_address} is not allowed on this node",
                )
            if self.address_limiter is not None:
                self._take_address_allowance("client", data.client_address.lower())
            # A session key serves one init only: a second init with it would restart the
            # message counter at 0 under the same key, so recorded messages would be
            # accepted again. The cache keeps a keyed fingerprint, never the key. Both
            # entries are recorded together or not at all, in one call (one transaction in
            # the shared file).
            fingerprint = SESSION_KEY_ENTRY + self.host_key.fingerprint(data.session_key)
            refusal = self.replay_cache.add_all((payload.replay_key(), fingerprint))
            if refusal is not None:
                if refusal.code is ErrorCode.RATE_LIMITED:
                    raise ProtocolError(
                        ErrorCode.RATE_LIMITED, "the node is handling too many new sessions; retry"
                    )
                if refusal.index == 0:
                    raise ProtocolError(
                        ErrorCode.REPLAY_DETECTED, "this session init was already used (replay)"
                    )
                raise ProtocolError(
                    ErrorCode.REPLAY_DETECTED,
                    "this session key was already used by an earlier init; take a fresh "
                    "session key for every init",
                )
            old = self.sessions.get(message.session_id)
            cost = session_cost(data.model_name, data.vector_database_json)
            self._reserve(cost, old)
        except BaseException:
            data.session_key.wipe()
            raise
        actions: list[Action] = []
        continues = (
            old is not None
            and old.encrypted
            and old.job_id == data.job_id
            and old.chain_id == message.chain_id
            and old.client_address is not None
            and constant_time_equal(old.client_address.encode(), data.client_address.encode())
            and old.price_per_token == data.price_per_token
            and old.model_name == data.model_name
        )
        if old is not None and continues:
            # Same job, client and terms: the session goes on under a fresh key.
            old.wipe()
            old.key = data.session_key
            old.next_index = 0
            old.created_at = self._clock()
            old.vector_database_json = data.vector_database_json
            old.cost = cost
        else:
            if old is not None:
                del self.sessions[message.session_id]
                old.wipe()
                old.cost = 0  # its reservation became the new session's
                actions.append(SessionEnded(old, "reinit"))
            session = Session(
                session_id=message.session_id,
                job_id=data.job_id,
                chain_id=message.chain_id,
                encrypted=True,
                created_at=self._clock(),
                key=data.session_key,
                client_address=data.client_address,
                model_name=data.model_name,
                price_per_token=data.price_per_token,
                vector_database_json=data.vector_database_json,
                cost=cost,
            )
            self.sessions[message.session_id] = session
            actions.append(SessionStarted(session))
        self.used_encryption = True
        self._expired_ids.discard(message.session_id)
        actions.append(
            Send(
                SessionInitAck(
                    session_id=message.session_id,
                    job_id=data.job_id,
                    chain_id=message.chain_id,
                    message=ENCRYPTED_ACK_TEXT,
                    client_address=data.client_address,
                    id=message.id,
                )
            )
        )
        return actions

    def _session_for_message(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None and session_id in self._expired_ids:
            raise ProtocolError(
                ErrorCode.SESSION_EXPIRED,
                f"session {session_id} expired; send a new encrypted_session_init",
            )
        if session is None or session.key is None:
            raise ProtocolError(
                ErrorCode.SESSION_KEY_NOT_FOUND,
                f"no encrypted session {session_id} on this connection; send "
                "encrypted_session_init first",
            )
        return session

    def _on_encrypted_message(self, message: EncryptedMessage) -> list[Action]:
        if self.host_key is None:
            raise ProtocolError(
                ErrorCode.ENCRYPTION_NOT_SUPPORTED, "this node has no host key; use plaintext mode"
            )
        session = self._session_for_message(message.session_id)
        self._admit()
        if self._clock() - session.created_at >= self.config.session_ttl_s:
            self._drop(session)
            self._remember_expired(session.session_id)
            actions: list[Action] = [SessionEnded(session, "ttl_expired")]
            actions += self._error(
                ProtocolError(
                    ErrorCode.SESSION_EXPIRED,
                    f"session {session.session_id} expired; send a new encrypted_session_init",
                ),
                message.id,
                message.session_id,
            )
            return actions
        payload = message.payload
        if payload.index < session.next_index:
            raise ProtocolError(
                ErrorCode.REPLAY_DETECTED,
                f"message_{payload.index} is older than the next expected index "
                f"{session.next_index} (replay)",
            )
        assert session.key is not None
        with aead.open_secret(session.key, payload.nonce, payload.ciphertext, payload.aad) as raw:
            session.next_index = payload.index + 1
            try:
                text = raw.view().tobytes().decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(
                    ErrorCode.INVALID_PAYLOAD, "decrypted message is not UTF-8 text"
                ) from None
        request = parse_request_plaintext(text)
        del text
        self.active = ActiveRequest(session, message.id)
        return [StartRequest(request, session, message.id)]

    def _plaintext_allowed(self) -> list[Action]:
        if self.config.require_encryption:
            raise ProtocolError(
                ErrorCode.ENCRYPTION_REQUIRED,
                "this node requires encryption; use encrypted_session_init",
            )
        if (
            self.config.allowed_clients is not None
            and not self.config.allow_plaintext_with_allowlist
        ):
            raise ProtocolError(
                ErrorCode.ENCRYPTION_REQUIRED,
                "this node serves allow-listed clients only, and a plaintext session proves "
                "no address; use encrypted_session_init",
            )
        if self.used_encryption:
            raise ProtocolError(
                ErrorCode.MIXED_MODE_REJECTED,
                "this connection holds an encrypted session; plaintext requests are refused",
            )
        if self.used_plaintext:
            return []
        self.used_plaintext = True
        return [PlaintextDeprecated()]

    def _check_session_room(self, session_id: str) -> None:
        if session_id not in self.sessions and len(self.sessions) >= self.config.max_sessions:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"this connection already holds {len(self.sessions)} sessions (the limit); "
                "reuse a session id or open another connection",
            )

    def _reserve(self, cost: int, replacing: Session | None) -> None:
        """Reserve ``cost`` bytes for a session that replaces ``replacing`` (or is new):
        refused past this connection's limit or the node's. On success the replaced
        session's reservation counts towards the new one."""
        freed = replacing.cost if replacing is not None else 0
        if self.session_bytes - freed + cost > self.config.max_session_bytes:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"the sessions of this connection would hold more than "
                f"{self.config.max_session_bytes} bytes (the limit); end some, or send "
                "less vectorDatabase data",
            )
        if cost > freed and not self.memory.reserve(cost - freed):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "the node holds as much session data as it may; retry later",
            )
        if freed > cost:
            self.memory.release(freed - cost)
        self.session_bytes += cost - freed

    def _drop(self, session: Session) -> None:
        """Forget a session: wipe its key, release its reservation."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        session.wipe()
        self._release(session)

    def _release(self, session: Session) -> None:
        self.session_bytes -= session.cost
        self.memory.release(session.cost)
        session.cost = 0

    def _on_plaintext_init(self, message: SessionInit) -> list[Action]:
        actions = self._plaintext_allowed()
        self._admit()
        self._check_session_room(message.session_id)
        self._take_new_session()
        old = self.sessions.get(message.session_id)
        if old is not None and old.job_id == message.job_id:
            session = old
        else:
            self._reserve(SESSION_OVERHEAD_BYTES, old)
            if old is not None:
                del self.sessions[message.session_id]
                old.wipe()
                old.cost = 0  # its reservation became the new session's
                actions.append(SessionEnded(old, "reinit"))
            session = Session(
                session_id=message.session_id,
                job_id=message.job_id,
                chain_id=message.chain_id,
                encrypted=False,
                created_at=self._clock(),
                cost=SESSION_OVERHEAD_BYTES,
            )
            actions.append(SessionStarted(session))
        self.sessions[message.session_id] = session
        actions.append(
            Send(
                SessionInitAck(
                    session_id=message.session_id,
                    job_id=message.job_id,
                    chain_id=message.chain_id,
                    message=PLAINTEXT_ACK_TEXT,
                    id=message.id,
                )
            )
        )
        return actions

    def _on_prompt(self, message: PromptRequest) -> list[Action]:
        actions = self._plaintext_allowed()
        self._admit()
        session = self.sessions.get(message.session_id) if message.session_id else None
        if session is None and message.session_id:
            # An old client that never sent session_init: the prompt opens the session.
            self._check_session_room(message.session_id)
            self._take_new_session()
            self._reserve(SESSION_OVERHEAD_BYTES, None)
            session = Session(
                session_id=message.session_id,
                job_id=None,
                chain_id=0,
                encrypted=False,
                created_at=self._clock(),
                cost=SESSION_OVERHEAD_BYTES,
            )
            self.sessions[message.session_id] = session
            actions.append(SessionStarted(session))
        if session is None:
            if self._anonymous is None:
                self._take_new_session()
                self._anonymous = Session(
                    session_id="",
                    job_id=None,
                    chain_id=0,
                    encrypted=False,
                    created_at=self._clock(),
                )
                actions.append(SessionStarted(self._anonymous))
            session = self._anonymous
        self.active = ActiveRequest(session, message.id)
        actions.append(StartRequest(InferenceRequest.from_prompt(message), session, message.id))
        return actions

    # ---------------------------------------------------------------- output

    def _error(
        self,
        exc: NodeError,
        request_id: RequestId | None,
        session_id: str | None,
        *,
        charge: bool = True,
    ) -> list[Action]:
        extra = exc.extra if isinstance(exc, ProtocolError) else getattr(exc, "wire_extra", {})
        actions: list[Action] = [
            Send(ErrorMessage(exc.code.value, exc.message, request_id, session_id, dict(extra)))
        ]
        if charge and exc.code not in _NODE_SIDE_CODES:
            self.error_count += 1
            if self.error_count >= self.config.max_errors:
                actions.append(
                    Close(CLOSE_POLICY_VIOLATION, "too many protocol errors on this connection")
                )
        return actions

    def piece(self, text: str, tokens: int) -> OutboundMessage:
        """One frame for one piece of generated text of the active request."""
        active = self.active
        if active is None:
            raise RuntimeError("no request is streaming")
        active.completion_tokens += tokens
        session = active.session
        if session.key is None:
            return StreamChunk(text, tokens, active.request_id, session.session_id or None)
        index = active.next_chunk
        active.next_chunk = index + 1
        return self._chunk(active, text.encode("utf-8"), tokens, index, final=False)

    def piece_text(self, text: str, tokens: int) -> str:
        """``encode(self.piece(text, tokens))``, for the sender's hot path: the same
        frame text, without building the message objects in between."""
        active = self.active
        if active is None:
            raise RuntimeError("no request is streaming")
        session = active.session
        key = session.key
        if key is None:
            return encode(self.piece(text, tokens))
        active.completion_tokens += tokens
        index = active.next_chunk
        active.next_chunk = index + 1
        nonce = self._rng(aead.NONCE_SIZE)
        aad = b"chunk_%d" % index
        return encrypted_chunk_text(
            tokens,
            aead.seal(key, nonce, text.encode("utf-8"), aad),
            nonce,
            aad,
            index,
            active.request_id,
            session.session_id,
        )

    def _chunk(
        self, active: ActiveRequest, data: bytes, tokens: int, index: int, *, final: bool
    ) -> EncryptedChunk:
        session = active.session
        assert session.key is not None
        nonce = self._rng(aead.NONCE_SIZE)
        aad = b"chunk_%d" % index
        return EncryptedChunk(
            tokens=tokens,
            payload=ChunkPayload(aead.seal(session.key, nonce, data, aad), nonce, aad, index),
            id=active.request_id,
            session_id=session.session_id,
            final=final,
        )

    def finish(
        self,
        finish_reason: str,
        *,
        prompt_tokens: int,
        completion_tokens: int | None = None,
        hold: bool = False,
    ) -> list[OutboundMessage]:
        """The closing frames of the active request (PROTOCOL.md section 4).

        With ``hold`` the request stays the active one (a new request is still refused
        with ``REQUEST_IN_PROGRESS``) until :meth:`release`: for a driver that sends the
        last of these frames later (``stream_end`` after the usage is recorded).
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {finish_reason!r}")
        active = self.active
        if active is None:
            raise RuntimeError("no request is streaming")
        if not hold:
            self.active = None
        completion = active.completion_tokens if completion_tokens is None else completion_tokens
        session = active.session
        frames: list[OutboundMessage] = []
        if session.key is not None and not session.key.wiped:
            frames.append(self._chunk(active, b"", 0, active.next_chunk, final=True))
            nonce = self._rng(aead.NONCE_SIZE)
            sealed = aead.seal(session.key, nonce, finish_reason.encode(), RESPONSE_FINAL_AAD)
            frames.append(
                EncryptedResponse(
                    ChunkPayload(sealed, nonce, RESPONSE_FINAL_AAD),
                    active.request_id,
                    session.session_id,
                )
            )
        reason = {"cancelled": "cancelled", "error": "error"}.get(finish_reason, "complete")
        frames.append(
            StreamEnd(
                reason=reason,
                tokens_used=completion,
                finish_reason=finish_reason,
                usage=Usage(prompt_tokens, completion, prompt_tokens + completion),
                id=active.request_id,
                session_id=session.session_id or None,
            )
        )
        return frames

    def release(self) -> None:
        """End a request held by ``finish(..., hold=True)``: the connection takes requests
        again."""
        self.active = None

    def fail(
        self, error: NodeError, *, prompt_tokens: int = 0, completion_tokens: int | None = None
    ) -> list[Action]:
        """End the active request with an ``error`` frame, then the error ending."""
        active = self.active
        if active is None:
            raise RuntimeError("no request is streaming")
        # A request that was valid but could not be served (busy model, unknown model,
        # prompt too long, backend failure) is not protocol abuse: no error-budget charge.
        actions = self._error(
            error, active.request_id, active.session.session_id or None, charge=False
        )
        frames = self.finish(
            "error", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        return actions[:1] + [Send(f) for f in frames] + actions[1:]

    # ---------------------------------------------------------------- lifetime

    def _remember_expired(self, session_id: str) -> None:
        """Keep a bounded set of expired ids so their messages get SESSION_EXPIRED."""
        if len(self._expired_ids) >= MAX_EXPIRED_IDS:
            self._expired_ids.pop()
        self._expired_ids.add(session_id)

    def expire_sessions(self) -> list[Action]:
        """Drop (and wipe) encrypted sessions whose TTL has passed, except the streaming one."""
        now = self._clock()
        actions: list[Action] = []
        busy = self.active.session if self.active is not None else None
        for sid, session in list(self.sessions.items()):
            if session is busy or not session.encrypted:
                continue
            if now - session.created_at >= self.config.session_ttl_s:
                self._drop(session)
                self._remember_expired(sid)
                actions.append(SessionEnded(session, "ttl_expired"))
        return actions

    def close(self, reason: str = "closed") -> list[SessionEnded]:
        """Wipe every key this connection holds; report the sessions that ended."""
        ended: list[SessionEnded] = []
        self.closed = True
        self.active = None
        self._held.clear()
        self._hold_deadline = None
        for session in self.sessions.values():
            session.wipe()
            self._release(session)
            ended.append(SessionEnded(session, reason))
        if self._anonymous is not None and self._anonymous not in self.sessions.values():
            ended.append(SessionEnded(self._anonymous, reason))
            self._anonymous = None
        self.sessions.clear()
        return ended


def _id_of(message: InboundMessage) -> RequestId | None:
    return message.id


def _session_of(message: InboundMessage) -> str | None:
    return getattr(message, "session_id", None)
