"""Usage accounting, signed usage receipts and the SQLite ledger.

The server's whole use of this package (see :class:`~node.settlement.ledger.Ledger`)::

    ledger = Ledger.open(path, host_key=host_key)        # before listening; LedgerError
    usage = ledger.start_session(SessionIdentity(...))   # after each successful init
    await ledger.record_request(usage, request_id=..., prompt_tokens=...,
                                completion_tokens=..., finish_reason=...)  # before stream_end
    await ledger.close_session(usage, EndReason.DISCONNECT)               # in finally
    ledger.close()                                       # after all connections ended
"""

from node.settlement.errors import LedgerError, ReceiptError
from node.settlement.ledger import Ledger, LedgerStore, StoredReceipt, default_ledger_path
from node.settlement.receipt import (
    RECEIPT_VERSION,
    Receipt,
    SignedReceipt,
    Verification,
    VerificationStatus,
    canonical_json,
    recover_signer,
    sign_receipt,
    verify_receipt,
)
from node.settlement.submitter import (
    RecordOnlySubmitter,
    SettlementSubmitter,
    SubmissionResult,
    SubmissionStatus,
    submit_pending,
)
from node.settlement.usage import (
    EndReason,
    RequestUsage,
    SessionIdentity,
    SessionUsage,
    format_timestamp,
)

__all__ = [
    "RECEIPT_VERSION",
    "EndReason",
    "Ledger",
    "LedgerError",
    "LedgerStore",
    "Receipt",
    "ReceiptError",
    "RecordOnlySubmitter",
    "RequestUsage",
    "SessionIdentity",
    "SessionUsage",
    "SettlementSubmitter",
    "SignedReceipt",
    "StoredReceipt",
    "SubmissionResult",
    "SubmissionStatus",
    "Verification",
    "VerificationStatus",
    "canonical_json",
    "default_ledger_path",
    "format_timestamp",
    "recover_signer",
    "sign_receipt",
    "submit_pending",
    "verify_receipt",
]
