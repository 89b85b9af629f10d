"""Text helpers shared by the backends: word pieces, stop sequences, UTF-8 reassembly."""

from __future__ import annotations

import codecs
import re

_WORD_PIECE = re.compile(r"\s*\S+|\s+")


def split_word_pieces(text: str) -> list[str]:
    """Split ``text`` into pieces that each hold one word and the whitespace before it.

    Whitespace after the last word becomes a piece of its own, so ``"".join(pieces)`` is
    always exactly ``text``: ``"a b  c"`` -> ``["a", " b", "  c"]``.
    """
    return _WORD_PIECE.findall(text)


class Utf8Reassembler:
    """Turns token byte strings into text without ever splitting a UTF-8 sequence.

    A token may end in the middle of a multi-byte character; its bytes are held back until
    the rest arrives. Invalid bytes (a model can emit them) become U+FFFD.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: an incomplete character left over (the model was cut off in the
        middle of it) is dropped rather than emitted as a broken piece."""
        self._decoder.reset()
        return ""


class StopSequenceFilter:
    """Finds stop sequences in streamed text, holding back text that might start one.

    :meth:`feed` returns the text that is safe to emit and whether a stop sequence was hit;
    once it was, the text from the stop sequence on is dropped and the filter stays stopped.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stop:
            return text
        buffer = self._held + text
        first = min(
            (i for i in (buffer.find(s) for s in self._stop) if i >= 0),
            default=-1,
        )
        if first >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:first]
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back text at the end of the stream (it did not become a stop sequence)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, buffer: str) -> int:
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:n]):
                    best = n
                    break
        return best
