"""Trio server: one listener for HTTP routes and /v1/ws, the per-connection driver."""
