"""Per-session usage accounting: who the session is, and what it has used so far.

The server builds one :class:`SessionIdentity` when a session is initialised (encrypted
or plaintext), asks the ledger for a :class:`SessionUsage` accumulator, and the ledger
adds each completed request's exact token counts to it after committing them.

Timestamps in the ledger and in receipts are ISO-8601 UTC strings with millisecond
precision and a ``Z`` suffix, e.g. ``2025-06-01T12:00:00.123Z`` (see
:func:`format_timestamp`): readable in ``receipts list`` and sortable as text.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from node.settlement.receipt import SignedReceipt

#: Token counts are stored as SQLite INTEGERs (signed 64-bit); this bound keeps every
#: sum of them far inside that range.
MAX_TOKENS = 2**48
#: Prices and job ids are uint256 on chain.
MAX_UINT256 = 2**256 - 1
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
MAX_TEXT = 256


class EndReason(enum.StrEnum):
    """Why a session ended; the server passes one of these (any short string works)."""

    DISCONNECT = "disconnect"
    REINIT = "reinit"
    IDLE_TIMEOUT = "idle_timeout"
    TTL_EXPIRED = "ttl_expired"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    #: Written by the ledger itself at start-up for sessions a crashed process left open.
    RECOVERED = "recovered_after_restart"


def format_timestamp(unix_seconds: float) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2025-06-01T12:00:00.123Z``."""
    moment = _dt.datetime.fromtimestamp(unix_seconds, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_text(name: str, value: object, *, limit: int = MAX_TEXT) -> str:
    """A non-empty string that encodes as UTF-8 (no lone surrogates), at most ``limit``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode text") from None
    return value


def check_uint(name: str, value: object, *, limit: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int")
    assert isinstance(value, int)
    if not 0 <= value <= limit:
        raise ValueError(f"{name} must be in [0, {limit}]")
    return value


def _text(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    check_text(attribute.name, value)


def _optional_address(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _ADDRESS_RE.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 0x followed by 40 hex digits, or None")


def _uint256(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    check_uint(attribute.name, value, limit=MAX_UINT256)


def _optional_uint256(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_uint(attribute.name, value, limit=MAX_UINT256)


def _chain_id(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    check_uint(attribute.name, value, limit=2**63 - 1)


#: The wire protocols a session can come over (receipts of v2 sessions say so).
PROTOCOLS = ("v1", "v2")


def _protocol(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in PROTOCOLS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(PROTOCOLS)}")


def _bool(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be a bool")


@attrs.frozen(kw_only=True)
class SessionIdentity:
    """Who is being served, and at what price; fixed for the life of one session.

    ``client_address`` is the EIP-55 address recovered from an encrypted init, and
    ``price_per_token`` the price from its decrypted payload. A plaintext session has no
    authenticated client, so it has ``client_address=None`` and ``price_per_token=0``.
    """

    session_id: str = attrs.field(validator=_text)
    job_id: int | None = attrs.field(validator=_optional_uint256)
    chain_id: int = attrs.field(validator=_chain_id)
    client_address: str | None = attrs.field(validator=_optional_address)
    model: str = attrs.field(validator=_text)
    price_per_token: int = attrs.field(validator=_uint256)
    encrypted: bool = attrs.field(validator=_bool)
    protocol: str = attrs.field(default="v1", validator=_protocol)

    def __attrs_post_init__(self) -> None:
        if self.protocol != "v1" and not self.encrypted:
            raise ValueError("only protocol v1 has plaintext sessions")
        if self.encrypted and self.client_address is None:
            raise ValueError("an encrypted session needs the client address from its init")
        if not self.encrypted and self.client_address is not None:
            raise ValueError("a plaintext session has no authenticated client address")
        if not self.encrypted and self.price_per_token != 0:
            raise ValueError("a plaintext session has no signed price; price_per_token is 0")


@attrs.frozen(kw_only=True)
class RequestUsage:
    """One completed request as the ledger records it (backend's exact counts).

    ``usage_estimated`` is True when the backend could not report counts and the server
    estimated them; it is kept so that such rows can be found and audited.
    """

    request_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    usage_estimated: bool
    created_at: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.define(kw_only=True)
class SessionUsage:
    """Running totals of one session; the ledger updates it after each commit.

    The server keeps one per live session and hands it back to
    :meth:`~node.settlement.ledger.Ledger.record_request` and
    :meth:`~node.settlement.ledger.Ledger.close_session`. ``ledger_uid`` is the ledger's
    own key for the session (client session ids may repeat across connections); it is
    assigned when the first row for the session is written.
    """

    identity: SessionIdentity
    started_at: str
    ledger_uid: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_count: int = 0
    receipt: SignedReceipt | None = None  # set once the session is closed

    @property
    def closed(self) -> bool:
        return self.receipt is not None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def amount(self) -> int:
        """What the session owes so far: total tokens times the price (exact int)."""
        return self.total_tokens * self.identity.price_per_token

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        check_uint("prompt_tokens", prompt_tokens, limit=MAX_TOKENS)
        check_uint("completion_tokens", completion_tokens, limit=MAX_TOKENS)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.request_count += 1
