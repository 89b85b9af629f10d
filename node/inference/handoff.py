"""A bounded, thread-safe hand-off of pieces from a worker thread to a Trio task.

A model that runs in a thread produces pieces faster or slower than the event loop takes
them. Handing each one over with ``trio.from_thread.run`` makes the thread wait for a
full round trip through the event loop on every token, while the loop may be busy
sealing and sending other frames. :class:`PieceHandoff` lets the thread append to a
buffer instead and go on at once; the Trio task drains the buffer and awaits ``emit``
for each piece (``emit``'s own back-pressure still applies). The thread blocks only when
``capacity`` pieces are waiting: that bounds memory and passes a slow client's
back-pressure on to the model.

The thread is woken (a put on a full buffer returns, or raises :class:`HandoffStopped`)
when the Trio side stops, and it checks :attr:`PieceHandoff.stopped` between units of
work, so a cancel of the Trio task stops the model within one unit. The Trio task never
returns before the thread has finished: the model is not left running unattended.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import outcome
import trio

from node.inference.base import Piece

T = TypeVar("T")

DEFAULT_CAPACITY = 64


class HandoffStopped(Exception):
    """Raised in the worker thread when the Trio side no longer takes pieces."""


class PieceHandoff(Generic[T]):
    """One worker thread's pieces, buffered for one Trio task (see the module docstring).

    Use :meth:`run` from the Trio task: it starts ``work(handoff)`` in a thread, awaits
    ``emit`` for every piece the thread :meth:`put`, and returns what ``work`` returned
    (or raises what it raised) once every piece before that has been emitted.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._items: deque[Piece] = deque()
        self._stopped = False
        self._result: outcome.Outcome[T] | None = None
        self._waiter: trio.Event | None = None  # set by the thread when it adds or ends
        self._token: trio.lowlevel.TrioToken | None = None

    # -------------------------------------------------------------- worker thread

    @property
    def stopped(self) -> bool:
        """True once the Trio side stopped taking pieces (the thread should end)."""
        return self._stopped

    def check_stop(self) -> None:
        """Between two units of work: raise :class:`HandoffStopped` if the Trio side
        stopped."""
        if self._stopped:
            raise HandoffStopped("the consumer stopped")

    def put(self, piece: Piece) -> None:
        """Queue a piece; blocks only while ``capacity`` pieces are already waiting."""
        with self._lock:
            while len(self._items) >= self.capacity and not self._stopped:
                self._blocked()
                self._room.wait()
            if self._stopped:
                raise HandoffStopped("the consumer stopped")
            self._items.append(piece)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter)

    def _blocked(self) -> None:
        """Called (holding the lock) just before the thread waits for room. A hook for
        tests; does nothing here."""

    def _wake(self, waiter: trio.Event) -> None:
        assert self._token is not None
        self._token.run_sync_soon(waiter.set)  # never blocks the thread

    def _finished(self, result: outcome.Outcome[T]) -> None:
        with self._lock:
            self._result = result
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter)

    # ------------------------------------------------------------------ Trio side

    def stop(self) -> None:
        """Tell the thread to stop; a put waiting for room raises at once."""
        with self._lock:
            self._stopped = True
            self._items.clear()
            self._room.notify_all()

    async def run(
        self, work: Callable[[PieceHandoff[T]], T], emit: Callable[[Piece], Awaitable[None]]
    ) -> T:
        """Run ``work(self)`` in a thread and emit its pieces; see the class docstring."""
        self._token = trio.lowlevel.current_trio_token()

        def in_thread() -> T:
            return work(self)

        trio.lowlevel.start_thread_soon(in_thread, self._finished)
        try:
            result = await self._drain(emit)
        except BaseException:
            # Cancelled, or emit failed: stop the thread and wait until it has ended.
            self.stop()
            with trio.CancelScope(shield=True):
                await self._until_finished()
            raise
        return result.unwrap()

    async def _drain(self, emit: Callable[[Piece], Awaitable[None]]) -> outcome.Outcome[T]:
        while True:
            with self._lock:
                batch = list(self._items)
                self._items.clear()
                if batch:
                    self._room.notify_all()
                result = self._result
                waiter = None
                if not batch and result is None:
                    waiter = self._waiter = trio.Event()
            for piece in batch:
                await emit(piece)
            if waiter is not None:
                await waiter.wait()
            elif not batch and result is not None:
                return result

    async def _until_finished(self) -> None:
        while True:
            with self._lock:
                if self._result is not None:
                    return
                waiter = self._waiter = trio.Event()
            await waiter.wait()


__all__ = ["DEFAULT_CAPACITY", "HandoffStopped", "PieceHandoff"]
