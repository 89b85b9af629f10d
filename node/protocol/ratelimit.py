"""Node-wide allowances for new sessions, keyed by address (sans-I/O).

A connection's own init allowance (burst, refill) resets when the client reconnects, so
by itself it bounds nothing. :class:`AddressRateLimiter` keeps one token bucket per key,
shared by every connection of the process: the node asks it for the client's network
address (``ip:...``, from the socket, or from ``X-Forwarded-For`` when the peer is a
trusted proxy) before it does any work on an init, and for the client's Ethereum address
(``client:0x...``) once the init's signature has been checked. Each new session, plaintext
or encrypted, and each re-init takes one token from each bucket it names.

Memory is bounded: at most ``max_keys`` buckets, the least recently used forgotten first
(a forgotten key starts again with a full burst, which only an attacker holding more than
``max_keys`` addresses can use, and then per-address limits are moot anyway).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class AddressRateLimiter:
    """Token buckets: ``burst`` tokens per key, refilled at ``refill_per_s``."""

    def __init__(
        self,
        *,
        burst: int,
        refill_per_s: float,
        clock: Callable[[], float],
        max_keys: int = 100_000,
    ) -> None:
        if burst < 1 or refill_per_s < 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be positive, refill_per_s not negative")
        self.burst = float(burst)
        self.refill_per_s = refill_per_s
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> bool:
        """Take one token for ``key``; False (and nothing taken) when it has none."""
        now = self._clock()
        buckets = self._buckets
        held = buckets.pop(key, None)
        if held is None:
            tokens = self.burst
        else:
            tokens, at = held
            tokens = min(self.burst, tokens + (now - at) * self.refill_per_s)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        buckets[key] = (tokens, now)
        if len(buckets) > self.max_keys:
            buckets.popitem(last=False)
        return ok
