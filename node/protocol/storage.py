"""Whether the node can write its files right now (sans-I/O, shared by all connections).

Two stores must take writes for the node to work as documented: the init replay cache
(``replay_cache``: an init that cannot be remembered cannot be accepted, whatever the
policy) and the usage ledger (``ledger``: usage that cannot be recorded cannot be
billed). Whoever writes a store reports each failure (:meth:`StorageHealth.failed`) and
each success (:meth:`StorageHealth.recovered`); ``/health``, ``/metrics`` and the
admission check read the result.

The ledger policy (``--on-ledger-failure``): ``serve`` keeps serving while ledger writes
fail (recording what it can; every failure is counted and logged); ``refuse`` answers new
sessions and new requests with ``STORAGE_UNAVAILABLE`` from the first failed write until
a write succeeds again (the node probes the ledger about once a second meanwhile).
"""

from __future__ import annotations

from collections import Counter
from typing import Final, Literal

from node.crypto.errors import StorageUnavailable

LEDGER: Final = "ledger"
REPLAY_CACHE: Final = "replay_cache"
STORES: Final = (LEDGER, REPLAY_CACHE)
LedgerPolicy = Literal["serve", "refuse"]
LEDGER_POLICIES: Final = ("serve", "refuse")


class StorageHealth:
    """Failure counts and the current state of each store; the admission rule."""

    def __init__(self, *, on_ledger_failure: LedgerPolicy = "serve") -> None:
        if on_ledger_failure not in LEDGER_POLICIES:
            raise ValueError(f"unknown ledger failure policy {on_ledger_failure!r}")
        self.on_ledger_failure: LedgerPolicy = on_ledger_failure
        self.failures: Counter[str] = Counter()
        self._failing: set[str] = set()

    def failed(self, store: str) -> None:
        self.failures[store] += 1
        self._failing.add(store)

    def recovered(self, store: str) -> None:
        self._failing.discard(store)

    def failing(self, store: str) -> bool:
        return store in self._failing

    @property
    def degraded(self) -> bool:
        return bool(self._failing)

    def state(self, store: str) -> str:
        """``ok`` or ``failing`` (what ``/health`` shows)."""
        return "failing" if store in self._failing else "ok"

    def admit(self) -> None:
        """Raise ``STORAGE_UNAVAILABLE`` when new work must be refused (policy refuse and
        the ledger failing); otherwise return."""
        if self.on_ledger_failure == "refuse" and LEDGER in self._failing:
            raise StorageUnavailable(
                "the node cannot record usage right now (its ledger refuses writes); "
                "no new sessions or requests until it can; retry later"
            )
