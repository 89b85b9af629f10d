"""The node's stock of pre-generated v2 ephemeral keys, refilled in a worker thread.

A v2 handshake costs the node one scalar multiplication for its ephemeral key. With
:class:`EphemeralKeys` running, each new ``/v2/ws`` connection takes a key that was made
earlier, off the event loop, and the handshake only does its two ECDH. A key is handed
out once (the pool removes it) and wiped by the connection that used it; when the stock
is empty the handshake makes its own key inline, so a burst never waits for the refill.
The stock is wiped when :meth:`EphemeralKeys.run` ends (node shutdown).
"""

from __future__ import annotations

from typing import Final

import trio

from node.crypto.noise import EphemeralPool, KeyPair, Rng

DEFAULT_POOL_SIZE: Final = 64
# refill once the stock is down to this many keys (a quarter of the pool)
LOW_WATER_FRACTION: Final = 4


class EphemeralKeys:
    """An :class:`EphemeralPool` plus the task that keeps it topped up."""

    def __init__(self, size: int = DEFAULT_POOL_SIZE, *, rng: Rng | None = None) -> None:
        self.pool = EphemeralPool(size) if rng is None else EphemeralPool(size, rng=rng)
        self.low_water = size // LOW_WATER_FRACTION
        self.taken = 0  # handshakes that got a pooled key
        self.inline = 0  # handshakes that found the pool empty
        self._wanted = trio.Event()
        self.refilled = trio.Event()  # set after each refill (then replaced by a new one)

    def take(self) -> KeyPair | None:
        """A pooled key for one connection (None: the handshake generates its own)."""
        key = self.pool.take()
        if key is None:
            self.inline += 1
        else:
            self.taken += 1
        if len(self.pool) <= self.low_water:
            self._wanted.set()
        return key

    async def run(self) -> None:
        """Fill the pool now and whenever it runs low, until cancelled; then wipe it."""
        try:
            while not self.pool.closed:
                if self.pool.missing:
                    # libsecp256k1 runs without the GIL: the loop keeps serving meanwhile.
                    await trio.to_thread.run_sync(self.pool.fill)
                    self.refilled.set()
                    self.refilled = trio.Event()
                await self._wanted.wait()
                self._wanted = trio.Event()
        finally:
            self.pool.wipe()

    def wipe(self) -> None:
        self.pool.wipe()
