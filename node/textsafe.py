"""Make untrusted text safe to show on a terminal or in a one-line log record.

Client-chosen values (model names, session ids, request ids) and node-chosen ones seen by
a client (error messages) end up in human-readable output: ``llm-node receipts list``,
``llm-node chat``'s status lines, text log lines. Printed raw, a newline forges a whole
row or record, an escape sequence (ESC ``[`` ...) drives the terminal, and a bidi override
(U+202E) or a line separator (U+2028) makes what is shown differ from what is stored.

:func:`printable` leaves printable text alone and writes everything else as a Python-style
escape: C0 controls and DEL (``\\x1b``, ``\\n``), C1 controls (``\\x9b``), format
characters such as the bidi overrides and zero-width characters (``\\u202e``), line and
paragraph separators (``\\u2028``), other non-printing spaces, lone surrogates and
unassigned code points, and the backslash itself (``\\\\``), so the escaped form cannot
be mistaken for a raw one. Linear in the input; no regular expression.
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character that is not plainly printable escaped (see above).

    The ASCII space is printable; every other kind of space, control or format character
    is escaped.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in text)
