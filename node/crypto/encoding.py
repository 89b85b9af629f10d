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
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text nests arrays/objects deeper than ``limit`` (or is unbalanced).

    The C JSON parser recurses once per level; a 1 MiB frame of ``[`` could exhaust the C
    stack when the interpreter's recursion limit has been raised (a segfault seen here),
    so deep input is refused before parsing. Runs at C speed: strings are cut out, runs
    of openers are looked for, then innermost pairs are removed level by level.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    run = r"[\[{]" + f"{{{limit + 1}}}"
    for _ in range(limit):
        if re.search(run, brackets):
            return True  # that many openers in a row is already too deep
        shorter = brackets.replace("[]", "").replace("{}", "")
        if shorter == brackets:
            break
        brackets = shorter
    return bool(brackets)


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
