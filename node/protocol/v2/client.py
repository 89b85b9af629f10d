"""The client's side of protocol v2 (sans-I/O).

:meth:`ClientConnectionV2.start` gives Noise message 1; :meth:`receive` takes every
binary message from the node and returns events. Anything that breaks the protocol
(a record that fails authentication, a record that does not belong) raises
:class:`V2ClientError`, wipes every key and leaves the connection unusable. Truncation
is visible: an answer ends with exactly one END or ERROR record carrying its request id,
so :meth:`connection_lost` raises ``STREAM_TRUNCATED`` when the socket ends first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn

import attrs
from coincurve import PrivateKey

from node.crypto.curve import address_of
from node.crypto.errors import NodeError
from node.crypto.noise import SECP256K1, HandshakeState, KeyPair, TransportCipher
from node.crypto.secret import SecretBytes, constant_time_equal
from node.protocol.errors import ProtocolError
from node.protocol.v2 import records as r
from node.protocol.v2.session import SessionTerms, session_record_object, sign_session

# ------------------------------------------------------------------------- errors


class V2ClientError(Exception):
    """A fatal v2 failure seen by the client. ``code`` is the client-side error code of
    node.client (docs/TROUBLESHOOTING.md) that the failure maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"V2ClientError(code={self.code!r}, message={self.message!r})"


HOST_VERIFICATION_FAILED = "HOST_VERIFICATION_FAILED"  # msg2 does not open: not the host
AUTHENTICATION_FAILED = "CHUNK_AUTHENTICATION_FAILED"  # a record failed authentication
MALFORMED_FRAME = "MALFORMED_FRAME"  # authentic but badly formed
UNEXPECTED_FRAME = "UNEXPECTED_FRAME"  # authentic, well formed, but not allowed here
STREAM_TRUNCATED = "STREAM_TRUNCATED"  # the socket ended inside an answer
SESSION_CLOSED = "SESSION_CLOSED"  # used after the connection ended

# ------------------------------------------------------------------------- events


@attrs.frozen
class HandshakeComplete:
    padding: int
    handshake_hash: bytes


@attrs.frozen
class SessionAccepted:
    session_id: str
    client_address: str
    model: str


@attrs.frozen
class Chunk:
    request_id: str
    text: str
    tokens: int


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@attrs.frozen
class End:
    request_id: str
    finish_reason: str
    usage: Usage


@attrs.frozen
class ErrorReceived:
    code: str
    message: str
    request_id: str | None


@attrs.frozen
class Pong:
    pass


@attrs.frozen
class Closed:
    """The node's authenticated goodbye: nothing follows it."""

    reason: str


Event = HandshakeComplete | SessionAccepted | Chunk | End | ErrorReceived | Pong | Closed


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise V2ClientError(MALFORMED_FRAME, f"{name} must be a non-negative integer")
    return value


def _str(obj: dict[str, Any], name: str, limit: int = 1 << 20) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise V2ClientError(MALFORMED_FRAME, f"{name} must be a string")
    return value


class ClientConnectionV2:
    """Protocol v2 rules for one connection, client side."""

    def __init__(
        self,
        host_public_key: bytes,
        *,
        padding: int = 0,
        rng: Callable[[int], bytes] = os.urandom,
        ephemeral: KeyPair | None = None,
    ) -> None:
        if padding not in r.PADDING_CHOICES:
            raise ValueError(f"padding must be one of {r.PADDING_CHOICES}")
        self.padding = padding
        self.host_public_key = bytes(host_public_key)
        self._handshake: HandshakeState | None = HandshakeState(
            "NK",
            initiator=True,
            dh=SECP256K1,
            prologue=r.PROLOGUE,
            rs=self.host_public_key,
            e=ephemeral,
            rng=rng,
        )
        self._send: TransportCipher | None = None
        self._recv: TransportCipher | None = None
        self.state = "new"  # -> "handshake" -> "session" -> "ready" -> "closed"
        self.handshake_hash: bytes | None = None
        self.session_sent = False
        self._signed_as = ""
        self.open_requests: set[str] = set()
        self.goodbye_received = False

    # ------------------------------------------------------------------ queries

    @property
    def keys_held(self) -> int:
        live = self._handshake is not None or any(
            c is not None and not c.wiped for c in (self._send, self._recv)
        )
        return int(live)

    # ---------------------------------------------------------------- handshake

    def start(self) -> bytes:
        """Noise message 1: e.pub || ENC(payload1)."""
        if self.state != "new" or self._handshake is None:
            raise RuntimeError("start() is called once, first")
        payload = r.dump_json({"padding": self.padding}) if self.padding else b"{}"
        self.state = "handshake"
        return self._handshake.write_message(payload)

    def _on_handshake(self, frame: bytes | bytearray) -> list[Event]:
        hs = self._handshake
        assert hs is not None
        if not r.MIN_HANDSHAKE_MESSAGE <= len(frame) <= r.MAX_HANDSHAKE_MESSAGE:
            self._die(HOST_VERIFICATION_FAILED, "the node's handshake message has a bad size")
        try:
            payload = bytes(hs.read_message(frame))
        except NodeError:
            self._die(
                HOST_VERIFICATION_FAILED,
                "the node's handshake message does not authenticate: it does not hold the "
                "host key (or the message was altered)",
            )
        try:
            reply = r.load_json_object(payload, "handshake payload")
            padding = r.padding_field(reply)
        except ProtocolError as exc:
            self._die(MALFORMED_FRAME, exc.message)
        if reply.get("protocol") != r.PROTOCOL_ID:
            self._die(UNEXPECTED_FRAME, "the node speaks another protocol version")
        if reply.get("max_record") != r.MAX_BODY or reply.get("rekey_every") != r.REKEY_EVERY:
            self._die(UNEXPECTED_FRAME, "the node announced limits this client does not use")
        if padding != self.padding:
            self._die(UNEXPECTED_FRAME, "the node did not apply the padding that was asked for")
        self.handshake_hash = hs.handshake_hash
        self._send, self._recv = hs.transport(r.REKEY_EVERY)
        self._handshake = None
        self.state = "session"
        return [HandshakeComplete(self.padding, self.handshake_hash)]

    # ---------------------------------------------------------------- sending

    def _record(self, kind: int, obj: dict[str, Any]) -> bytes:
        if self._send is None or self.state in ("new", "handshake", "closed"):
            raise V2ClientError(SESSION_CLOSED, "the v2 connection is not open for records")
        with SecretBytes.take(r.encode_record(kind, r.dump_json(obj), self.padding)) as plain:
            return self._send.encrypt(plain.live_buffer())

    def session_terms_text(self, terms: SessionTerms) -> bytes:
        """The text a wallet must ``personal_sign`` for this connection."""
        from node.protocol.v2.session import signed_text

        if self.handshake_hash is None:
            raise RuntimeError("the handshake is not complete")
        return signed_text(self.handshake_hash, terms)

    def session(self, terms: SessionTerms, key: PrivateKey) -> bytes:
        """The session record, signed here with ``key``."""
        if self.handshake_hash is None:
            raise RuntimeError("the handshake is not complete")
        signature = sign_session(self.handshake_hash, terms, key)
        return self.signed_session(terms, address_of(key.public_key), signature)

    def signed_session(self, terms: SessionTerms, address: str, signature: bytes) -> bytes:
        """The session record with a signature made elsewhere (a browser wallet)."""
        if self.state != "session" or self.session_sent:
            raise RuntimeError("the session record is sent once, right after the handshake")
        frame = self._record(r.DATA, session_record_object(terms, address, signature))
        self.session_sent = True
        self._signed_as = address
        return frame

    def request(self, request_id: str, **fields: Any) -> bytes:
        """A ``request`` record: ``prompt`` or ``messages`` (list of {role, content}),
        and optionally ``model``, ``max_tokens``, ``temperature``, ``stop``, ``seed``."""
        if self.state != "ready":
            raise RuntimeError("send requests after the node accepted the session")
        if not 0 < len(request_id) <= r.MAX_REQUEST_ID:
            raise ValueError("request_id must have 1 to 256 characters")
        obj: dict[str, Any] = {"type": "request", "request_id": request_id}
        obj.update({k: v for k, v in fields.items() if v is not None})
        frame = self._record(r.DATA, obj)
        self.open_requests.add(request_id)
        return frame

    def cancel(self, request_id: str) -> bytes:
        return self._record(r.DATA, {"type": "cancel", "request_id": request_id})

    def ping(self) -> bytes:
        return self._record(r.DATA, {"type": "ping"})

    def close(self, reason: str = "client closed") -> bytes:
        """The authenticated CLOSE record; the connection is finished after it."""
        frame = self._record(r.CLOSE, {"reason": reason[: r.MAX_REASON]})
        self._finish()
        return frame

    # ---------------------------------------------------------------- receiving

    def receive(self, frame: bytes | bytearray) -> list[Event]:
        if self.state == "closed":
            raise V2ClientError(SESSION_CLOSED, "the v2 connection is closed")
        if self.state == "new":
            raise RuntimeError("call start() first")
        if len(frame) > r.MAX_FRAME:
            self._die(MALFORMED_FRAME, "the node sent a frame over the v2 limit")
        if self.state == "handshake":
            return self._on_handshake(frame)
        assert self._recv is not None
        try:
            plain = self._recv.decrypt(frame)
        except NodeError:
            self._die(AUTHENTICATION_FAILED, "a record from the node failed authentication")
        with SecretBytes.take(plain) as secret:
            try:
                kind, body = r.parse_record(secret.live_buffer(), self.padding)
            except ProtocolError as exc:
                self._die(MALFORMED_FRAME, exc.message)
        try:
            obj = r.load_json_object(body, "record")
        except ProtocolError as exc:
            self._die(MALFORMED_FRAME, exc.message)
        del body
        try:
            return [self._dispatch(kind, obj)]
        except V2ClientError:
            self._finish()  # every fatal problem wipes, wherever it was found
            raise

    def _dispatch(self, kind: int, obj: dict[str, Any]) -> Event:
        if kind == r.DATA:
            return self._on_data(obj)
        if kind == r.END:
            return self._on_end(obj)
        if kind == r.ERROR:
            return self._on_error(obj)
        if kind == r.CLOSE:
            reason = _str(obj, "reason", r.MAX_REASON)
            self.goodbye_received = True
            self._finish()
            return Closed(reason)
        self._die(UNEXPECTED_FRAME, f"unknown record type 0x{kind:02x}")

    def _on_data(self, obj: dict[str, Any]) -> Event:
        kind = obj.get("type")
        if kind == "session_ack" and self.state == "session" and self.session_sent:
            accepted = SessionAccepted(
                _str(obj, "session_id", 256),
                _str(obj, "client_address", 64),
                _str(obj, "model", 256),
            )
            if not constant_time_equal(
                accepted.client_address.lower().encode(), self._signed_as.lower().encode()
            ):
                self._die(UNEXPECTED_FRAME, "the node accepted the session for another address")
            self.state = "ready"
            return accepted
        if kind == "pong":
            return Pong()
        if kind == "chunk":
            request_id = _str(obj, "request_id", r.MAX_REQUEST_ID)
            if request_id not in self.open_requests:
                self._die(UNEXPECTED_FRAME, "a chunk for a request that is not open")
            return Chunk(request_id, _str(obj, "text"), _int(obj, "tokens"))
        self._die(UNEXPECTED_FRAME, "a DATA record this client does not expect here")

    def _on_end(self, obj: dict[str, Any]) -> Event:
        request_id = _str(obj, "request_id", r.MAX_REQUEST_ID)
        if request_id not in self.open_requests:
            self._die(UNEXPECTED_FRAME, "END for a request that is not open")
        reason = _str(obj, "finish_reason", 16)
        if reason not in r.FINISH_REASONS:
            self._die(MALFORMED_FRAME, "END has an unknown finish_reason")
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            self._die(MALFORMED_FRAME, "END needs a usage object")
        counts = Usage(
            _int(usage, "prompt_tokens"),
            _int(usage, "completion_tokens"),
            _int(usage, "total_tokens"),
        )
        self.open_requests.discard(request_id)
        return End(request_id, reason, counts)

    def _on_error(self, obj: dict[str, Any]) -> Event:
        request_id = obj.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            self._die(MALFORMED_FRAME, "ERROR request_id must be a string")
        if request_id is not None:
            self.open_requests.discard(request_id)
        return ErrorReceived(_str(obj, "code", 64), _str(obj, "message", 4096), request_id)

    # ---------------------------------------------------------------- lifetime

    def connection_lost(self) -> None:
        """The socket ended. Raises STREAM_TRUNCATED if an answer was still open and the
        node had not said goodbye; wipes every key either way."""
        open_before = bool(self.open_requests) and not self.goodbye_received
        self._finish()
        if open_before:
            raise V2ClientError(
                STREAM_TRUNCATED, "the connection ended before the answer's END record"
            )

    def _finish(self) -> None:
        self.wipe()
        self.state = "closed"

    def _die(self, code: str, message: str) -> NoReturn:
        self._finish()
        raise V2ClientError(code, message)

    def wipe(self) -> None:
        if self._handshake is not None:
            self._handshake.wipe()
            self._handshake = None
        for cipher in (self._send, self._recv):
            if cipher is not None:
                cipher.wipe()
