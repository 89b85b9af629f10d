"""Untrusted text shown on a terminal or in a text log line is escaped (finding 7: a model
name with a newline forged a whole row of ``receipts list``, escape sequences reached the
terminal)."""

from __future__ import annotations

import logging

import pytest

from node.client import cli as chat_cli
from node.logs import JsonFormatter, TextFormatter
from node.textsafe import printable

DANGEROUS = [
    "\n",
    "\r",
    "\x1b",
    "\x00",
    "\x07",
    "\x7f",
    "\x85",
    "\x9b",
    "\u200b",
    "\u200e",
    "\u202a",
    "\u202e",
    "\u2066",
    "\u2069",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ud800",
    "\U000e0001",
]


@pytest.mark.parametrize("ch", DANGEROUS)
def test_every_dangerous_character_is_escaped(ch: str) -> None:
    shown = printable(f"a{ch}b")
    assert ch not in shown
    assert shown.isprintable()
    assert shown.startswith("a\\")
    assert shown.endswith("b")


def test_printable_text_is_left_alone_and_escapes_are_unambiguous() -> None:
    for text in ("echo", "SmolLM2-135M-Instruct.Q4_1", "modèle 中文 ✓", "a b"):
        assert printable(text) == text
    assert printable("a\\x1bb") == "a\\\\x1bb"  # a literal backslash is doubled
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("x\u202ey") == "x\\u202ey"
    assert printable("\U000e0001") == "\\U000e0001"


def test_printable_is_linear() -> None:
    text = "\x1b" * 200_000
    assert len(printable(text)) == 4 * 200_000


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("node.server", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_text_log_lines_escape_client_chosen_values() -> None:
    line = TextFormatter().format(
        _record("error sent", session="1\n12:00:00 INFO    node: forged\x1b[2J\u202e")
    )
    assert "\n" not in line
    assert "\x1b" not in line
    assert "\u202e" not in line
    assert "session=1\\x0a12:00:00" in line
    message = TextFormatter().format(_record("model %s", "m\n12:00:00 ERROR forged\x1b[2J"))
    assert "\n" not in message
    assert "\x1b" not in message
    assert "model m\\x0a12:00:00 ERROR forged\\x1b[2J" in message
    json_line = JsonFormatter().format(_record("x\ny", session="\x1b"))
    assert "\n" not in json_line
    assert "\x1b" not in json_line


def test_chat_escapes_what_the_node_sends(capsys: pytest.CaptureFixture[str]) -> None:
    chat_cli._error_line("RATE_LIMITED\x1b[2J", "slow down\nerror [FAKE]: \u202eevil")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "\x1b" not in err
    assert "\u202e" not in err
    assert err.startswith("error [RATE_LIMITED\\x1b[2J]: slow down\\x0aerror [FAKE]")
    stats = _stats_with_finish("stop\x1b]0;pwned\x07")
    assert "\x1b" not in stats
    assert "\x07" not in stats
    assert "finish stop\\x1b]0;pwned\\x07" in stats


def _stats_with_finish(finish: str) -> str:
    class Fake:
        first_token_s = 0.1
        tokens_per_s = 10.0
        usage = None
        tokens_used = 3
        finish_reason = finish
        elapsed_s = 0.5

    return chat_cli._stats_line(Fake())  # type: ignore[arg-type]
