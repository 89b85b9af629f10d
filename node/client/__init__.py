"""Trio client for the node's WebSocket protocol: the library behind ``llm-node chat``.

async with open_session("http://127.0.0.1:8080", model="echo", job_id=1) as session:
    async for piece in session.stream("hello"):
        print(piece, end="")

``open_session`` speaks protocol v2 when the node offers it (``protocol="auto"``), v1
otherwise (with a logged warning); ``protocol="v1"`` or ``"v2"`` pins one. Both give the
same ``ClientSession`` / ``ResponseStream`` / ``Completion`` interface.
"""

from node.client.discovery import (
    HostIdentity,
    discover_host_key,
    fetch_host_key,
    fetch_models,
    fetch_protocols,
    http_base_url,
    identity_from_public_key,
    websocket_url,
)
from node.client.errors import (
    ChunkAuthenticationFailed,
    ChunkOutOfOrder,
    ClientError,
    ConnectFailed,
    DowngradeRefused,
    ForeignFrame,
    HostKeyMismatch,
    HostVerificationFailed,
    InvalidFinishReason,
    MalformedFrame,
    NodeErrorResponse,
    ProtocolViolation,
    SessionBusy,
    SessionClosed,
    StreamTimeout,
    StreamTruncated,
    UnexpectedFrame,
)
from node.client.frames import parse_server_frame
from node.client.receiver import EncryptedResponseReader, PlaintextResponseReader
from node.client.session import (
    ClientSession,
    Completion,
    ResponseStream,
    open_session,
    random_client_key,
)

__all__ = [
    "ChunkAuthenticationFailed",
    "ChunkOutOfOrder",
    "ClientError",
    "ClientSession",
    "Completion",
    "ConnectFailed",
    "DowngradeRefused",
    "EncryptedResponseReader",
    "ForeignFrame",
    "HostIdentity",
    "HostKeyMismatch",
    "HostVerificationFailed",
    "InvalidFinishReason",
    "MalformedFrame",
    "NodeErrorResponse",
    "PlaintextResponseReader",
    "ProtocolViolation",
    "ResponseStream",
    "SessionBusy",
    "SessionClosed",
    "StreamTimeout",
    "StreamTruncated",
    "UnexpectedFrame",
    "discover_host_key",
    "fetch_host_key",
    "fetch_models",
    "fetch_protocols",
    "http_base_url",
    "identity_from_public_key",
    "open_session",
    "parse_server_frame",
    "random_client_key",
    "websocket_url",
]
