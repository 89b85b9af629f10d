"""Errors of the settlement layer (usage ledger and receipts)."""

from __future__ import annotations

from node.crypto.errors import ErrorCode, NodeError


class LedgerError(NodeError):
    """The ledger cannot be opened, read or written.

    Raised by :meth:`node.settlement.ledger.Ledger.open` at start-up (before the server
    listens) when the path is unusable, and by the write methods when the database fails
    later (disk full, file removed). The message names the path and the cause; it never
    contains prompts, completions or key material (the ledger holds none).
    """

    code = ErrorCode.INTERNAL_ERROR


class ReceiptError(NodeError):
    """A receipt object or row is malformed (fields inconsistent or of the wrong type)."""

    code = ErrorCode.INTERNAL_ERROR
