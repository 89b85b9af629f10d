"""End-to-end encrypted LLM host node (SDK-compatible WebSocket protocol on Trio)."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
