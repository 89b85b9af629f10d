"""The init replay cache shared by all connections of a node."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import attrs

from node.crypto.errors import ErrorCode

#: Entries a cache holds unless told otherwise (``--replay-cache-entries``).
DEFAULT_MAX_ENTRIES: Final = 1_000_000
#: Entries an encrypted init records: its digest and its session key's fingerprint.
ENTRIES_PER_INIT: Final = 2


def init_capacity(max_entries: int, window_s: float) -> float:
    """New encrypted inits per second, on average, that a cache of ``max_entries`` takes
    over a window of ``window_s`` before it is full (then inits get ``RATE_LIMITED``)."""
    return max_entries / ENTRIES_PER_INIT / window_s


@attrs.frozen(slots=True)
class Refusal:
    """Why :meth:`ReplayCache.add_all` recorded nothing.

    ``code`` is ``RATE_LIMITED`` when the cache has no room for every key, or
    ``REPLAY_DETECTED`` when a key is already recorded inside the window; then ``index``
    is the position of the first such key in the call's sequence.
    """

    code: ErrorCode
    index: int | None = None


NO_ROOM: Final = Refusal(ErrorCode.RATE_LIMITED)


class ReplayCache(Protocol):
    """What the state machine needs from an init replay cache."""

    def has_room(self) -> bool: ...

    def add(self, key: bytes) -> bool: ...

    def add_all(self, keys: Sequence[bytes]) -> Refusal | None:
        """Record every key or none of them, atomically; None when all were recorded.

        If any key is already recorded (or appears twice in ``keys``), nothing is
        recorded and that is the answer, full cache or not: a replay is called a replay.
        Otherwise there must be room for every key.
        """
        ...


class InitReplayCache:
    """Remembers (ephemeral key, nonce) pairs of accepted inits for ``window_s`` seconds.

    Memory is bounded by ``max_entries`` (32-byte digests). When the cache is full of
    entries that are all still inside the window, :meth:`has_room` is false and the node
    refuses new inits with ``RATE_LIMITED`` rather than forgetting a pair early, which
    would reopen a replay hole. Time comes from ``clock`` (injectable for tests).
    """

    def __init__(
        self, *, window_s: float, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float]
    ) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            _, at = next(iter(seen.items()))
            if now - at < self.window_s:
                break
            seen.popitem(last=False)

    @staticmethod
    def _digest(key: bytes) -> bytes:
        return hashlib.sha256(key).digest()

    def seen(self, key: bytes) -> bool:
        now = self._clock()
        self._expire(now)
        return self._digest(key) in self._seen

    def has_room(self) -> bool:
        self._expire(self._clock())
        return len(self._seen) < self.max_entries

    def add(self, key: bytes) -> bool:
        """Record ``key``; False when it was already there (a replay) or there is no room."""
        now = self._clock()
        self._expire(now)
        digest = self._digest(key)
        if digest in self._seen or len(self._seen) >= self.max_entries:
            return False
        self._seen[digest] = now
        return True

    def add_all(self, keys: Sequence[bytes]) -> Refusal | None:
        """Record every key or none; see :meth:`ReplayCache.add_all`."""
        now = self._clock()
        self._expire(now)
        seen = self._seen
        sha256 = hashlib.sha256
        digests = [sha256(key).digest() for key in keys]
        for i, digest in enumerate(digests):
            if digest in seen or (i and digest in digests[:i]):
                return Refusal(ErrorCode.REPLAY_DETECTED, i)
        if len(seen) + len(keys) > self.max_entries:
            return NO_ROOM
        for digest in digests:
            seen[digest] = now
        return None
