"""Hex decoding with wire error codes (PROTOCOL.md section 2)."""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable
from typing import Any

from node.crypto.errors import InvalidHexEncoding

_HEX_CHARS = frozenset("0123456789abcdefABCDEF")


def decode_hex(text: str, field: str) -> bytes:
    """Decode hex with an optional ``0x``/``0X`` prefix, either case.

    Odd length or a non-hex character raises :class:`InvalidHexEncoding` naming the
    field but never echoing the value.
    """
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) % 2:
        raise InvalidHexEncoding(f"{field}: hex string has an odd number of digits")
    try:
        # binascii.unhexlify accepts exactly the hex digits (no whitespace, unlike
        # bytes.fromhex, and no non-ASCII text): one pass in C, no separate check.
        return binascii.unhexlify(body)
    except ValueError:
        raise InvalidHexEncoding(f"{field}: not a hex string") from None


def decode_hex_into_bytearray(text: str, field: str) -> bytearray:
    """Like :func:`decode_hex` but returns a mutable buffer (for secrets to be wiped)."""
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) % 2:
        raise InvalidHexEncoding(f"{field}: hex string has an odd number of digits")
    if not _HEX_CHARS.issuperset(body):
        raise InvalidHexEncoding(f"{field}: not a hex string")
    return bytearray.fromhex(body)


def encode_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex without prefix, as the node writes it."""
    return binascii.hexlify(data).decode("ascii")


# ----------------------------------------------------------------- bounded JSON

MAX_JSON_DEPTH = 64
# A JSON string, possibly unterminated. Once it has seen its opening quote this pattern
# cannot fail: it ends at the closing quote or, for an unterminated string, at the end of
# the text (a trailing lone backslash included), and its quantifiers are possessive. So a
# substitution with it reads every character once; the old ``"(?:[^"\\]|\\.)*"`` failed
# on each quote of ``"\\"\\"\\...`` after running to the end, and was tried again from the
# next quote: quadratic.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_SQUARE = str.maketrans("{}", "[]")
_RUN = re.compile(r"\[++|\]++")
_PAIR_PASSES = 8


def too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text nests arrays/objects deeper than ``limit`` (or is unbalanced).

    The C JSON parser recurses once per level; a 1 MiB frame of ``[`` could exhaust the C
    stack when the interpreter's recursion limit has been raised (a segfault seen here),
    so deep input is refused before parsing.

    Linear in ``len(text)``, every step at C speed but the last: two counts answer text
    with at most ``limit`` brackets. Otherwise strings are cut out and everything but
    brackets dropped (one pass each, see ``_JSON_STRING``), leaving a bracket string B
    whose running depth is the JSON's. Removing every adjacent ``[]`` pair from B leaves
    the running depth at every other position as it was and lowers the maximum by
    exactly one (each deepest point sat inside such a pair), so after at most
    ``_PAIR_PASSES`` such passes what is left is read run by run (a run of openers or of
    closers at a time) for its maximum, minimum and final depth. Every nest still left
    is deeper than the passes made, so it spans more than ``2 * _PAIR_PASSES``
    brackets: the runs read are fewer than ``len(B) / _PAIR_PASSES``.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).translate(_SQUARE)
    removed = 0  # levels removed from every nest so far
    while removed < min(_PAIR_PASSES, limit):
        shorter = brackets.replace("[]", "")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
        removed += 1
    allowed = limit - removed
    depth = 0
    for run in _RUN.finditer(brackets):
        start, end = run.span()
        if brackets[start] == "[":
            depth += end - start
            if depth > allowed:
                return True
        else:
            depth -= end - start
            if depth < 0:
                return True  # a closer with nothing open: unbalanced
    return depth != 0


def bounded_loads(**kwargs: Any) -> Callable[[str], Any]:
    """:func:`loads_bounded` with fixed options and one decoder built up front (``json.loads``
    with any keyword builds a new ``JSONDecoder`` on every call)."""
    decoder = json.JSONDecoder(**kwargs)

    def loads(text: str) -> Any:
        if not isinstance(text, str):
            raise TypeError("JSON text must be str")
        if too_deep(text):
            raise ValueError("JSON nested too deeply")
        if text.startswith("\ufeff"):  # as json.loads: a BOM is an error, not skipped
            raise ValueError("unexpected UTF-8 BOM")
        try:
            return decoder.decode(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    return loads


def loads_bounded(text: str, **kwargs: Any) -> Any:
    """``json.loads`` for untrusted text: too deep raises ValueError, as does a
    RecursionError from the parser; nothing else than ValueError/TypeError escapes."""
    if too_deep(text):
        raise ValueError("JSON nested too deeply")
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
