"""The model thread's hand-off: buffered, bounded, stoppable (fake model threads).

Every wait across the thread boundary goes through a threading.Event or a trio.Event and
is guarded by ``trio.fail_after``; nothing depends on timing.
"""

from __future__ import annotations

import threading

import pytest
import trio

from node.inference.base import Piece
from node.inference.handoff import HandoffStopped, PieceHandoff

GUARD_S = 30.0


class WatchedHandoff(PieceHandoff[str]):
    """Records when the producer thread has to wait for room."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.waiting = threading.Event()
        self.waits = 0

    def _blocked(self) -> None:
        self.waits += 1
        self.waiting.set()


async def thread_wait(event: threading.Event) -> None:
    await trio.to_thread.run_sync(event.wait, abandon_on_cancel=True)


async def test_the_thread_does_not_wait_for_the_event_loop_per_piece() -> None:
    """Five pieces are put and the thread finishes while the first emit is still pending:
    with a blocking per-piece hand-off this would deadlock (and hit the guard)."""
    all_put = threading.Event()
    got: list[str] = []

    def model(h: PieceHandoff[str]) -> str:
        for i in range(5):
            h.put(Piece(str(i), 1))
        all_put.set()
        return "done"

    async def emit(piece: Piece) -> None:
        if not got:
            await thread_wait(all_put)
        got.append(piece.text)

    handoff = WatchedHandoff(capacity=8)
    with trio.fail_after(GUARD_S):
        result = await handoff.run(model, emit)
    assert result == "done"
    assert got == ["0", "1", "2", "3", "4"]
    assert handoff.waits == 0


async def test_a_full_buffer_makes_the_thread_wait_then_resume() -> None:
    capacity = 2
    put_count = 0
    first_emitted = threading.Event()
    release = trio.Event()
    got: list[str] = []

    def model(h: PieceHandoff[str]) -> str:
        nonlocal put_count
        h.put(Piece("0", 1))
        put_count = 1
        first_emitted.wait()  # the consumer now holds piece 0 and is stuck emitting it
        for i in range(1, 10):
            h.put(Piece(str(i), 1))
            put_count += 1
        return "end"

    async def emit(piece: Piece) -> None:
        got.append(piece.text)
        if len(got) == 1:
            first_emitted.set()
            await release.wait()  # a slow client: the first emit does not return yet

    handoff = WatchedHandoff(capacity)
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            assert await handoff.run(model, emit) == "end"

        nursery.start_soon(run)
        with trio.fail_after(GUARD_S):
            await thread_wait(handoff.waiting)
        # Pieces 1 and 2 fill the buffer; the thread waits to put piece 3.
        assert got == ["0"]
        assert put_count == 1 + capacity
        assert handoff.waits == 1
        release.set()
    assert got == [str(i) for i in range(10)]
    assert put_count == 10


async def test_cancel_stops_a_thread_that_waits_for_room() -> None:
    finished = threading.Event()
    stopped_with: list[BaseException] = []

    def model(h: PieceHandoff[str]) -> str:
        try:
            while True:
                h.put(Piece("x", 1))
        except HandoffStopped as exc:
            stopped_with.append(exc)
            raise
        finally:
            finished.set()

    async def emit(piece: Piece) -> None:
        await trio.sleep_forever()

    handoff = WatchedHandoff(capacity=1)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await handoff.run(model, emit)

            nursery.start_soon(run)
            await thread_wait(handoff.waiting)
            nursery.cancel_scope.cancel()
    # run() returned only after the thread had ended.
    assert finished.is_set()
    assert len(stopped_with) == 1
    assert handoff.stopped


async def test_cancel_is_seen_by_a_thread_between_units_of_work() -> None:
    entered = threading.Event()
    units = 0

    def model(h: PieceHandoff[str]) -> str:
        nonlocal units
        entered.set()
        while True:
            h.check_stop()
            units += 1
            if units > 10_000_000:  # pragma: no cover - a stop that never came
                return "runaway"

    async def emit(piece: Piece) -> None:
        raise AssertionError("no pieces expected")  # pragma: no cover

    with trio.fail_after(GUARD_S):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    await PieceHandoff[str]().run(model, emit)

                nursery.start_soon(run)
                await thread_wait(entered)
                scope.cancel()
    assert scope.cancelled_caught
    assert units < 10_000_000


async def test_pieces_before_a_failure_are_delivered_then_it_is_raised() -> None:
    def model(h: PieceHandoff[str]) -> str:
        h.put(Piece("a", 1))
        h.put(Piece("b", 2))
        raise RuntimeError("model broke")

    got: list[tuple[str, int]] = []

    async def emit(piece: Piece) -> None:
        got.append((piece.text, piece.tokens))

    with trio.fail_after(GUARD_S), pytest.raises(RuntimeError, match="model broke"):
        await PieceHandoff[str]().run(model, emit)
    assert got == [("a", 1), ("b", 2)]


async def test_a_failing_emit_stops_the_thread_and_is_raised() -> None:
    finished = threading.Event()

    def model(h: PieceHandoff[str]) -> str:
        try:
            while True:
                h.put(Piece("x", 1))
        finally:
            finished.set()

    async def emit(piece: Piece) -> None:
        raise trio.BrokenResourceError("the client went away")

    with trio.fail_after(GUARD_S), pytest.raises(trio.BrokenResourceError):
        await WatchedHandoff(capacity=4).run(model, emit)
    assert finished.is_set()


async def test_empty_run_returns_the_result() -> None:
    async def emit(piece: Piece) -> None:
        raise AssertionError("no pieces expected")  # pragma: no cover

    with trio.fail_after(GUARD_S):
        assert await PieceHandoff[str]().run(lambda h: "nothing", emit) == "nothing"


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PieceHandoff[str](0)
