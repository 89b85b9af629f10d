"""The node's side of protocol v2 (sans-I/O), in the action style of v1's ConnectionState.

The driver hands every binary WebSocket message to :meth:`ServerConnectionV2.receive`
and gets back a list of actions. The first message is the client's Noise message 1,
answered by message 2; after that every message is one encrypted record. While a
request streams, the driver turns backend pieces into frames with :meth:`chunk` and ends
the answer with :meth:`finish` (an END record) or :meth:`fail` (an ERROR record).

Any record that fails authentication is fatal: every key is wiped at once and the
connection is closed with 1008, with no further record. :meth:`close` (called by the
driver when the connection's scope exits) wipes whatever is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Final

import attrs

from node.crypto.errors import DecryptionFailed, ErrorCode, InvalidCiphertext, NodeError
from node.crypto.hostkey import HostKey
from node.crypto.noise import SECP256K1, HandshakeState, KeyPair, NoiseError, TransportCipher
from node.crypto.secret import SecretBytes
from node.protocol.connection import (
    CancelRequest,
    Close,
    Session,
    SessionEnded,
    SessionMemory,
    SessionStarted,
    StartRequest,
    session_cost,
)
from node.protocol.errors import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    ProtocolError,
)
from node.protocol.ratelimit import AddressRateLimiter
from node.protocol.requests import request_from_object
from node.protocol.v2 import records as r
from node.protocol.v2.session import parse_session_record, verify_session

CLOSE_UNSUPPORTED_DATA: Final = 1003
# json.dumps of one string with ensure_ascii=False (the C encoder when available)
_json_string: Callable[[str], str] = json.encoder.encode_basestring
_NODE_SIDE_CODES: Final = frozenset(
    {ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL_ERROR, ErrorCode.STORAGE_UNAVAILABLE}
)


@attrs.frozen
class Send:
    """Send these bytes as one binary WebSocket message."""

    frame: bytes


Action = Send | StartRequest | CancelRequest | Close | SessionStarted | SessionEnded


@attrs.define
class V2Config:
    allowed_clients: frozenset[str] | None = None  # lowercase addresses; None = anyone
    max_errors: int = 10  # recoverable protocol errors before the connection is closed


@attrs.define(eq=False)
class ActiveRequestV2:
    request_id: str
    completion_tokens: int = 0
    cancel_requested: bool = False
    chunk_prefix: bytes = b""  # '{"type":"chunk","request_id":<id>,"text":' as UTF-8

    def __attrs_post_init__(self) -> None:
        self.chunk_prefix = (
            '{"type":"chunk","request_id":' + _json_string(self.request_id) + ',"text":'
        ).encode("utf-8")


class ServerConnectionV2:
    """Protocol v2 rules for one connection, node side."""

    def __init__(
        self,
        *,
        host_key: HostKey,
        clock: Callable[[], float],
        config: V2Config | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        ephemeral: KeyPair | None = None,
        address_limiter: AddressRateLimiter | None = None,
        remote_address: str | None = None,
        admission: Callable[[], None] | None = None,
        memory: SessionMemory | None = None,
    ) -> None:
        """``address_limiter``, ``remote_address``, ``admission`` and ``memory`` as for
        v1's :class:`~node.protocol.connection.ConnectionState`: the session record takes
        one new session from the network address's and the client address's allowances,
        ``admission`` may refuse new sessions and requests (``STORAGE_UNAVAILABLE``), and
        the session reserves its cost (``session_cost``) from the node's session memory
        (``--max-session-bytes``, shared with v1) until :meth:`close` releases it."""
        self.config = config or V2Config()
        self._address_limiter = address_limiter
        self._remote_address = remote_address
        self._admission = admission
        self.memory = memory if memory is not None else SessionMemory(2**62)
        self._clock = clock
        self.state = "handshake"  # -> "session" -> "ready" -> "closed"
        self.padding = 0
        self.session: Session | None = None
        self.active: ActiveRequestV2 | None = None
        self.error_count = 0
        self.handshake_started_at: float | None = None
        self._send: TransportCipher | None = None
        self._recv: TransportCipher | None = None
        self._handshake: HandshakeState | None = HandshakeState(
            "NK",
            initiator=False,
            dh=SECP256K1,
            prologue=r.PROLOGUE,
            s=host_key.noise_keypair(),
            e=ephemeral,
            rng=rng,
        )
        self.handshake_hash: bytes | None = None

    # ------------------------------------------------------------------ queries

    @property
    def keys_held(self) -> int:
        """1 while this connection holds any key material, else 0 (for the gauge)."""
        live = self._handshake is not None or any(
            c is not None and not c.wiped for c in (self._send, self._recv)
        )
        return int(live)

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def streaming(self) -> bool:
        return self.active is not None

    # ------------------------------------------------------------------ input

    def receive(self, frame: bytes | bytearray) -> list[Action]:
        """One binary WebSocket message from the client."""
        if self.state == "closed":
            return []
        if len(frame) > r.MAX_FRAME:
            return self._fatal(CLOSE_MESSAGE_TOO_BIG, "frame is larger than the v2 limit")
        if self.state == "handshake":
            return self._on_handshake(frame)
        return self._on_record(frame)

    def receive_text(self) -> list[Action]:
        """A text frame: not part of v2. 1003 before the handshake, 1008 after it."""
        if self.state == "closed":
            return []
        if self.state == "handshake":
            return self._fatal(CLOSE_UNSUPPORTED_DATA, "v2 takes binary frames only")
        return self._fatal(CLOSE_POLICY_VIOLATION, "text frame on a v2 connection")

    def timeout(self) -> list[Action]:
        """The driver's handshake deadline passed before the session record came."""
        if self.state in ("handshake", "session"):
            return self._fatal(CLOSE_POLICY_VIOLATION, "handshake not completed in time")
        return []

    # ---------------------------------------------------------------- handshake

    def _on_handshake(self, frame: bytes | bytearray) -> list[Action]:
        hs = self._handshake
        assert hs is not None
        if not r.MIN_HANDSHAKE_MESSAGE <= len(frame) <= r.MAX_HANDSHAKE_MESSAGE:
            return self._fatal(CLOSE_POLICY_VIOLATION, "handshake message has the wrong size")
        self.handshake_started_at = self._clock()
        try:
            payload = hs.read_message(frame)
            request = r.load_json_object(bytes(payload), "handshake payload")
            self.padding = r.padding_field(request)
            reply = r.dump_json(
                {
                    "protocol": r.PROTOCOL_ID,
                    "max_record": r.MAX_BODY,
                    "rekey_every": r.REKEY_EVERY,
                    "padding": self.padding,
                }
            )
            msg2 = hs.write_message(reply)
        except (NodeError, ValueError):
            return self._fatal(CLOSE_POLICY_VIOLATION, r.HANDSHAKE_FAILED_REASON)
        self.handshake_hash = hs.handshake_hash
        self._send, self._recv = hs.transport(r.REKEY_EVERY)
        self._handshake = None
        self.state = "session"
        return [Send(msg2)]

    # ---------------------------------------------------------------- records

    def _open(self, frame: bytes | bytearray) -> bytearray | None:
        assert self._recv is not None
        if len(frame) < r.MIN_FRAME:
            return None
        try:
            return self._recv.decrypt(frame)
        except (DecryptionFailed, InvalidCiphertext, NoiseError):
            return None

    def _on_record(self, frame: bytes | bytearray) -> list[Action]:
        plaintext = self._open(frame)
        if plaintext is None:
            return self._fatal(CLOSE_POLICY_VIOLATION, "record authentication failed")
        with SecretBytes.take(plaintext) as secret:
            try:
                kind, body = r.parse_record(secret.live_buffer(), self.padding)
            except ProtocolError as exc:
                return self._refuse(exc)
        if kind == r.DATA:
            return self._on_data(body)
        if kind == r.CLOSE:
            return self._fatal(CLOSE_NORMAL, "client said goodbye")
        name = r.RECORD_NAMES.get(kind, f"0x{kind:02x}")
        return self._refuse(
            ProtocolError(ErrorCode.INVALID_MESSAGE, f"record type {name} is not allowed here")
        )

    def _on_data(self, body: bytes) -> list[Action]:
        request_id: str | None = None
        try:
            obj = r.load_json_object(body, "DATA record")
            del body
            kind = obj.get("type")
            if not isinstance(kind, str):
                raise ProtocolError(ErrorCode.INVALID_MESSAGE, "DATA needs a string field type")
            if self.state == "session":
                if kind != "session":
                    return self._refuse(
                        ProtocolError(
                            ErrorCode.INVALID_MESSAGE, "the first record must be the session"
                        )
                    )
                return self._on_session(obj)
            if kind == "ping":
                return [Send(self._data({"type": "pong"}))]
            if kind == "cancel":
                return self._on_cancel(obj)
            if kind == "request":
                request_id = r.request_id_field(obj)
                return self._on_request(obj, request_id)
            if kind == "session":
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    "one session per v2 connection; open a new connection for another",
                )
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"unknown DATA type {kind[:40]!r}")
        except ProtocolError as exc:
            return self._error(exc, request_id)

    def _on_session(self, obj: dict[str, object]) -> list[Action]:
        assert self.handshake_hash is not None
        try:
            terms, address, signature = parse_session_record(dict(obj))
            verified = verify_session(self.handshake_hash, terms, address, signature)
            allowed = self.config.allowed_clients
            if allowed is not None and verified.client_address.lower() not in allowed:
                raise ProtocolError(
                    ErrorCode.SESSION_AUTH_DENIED,
                    f"client {verified.client_address} is not allowed on this node",
                )
            self._admit()
            self._take_allowance("ip", self._remote_address)
            self._take_allowance("client", verified.client_address.lower())
            vector_database_json = (
                None
                if terms.vector_db is None
                else json.dumps({"name": terms.vector_db}, ensure_ascii=True, separators=(",", ":"))
            )
            cost = session_cost(terms.model, vector_database_json)
            if not self.memory.reserve(cost):
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    "the node holds as much session data as it may; retry later",
                )
        except ProtocolError as exc:
            return self._refuse(exc)
        session = Session(
            session_id=self.handshake_hash[:16].hex(),
            job_id=terms.job_id,
            chain_id=terms.chain_id,
            encrypted=True,
            created_at=self._clock(),
            client_address=verified.client_address,
            model_name=terms.model,
            price_per_token=terms.price_per_token,
            vector_database_json=vector_database_json,
            cost=cost,
            protocol="v2",
        )
        self.session = session
        self.state = "ready"
        ack = self._data(
            {
                "type": "session_ack",
                "session_id": session.session_id,
                "client_address": verified.client_address,
                "model": terms.model,
            }
        )
        return [SessionStarted(session), Send(ack)]

    def _on_cancel(self, obj: dict[str, object]) -> list[Action]:
        request_id = r.request_id_field(dict(obj))
        active = self.active
        if active is None or active.cancel_requested or active.request_id != request_id:
            return []  # nothing of that id in flight (it may just have finished)
        active.cancel_requested = True
        return [CancelRequest("client requested cancel")]

    def _admit(self) -> None:
        if self._admission is None:
            return
        try:
            self._admission()
        except NodeError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _take_allowance(self, kind: str, address: str | None) -> None:
        if self._address_limiter is None or address is None:
            return
        if not self._address_limiter.take(f"{kind}:{address}"):
            what = "your network address" if kind == "ip" else f"client {address}"
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many new sessions from {what}; slow down"
            )

    def _on_request(self, obj: dict[str, object], request_id: str) -> list[Action]:
        assert self.session is not None
        self._admit()
        if self.active is not None:
            raise ProtocolError(
                ErrorCode.REQUEST_IN_PROGRESS,
                "a request is already streaming on this connection; wait for its END "
                "or send cancel",
            )
        request = request_from_object(dict(obj))
        self.active = ActiveRequestV2(request_id)
        return [StartRequest(request, self.session, request_id)]

    # ---------------------------------------------------------------- output

    def _record(self, kind: int, obj: dict[str, object]) -> bytes:
        if self._send is None or self.state == "closed":
            raise RuntimeError("this v2 connection has no transport keys (closed)")
        with SecretBytes.take(r.encode_record(kind, r.dump_json(obj), self.padding)) as plain:
            return self._send.encrypt(plain.live_buffer())

    def _data(self, obj: dict[str, object]) -> bytes:
        return self._record(r.DATA, obj)

    def _error_record(self, exc: NodeError, request_id: str | None) -> bytes:
        obj: dict[str, object] = {"code": exc.code.value, "message": exc.message}
        if request_id is not None:
            obj["request_id"] = request_id
        if isinstance(exc, ProtocolError):
            for key, value in exc.extra.items():
                obj.setdefault(key, value)
        return self._record(r.ERROR, obj)

    def _error(self, exc: NodeError, request_id: str | None) -> list[Action]:
        """A recoverable error: an ERROR record, charged to the connection's budget."""
        actions: list[Action] = [Send(self._error_record(exc, request_id))]
        if exc.code not in _NODE_SIDE_CODES:
            self.error_count += 1
            if self.error_count >= self.config.max_errors:
                actions += self._fatal(
                    CLOSE_POLICY_VIOLATION, "too many protocol errors on this connection"
                )
        return actions

    def _refuse(self, exc: NodeError) -> list[Action]:
        """An error that ends the connection: ERROR record, then wipe and close 1008."""
        frame = self._error_record(exc, None)
        return [Send(frame), *self._fatal(CLOSE_POLICY_VIOLATION, exc.message[:120])]

    def _fatal(self, code: int, reason: str) -> list[Action]:
        actions: list[Action] = []
        if self.active is not None:
            actions.append(CancelRequest(reason))
        actions += self.close("error" if code != CLOSE_NORMAL else "closed")
        actions.append(Close(code, reason))
        return actions

    def chunk(self, request_id: str, text: str, tokens: int) -> bytes:
        """A DATA ``chunk`` record for a piece of the active answer.

        The hot path of streaming: the JSON body is written directly (the same bytes
        ``dump_json`` gives, a test checks) and sealed without intermediate objects.
        Raises ValueError when the body would pass the record limit: split the text.
        """
        active = self._active(request_id)
        send = self._send
        if send is None or self.state == "closed":
            raise RuntimeError("this v2 connection has no transport keys (closed)")
        body = b"".join(
            (
                active.chunk_prefix,
                _json_string(text).encode("utf-8"),
                b',"tokens":%d}' % tokens,
            )
        )
        size = len(body)
        if size > r.MAX_BODY:
            raise ValueError(f"record body is {size} bytes; at most {r.MAX_BODY}")
        record = bytearray(r.padded_length(size, self.padding))
        record[0] = r.DATA
        record[1 : r.HEADER_LEN] = size.to_bytes(4, "big")
        record[r.HEADER_LEN : r.HEADER_LEN + size] = body
        frame = send.encrypt(record)
        record[:] = bytes(len(record))
        active.completion_tokens += tokens
        return frame

    def finish(
        self,
        request_id: str,
        finish_reason: str,
        *,
        prompt_tokens: int,
        completion_tokens: int | None = None,
    ) -> bytes:
        """The END record that closes the active answer."""
        if finish_reason not in r.FINISH_REASONS:
            raise ValueError(f"unknown finish reason {finish_reason!r}")
        active = self._active(request_id)
        completion = active.completion_tokens if completion_tokens is None else completion_tokens
        frame = self._record(
            r.END,
            {
                "request_id": request_id,
                "finish_reason": finish_reason,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            },
        )
        self.active = None
        return frame

    def fail(self, request_id: str, error: NodeError) -> bytes:
        """The ERROR record that ends the active answer (instead of an END record)."""
        self._active(request_id)
        frame = self._error_record(error, request_id)
        self.active = None
        return frame

    def _active(self, request_id: str) -> ActiveRequestV2:
        active = self.active
        if active is None or active.request_id != request_id:
            raise RuntimeError("no such request is streaming")
        return active

    # ---------------------------------------------------------------- lifetime

    def goodbye(self, reason: str = "server shutdown") -> bytes | None:
        """The authenticated CLOSE record (None before the handshake finished).
        Nothing may be sent after it; the driver then closes the WebSocket."""
        if self._send is None or self.state == "closed":
            return None
        return self._record(r.CLOSE, {"reason": reason[: r.MAX_REASON]})

    def wipe(self) -> None:
        """Zero every key this connection holds."""
        if self._handshake is not None:
            self._handshake.wipe()
            self._handshake = None
        for cipher in (self._send, self._recv):
            if cipher is not None:
                cipher.wipe()

    def close(self, reason: str = "closed") -> list[SessionEnded]:
        """Wipe everything; report the session that ended (at most one)."""
        self.wipe()
        if self.state == "closed":
            return []
        self.state = "closed"
        self.active = None
        session, self.session = self.session, None
        if session is None:
            return []
        self.memory.release(session.cost)
        session.cost = 0
        return [SessionEnded(session, reason)]
