"""Inference backends: one interface, three implementations (llama, openai, echo)."""

from node.inference.base import (
    Backend,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Piece,
)
from node.inference.errors import (
    InferenceError,
    InferenceFailed,
    InvalidGenerationRequest,
    ModelNotFound,
    RateLimited,
    TokenLimitExceeded,
)
from node.inference.factory import BACKEND_KINDS, create_backend, parse_model_map

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InferenceFailed",
    "InvalidGenerationRequest",
    "ModelInfo",
    "ModelNotFound",
    "Piece",
    "RateLimited",
    "TokenLimitExceeded",
    "create_backend",
    "parse_model_map",
]
