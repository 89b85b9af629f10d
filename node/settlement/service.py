"""The server's accounting seam: turns protocol sessions into ledger rows and receipts."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.inference.base import GenerationResult
from node.protocol.connection import Session
from node.protocol.messages import DEFAULT_CHAIN_ID
from node.protocol.storage import LEDGER, StorageHealth
from node.settlement.errors import LedgerError
from node.settlement.ledger import Ledger, default_ledger_path
from node.settlement.usage import MAX_TEXT, SessionIdentity, SessionUsage

log = logging.getLogger("node.settlement")

PROBE_INTERVAL_S = 1.0


def _text(value: str | None, fallback: str) -> str:
    text = value if value else fallback
    return text[:MAX_TEXT]


class LedgerAccounting:
    """Implements the server's ``Accounting`` protocol on a :class:`Ledger`.

    A failed ledger write is logged (with the session id, never content), counted in
    ``write_failures`` and reported to ``health`` (``/health``, ``/metrics``, and under
    ``--on-ledger-failure refuse`` the admission of new work); it does not break the
    client's connection. A successful write marks the ledger healthy again.

    What is recorded (the bound on what a client can make the node store and sign): a
    request that used no tokens at all (refused or cancelled before the backend read the
    prompt) writes no row, and a session that recorded no request ends without a receipt.
    So every row and every signed receipt stands for tokens the model processed, and the
    number of sessions is bounded by the init allowances.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        default_model: str = "default",
        health: StorageHealth | None = None,
    ) -> None:
        self.ledger = ledger
        self.default_model = default_model
        self.health = health if health is not None else StorageHealth()
        self.write_failures = 0
        self.receipts_skipped = 0
        self._usage: dict[int, SessionUsage] = {}

    def _failed(self) -> None:
        self.write_failures += 1
        self.health.failed(LEDGER)

    def _succeeded(self) -> None:
        self.health.recovered(LEDGER)

    def _identity(self, session: Session) -> SessionIdentity:
        return SessionIdentity(
            session_id=_text(session.session_id, "anonymous"),
            job_id=session.job_id,
            chain_id=session.chain_id or DEFAULT_CHAIN_ID,
            client_address=session.client_address if session.encrypted else None,
            model=_text(session.model_name, self.default_model),
            price_per_token=session.price_per_token if session.encrypted else 0,
            encrypted=session.encrypted,
            protocol=session.protocol,
        )

    async def session_started(self, session: Session) -> None:
        self._usage[id(session)] = self.ledger.start_session(self._identity(session))
        await trio.lowlevel.checkpoint()

    def _usage_for(self, session: Session) -> SessionUsage:
        usage = self._usage.get(id(session))
        if usage is None:  # pragma: no cover - sessions always start first
            usage = self.ledger.start_session(self._identity(session))
            self._usage[id(session)] = usage
        return usage

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        if result.prompt_tokens == 0 and result.completion_tokens == 0:
            await trio.lowlevel.checkpoint()
            return  # nothing was used: nothing to bill, nothing to store
        try:
            await self.ledger.record_request(
                self._usage_for(session),
                request_id=request_id,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                usage_estimated=result.usage_estimated,
            )
        except (LedgerError, ValueError, TypeError) as exc:
            self._failed()
            log.error(
                "ledger write failed",
                extra={"session": session.session_id, "error_type": type(exc).__name__},
            )
        else:
            self._succeeded()

    async def session_ended(self, session: Session, reason: str) -> None:
        usage = self._usage.pop(id(session), None)
        if usage is None:
            return
        if usage.ledger_uid is None and usage.request_count == 0:
            # Never ran a request (or none was recorded): no usage, no receipt. Signing
            # and storing one per init would let a client make the node write without
            # limit and without being served anything it pays for.
            self.receipts_skipped += 1
            await trio.lowlevel.checkpoint()
            return
        try:
            receipt = await self.ledger.close_session(usage, reason)
        except (LedgerError, ValueError, TypeError) as exc:
            self._failed()
            log.error(
                "receipt write failed",
                extra={"session": session.session_id, "error_type": type(exc).__name__},
            )
            return
        self._succeeded()
        log.info(
            "session settled",
            extra={
                "session": session.session_id,
                "receipt": receipt.receipt.sequence,
                "tokens": receipt.receipt.total_tokens,
            },
        )

    async def probe(self) -> bool:
        """One small write to the ledger (its ``last_probe_at``); True when it committed.
        Reports the outcome to ``health`` like any other write."""
        try:
            await self.ledger.probe()
        except LedgerError:
            self.health.failed(LEDGER)
            return False
        self._succeeded()
        return True

    async def watch(self, *, interval_s: float = PROBE_INTERVAL_S) -> None:
        """While the ledger is failing, probe it every ``interval_s`` so that a node that
        refuses new work (``--on-ledger-failure refuse``) notices when writes work again
        even though it is not writing anything else. Runs until cancelled."""
        while True:
            await trio.sleep(interval_s)
            if self.health.failing(LEDGER) and await self.probe():
                log.warning("ledger writes work again")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.ledger.close()


def ledger_path(config: NodeConfig) -> Path:
    return Path(config.ledger_path) if config.ledger_path else default_ledger_path()


async def open_accounting(
    config: NodeConfig, host_key: HostKey | None, health: StorageHealth | None = None
) -> LedgerAccounting:
    """Open the ledger named by the config (or the default path); raises LedgerError."""
    path = ledger_path(config)
    ledger = Ledger.open(path, host_key=host_key, recover=config.ledger_recover)
    if ledger.recovered:
        log.warning(
            "wrote receipts for sessions a previous run left open",
            extra={"count": len(ledger.recovered)},
        )
    log.info("ledger opened", extra={"path": str(path)})
    await trio.lowlevel.checkpoint()
    return LedgerAccounting(ledger, health=health)
