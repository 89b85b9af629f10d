"""Text helpers: word pieces, stop sequences, UTF-8 reassembly."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from node.inference.text import StopSequenceFilter, Utf8Reassembler, split_word_pieces


def test_word_pieces_keep_the_whitespace_in_front() -> None:
    assert split_word_pieces("a b  c") == ["a", " b", "  c"]
    assert split_word_pieces(" lead\ttab\nnl ") == [" lead", "\ttab", "\nnl", " "]
    assert split_word_pieces("") == []
    assert split_word_pieces("   ") == ["   "]


@given(st.text())
def test_word_pieces_concatenate_to_the_input(text: str) -> None:
    pieces = split_word_pieces(text)
    assert "".join(pieces) == text
    assert all(piece for piece in pieces)
    # Every piece but a trailing whitespace-only one holds exactly one word.
    assert all(len(p.split()) == 1 for p in pieces if p.strip())


def test_stop_sequence_split_across_feeds() -> None:
    stops = StopSequenceFilter(("END",))
    out = [stops.feed("Hel"), stops.feed("lo E"), stops.feed("N"), stops.feed("D more")]
    assert "".join(out) == "Hello "
    assert out[1] == "lo "  # "E" is held back: it may start "END"
    assert stops.stopped
    assert stops.feed("after") == ""
    assert stops.flush() == ""


def test_stop_sequence_partial_match_is_released() -> None:
    stops = StopSequenceFilter(("END",))
    assert stops.feed("xE") == "x"
    assert stops.feed("x") == "Ex"
    assert stops.feed("EN") == ""
    assert stops.flush() == "EN"
    assert not stops.stopped


def test_earliest_of_several_stop_sequences_wins() -> None:
    stops = StopSequenceFilter(("bc", "abcd"))
    assert stops.feed("xxabcd") == "xx"  # "abcd" starts before "bc"
    assert stops.stopped


def test_no_stop_sequences_passes_everything() -> None:
    stops = StopSequenceFilter(())
    assert stops.feed("abc") == "abc"
    assert stops.flush() == ""


@given(st.text(), st.lists(st.integers(min_value=0, max_value=40), max_size=8))
def test_stop_filter_output_is_the_text_before_the_stop(text: str, cuts: list[int]) -> None:
    stop = "<|x|>"
    full = text + stop + "tail"
    stops = StopSequenceFilter((stop,))
    bounds = sorted({min(c, len(full)) for c in cuts} | {0, len(full)})
    out = "".join(stops.feed(full[a:b]) for a, b in itertools.pairwise(bounds))
    out += stops.flush()
    assert out == full[: full.find(stop)]


def test_utf8_characters_split_across_tokens_are_emitted_whole() -> None:
    data = "é🎉日".encode()
    decoder = Utf8Reassembler()
    outputs = [decoder.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(outputs) == "é🎉日"
    assert all(o in ("", "é", "🎉", "日") for o in outputs)
    assert decoder.flush() == ""


def test_utf8_incomplete_tail_is_dropped_and_invalid_bytes_replaced() -> None:
    decoder = Utf8Reassembler()
    assert decoder.feed(b"ok\xff") == "ok\ufffd"
    assert decoder.feed("🎉".encode()[:2]) == ""
    assert decoder.flush() == ""
    assert decoder.feed(b"a") == "a"
