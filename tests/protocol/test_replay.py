"""InitReplayCache: a bounded, clock-driven memory of accepted (ephemeral key, nonce) pairs."""

from __future__ import annotations

import pytest

from node.crypto.errors import ErrorCode
from node.protocol import InitReplayCache
from node.protocol.replay import Refusal
from tests.protocol._support import Clock


def make(window: float = 60.0, max_entries: int = 100) -> tuple[InitReplayCache, Clock]:
    clock = Clock(0.0)
    return InitReplayCache(window_s=window, max_entries=max_entries, clock=clock), clock


def test_replay_within_window_is_refused() -> None:
    cache, clock = make()
    assert not cache.seen(b"k1")
    assert cache.add(b"k1")
    assert cache.seen(b"k1")
    clock.advance(59.999)
    assert cache.seen(b"k1")
    assert not cache.add(b"k1")
    assert cache.add(b"k2")  # another key is unaffected
    assert len(cache) == 2


def test_accepted_again_after_the_window() -> None:
    cache, clock = make()
    cache.add(b"k1")
    clock.advance(60.0)
    assert not cache.seen(b"k1")
    assert cache.add(b"k1")
    clock.advance(30.0)
    assert not cache.add(b"k1")  # the window restarts at the new acceptance


def test_memory_is_bounded_and_full_cache_has_no_room() -> None:
    cache, clock = make(window=60.0, max_entries=3)
    for i in range(3):
        assert cache.has_room()
        assert cache.add(b"key%d" % i)
        clock.advance(1.0)
    assert len(cache) == 3
    assert not cache.has_room()
    assert not cache.add(b"fresh")  # refused rather than forgetting an unexpired pair
    assert cache.seen(b"key0")  # nothing was evicted early
    assert len(cache) == 3


def test_expiry_frees_room_oldest_first() -> None:
    cache, clock = make(window=10.0, max_entries=2)
    cache.add(b"a")
    clock.advance(5.0)
    cache.add(b"b")
    assert not cache.has_room()
    clock.advance(5.0)  # "a" is now 10 s old: expired; "b" is 5 s old
    assert cache.has_room()
    assert len(cache) == 1
    assert not cache.seen(b"a")
    assert cache.seen(b"b")
    assert cache.add(b"c")
    assert not cache.has_room()


def test_stores_digests_not_the_keys() -> None:
    cache, _ = make()
    cache.add(b"x" * 1000)
    assert all(len(d) == 32 for d in cache._seen)


@pytest.mark.parametrize(("window", "entries"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_parameters_must_be_positive(window: float, entries: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        InitReplayCache(window_s=window, max_entries=entries, clock=Clock())


# ------------------------------------------------------- add_all: every key or none


def test_add_all_records_every_key_together() -> None:
    cache, clock = make()
    assert cache.add_all((b"init", b"key")) is None
    assert cache.seen(b"init")
    assert cache.seen(b"key")
    assert len(cache) == 2
    clock.advance(60.0)  # both expire with the window
    assert cache.add_all((b"init", b"key")) is None


@pytest.mark.parametrize("present", [0, 1])
def test_add_all_records_nothing_when_one_key_is_present(present: int) -> None:
    cache, _ = make()
    keys = (b"init", b"key")
    assert cache.add(keys[present])
    refusal = cache.add_all(keys)
    assert refusal == Refusal(ErrorCode.REPLAY_DETECTED, present)
    assert not cache.seen(keys[1 - present])  # the other key was not recorded
    assert len(cache) == 1


def test_add_all_refuses_a_key_given_twice() -> None:
    cache, _ = make()
    assert cache.add_all((b"same", b"same")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
    assert len(cache) == 0


def test_add_all_needs_room_for_every_key() -> None:
    cache, clock = make(window=10.0, max_entries=3)
    assert cache.add(b"a")
    assert cache.add(b"b")
    assert cache.has_room()  # room for one entry, not for two
    assert cache.add_all((b"c", b"d")) == Refusal(ErrorCode.RATE_LIMITED)
    # a replay is called a replay, full or not (and records nothing)
    assert cache.add_all((b"a", b"c")) == Refusal(ErrorCode.REPLAY_DETECTED, 0)
    assert cache.add_all((b"c", b"b")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
    assert cache.add_all((b"c", b"c")) == Refusal(ErrorCode.REPLAY_DETECTED, 1)
    assert len(cache) == 2
    assert not cache.seen(b"c")
    clock.advance(10.0)
    assert cache.add_all((b"c", b"d")) is None
