"""Text shapes that make a careless parser slow, each a function of a size ``n`` (characters).

Shared by ``tests/security/test_linear_parsing.py`` (which checks that every parser of
untrusted input costs time linear in ``n``) and ``scripts/fuzz_node.py`` (which sends them
to a node process). Every shape is ``n`` characters long, give or take a few, and most
have more than 64 brackets so that the depth check cannot answer from its counts alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final


def _reviewer(n: int) -> str:
    # The outside review's frame: 65 openers, then ``"\`` repeated. Every quote is escaped
    # by the backslash before the next one, so each opens a string that never ends.
    return "{" * 65 + '"\\' * (n // 2)


def _quotes(n: int) -> str:
    return "[" * 65 + '"' * n


def _backslashes(n: int) -> str:
    return "[" * 65 + '"' + "\\" * n


def _escaped_quotes(n: int) -> str:
    return '{"type":"ping","id":' + "[" * 65 + '"' + '\\"' * (n // 2)


def _deep_arrays(n: int) -> str:
    return "[" * n


def _deep_objects(n: int) -> str:
    return '{"a":' * (n // 5) + "1" + "}" * (n // 5)


def _pairs(n: int) -> str:
    return "[" + "[]," * (n // 3) + "[]]"


def _mountains(n: int) -> str:
    # Nests exactly as deep as allowed, over and over: the most work for the depth check.
    return "[" + ",".join(["[" * 63 + "]" * 63] * (n // 127)) + "]"


def _many_keys(n: int) -> str:
    count = n // 12
    return '{"type":"ping",' + ",".join(f'"k{i:07d}":[]' for i in range(count)) + "}"


def _many_strings(n: int) -> str:
    return '{"type":"ping","x":[' + ",".join(['"a\\"[{"'] * (n // 8)) + "]}"


def _unicode_escapes(n: int) -> str:
    return '{"type":"ping","x":["' + "\\ud83d\\ude00" * (n // 12) + '"' + ",[]" * 70 + "]}"


def _long_number(n: int) -> str:
    return '{"type":"ping","x":[' + "[]," * 70 + "1" * n + "]}"


def _long_fraction(n: int) -> str:
    return '{"type":"ping","x":[' + "[]," * 70 + "0." + "1" * n + "]}"


def _unterminated_in_deep(n: int) -> str:
    return '{"type":"ping","id":"' + "[" * n


SHAPES: Final[dict[str, Callable[[int], str]]] = {
    "reviewer-open-quote-backslash": _reviewer,
    "quotes": _quotes,
    "backslashes": _backslashes,
    "escaped-quotes": _escaped_quotes,
    "deep-arrays": _deep_arrays,
    "deep-objects": _deep_objects,
    "many-empty-arrays": _pairs,
    "nests-at-the-limit": _mountains,
    "many-keys": _many_keys,
    "many-strings-with-brackets": _many_strings,
    "unicode-escapes": _unicode_escapes,
    "long-number": _long_number,
    "long-fraction": _long_fraction,
    "unterminated-string-of-brackets": _unterminated_in_deep,
}
