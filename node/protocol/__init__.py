"""Sans-I/O protocol core: messages, validation and the per-connection state machine.

Nothing here imports Trio or touches a socket (a test enforces it).
"""

from node.protocol.connection import (
    Action,
    CancelRequest,
    Close,
    ConnectionState,
    HoldTimer,
    PlaintextDeprecated,
    ProtocolConfig,
    Send,
    Session,
    SessionEnded,
    SessionStarted,
    StartRequest,
)
from node.protocol.errors import ProtocolError
from node.protocol.messages import decode, encode
from node.protocol.replay import InitReplayCache
from node.protocol.requests import InferenceRequest

__all__ = [
    "Action",
    "CancelRequest",
    "Close",
    "ConnectionState",
    "HoldTimer",
    "InferenceRequest",
    "InitReplayCache",
    "PlaintextDeprecated",
    "ProtocolConfig",
    "ProtocolError",
    "Send",
    "Session",
    "SessionEnded",
    "SessionStarted",
    "StartRequest",
    "decode",
    "encode",
]
