"""Protocol v2 (docs/PROTOCOL_V2.md): Noise NK over secp256k1, sans-I/O.

``ServerConnectionV2`` is the node's side, ``ClientConnectionV2`` the client's. Nothing
here imports Trio or touches a socket.
"""

from node.protocol.v2.client import (
    Chunk,
    ClientConnectionV2,
    Closed,
    End,
    ErrorReceived,
    Event,
    HandshakeComplete,
    Pong,
    SessionAccepted,
    Usage,
    V2ClientError,
)
from node.protocol.v2.records import (
    HANDSHAKE_FAILED_REASON,
    HANDSHAKE_TIMEOUT_S,
    MAX_BODY,
    MAX_FRAME,
    PADDING_CHOICES,
    PROLOGUE,
    PROTOCOL_NAME,
    REKEY_EVERY,
)
from node.protocol.v2.server import (
    Action,
    ActiveRequestV2,
    Send,
    ServerConnectionV2,
    V2Config,
)
from node.protocol.v2.session import SessionTerms, signed_text

__all__ = [
    "HANDSHAKE_FAILED_REASON",
    "HANDSHAKE_TIMEOUT_S",
    "MAX_BODY",
    "MAX_FRAME",
    "PADDING_CHOICES",
    "PROLOGUE",
    "PROTOCOL_NAME",
    "REKEY_EVERY",
    "Action",
    "ActiveRequestV2",
    "Chunk",
    "ClientConnectionV2",
    "Closed",
    "End",
    "ErrorReceived",
    "Event",
    "HandshakeComplete",
    "Pong",
    "Send",
    "ServerConnectionV2",
    "SessionAccepted",
    "SessionTerms",
    "Usage",
    "V2ClientError",
    "V2Config",
    "signed_text",
]
