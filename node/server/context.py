"""What all connections of one node process share, passed in (no global state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from node.config import NodeConfig
from node.crypto.hostkey import HostKey
from node.inference.base import Backend, GenerationResult
from node.protocol.connection import ProtocolConfig, Session, SessionMemory
from node.protocol.ratelimit import AddressRateLimiter
from node.protocol.replay import ReplayCache
from node.protocol.storage import StorageHealth
from node.server.ephemeral import EphemeralKeys
from node.server.metrics import NodeMetrics

if TYPE_CHECKING:
    from node.server.driver import StreamingDriver


class Accounting(Protocol):
    """Where usage goes (the settlement ledger implements this)."""

    async def session_started(self, session: Session) -> None: ...

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None: ...

    async def session_ended(self, session: Session, reason: str) -> None: ...


class NoAccounting:
    """Accounting that records nothing (unit tests and benchmarks)."""

    async def session_started(self, session: Session) -> None:
        await trio.lowlevel.checkpoint()

    async def request_finished(
        self, session: Session, request_id: str | int | None, result: GenerationResult
    ) -> None:
        await trio.lowlevel.checkpoint()

    async def session_ended(self, session: Session, reason: str) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class NodeContext:
    config: NodeConfig
    host_key: HostKey | None
    backend: Backend
    replay_cache: ReplayCache
    metrics: NodeMetrics = attrs.field(factory=NodeMetrics)
    accounting: Accounting = attrs.field(factory=NoAccounting)
    clock: Callable[[], float] = trio.current_time
    rng: Callable[[int], bytes] | None = None
    # pre-generated v2 ephemeral keys; NodeServer.serve creates and runs it when v2 is on
    ephemeral_keys: EphemeralKeys | None = None
    drivers: set[StreamingDriver] = attrs.field(factory=set)
    shutting_down: bool = False
    backend_loading: bool = False  # the startup load of the backend is running
    backend_loaded: bool = False  # the backend said ready once (then /ready is 200)
    all_closed: trio.Event = attrs.field(factory=trio.Event)
    next_connection_id: int = 1
    # Session data held by all connections together (--max-session-bytes).
    session_memory: SessionMemory = attrs.field(
        default=attrs.Factory(
            lambda self: SessionMemory(self.config.max_session_bytes), takes_self=True
        )
    )
    storage: StorageHealth = attrs.field(
        default=attrs.Factory(
            lambda self: StorageHealth(on_ledger_failure=self.config.on_ledger_failure),
            takes_self=True,
        )
    )
    address_limiter: AddressRateLimiter | None = None

    def __attrs_post_init__(self) -> None:
        c = self.config
        if self.address_limiter is None and c.address_init_burst > 0:
            self.address_limiter = AddressRateLimiter(
                burst=c.address_init_burst, refill_per_s=c.address_init_rate, clock=self.clock
            )

    def protocols(self) -> tuple[str, ...]:
        """The WebSocket protocols served: ``--protocols``, less v2 on a node without a
        host key (v2 authenticates the node by it)."""
        return tuple(p for p in self.config.protocols if p != "v2" or self.host_key is not None)

    def protocol_config(self) -> ProtocolConfig:
        c = self.config
        return ProtocolConfig(
            require_encryption=c.require_encryption,
            session_ttl_s=c.session_ttl_s,
            max_errors=c.max_errors,
            allowed_clients=c.allowed_clients,
            allow_plaintext_with_allowlist=c.allow_plaintext_with_allowlist,
            max_sessions=c.max_sessions,
            init_burst=c.init_burst,
            init_refill_per_s=c.init_refill_per_s,
        )

    def live_states(self) -> list[tuple[str, int, int, int, int]]:
        """Per open connection: (protocol, keys, key bytes, encrypted, plaintext sessions)."""
        return [d.live_state() for d in self.drivers]
