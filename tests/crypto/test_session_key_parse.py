"""``sessionKey`` is read from the decrypted buffer in place (issue 14, finding 9): which
member counts, what the JSON parser gets to see, and the cases left to the parser."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.crypto import session_init
from node.crypto.errors import CryptoError, ErrorCode
from node.crypto.secret import SecretBytes
from node.crypto.session_init import _parse_session_json, _session_key_span
from tests.crypto._frames import SESSION_KEY

HEX = SESSION_KEY.hex()


def parse(text: str) -> tuple[SecretBytes, dict[str, Any], list[str]]:
    """Parse session text; also return every text json.loads was given."""
    seen: list[str] = []
    real = session_init.loads_bounded

    def spy(value: str, **kw: Any) -> Any:
        seen.append(value)
        return real(value, **kw)

    session_init.loads_bounded = spy  # type: ignore[assignment]
    try:
        key, data = _parse_session_json(SecretBytes(text.encode("utf-8")))
    finally:
        session_init.loads_bounded = real  # type: ignore[assignment]
    return key, data, seen


@pytest.mark.parametrize(
    "text",
    [
        '{"sessionKey":"' + HEX + '","jobId":"1"}',
        '{"jobId":"1", "sessionKey" : "0x' + HEX.upper() + '"}',
        '{"a":{"sessionKey":"ff"},"b":["sessionKey"],"sessionKey":"' + HEX + '"}',
        '{"note":"\\"sessionKey\\":\\"00\\"","sessionKey":"' + HEX + '"}',
        '{\n "sessionKey":\t"' + HEX + '"\n}',
    ],
)
def test_the_parser_never_sees_the_key(text: str) -> None:
    key, data, seen = parse(text)
    assert key.equals(SESSION_KEY)
    assert "sessionKey" not in data
    assert len(seen) == 1
    assert HEX not in seen[0].lower()
    assert "0" * 64 in seen[0]


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ('{"sessionKey":"abcd"}', (15, 19)),
        ('{"x":1,"sessionKey":""}', (21, 21)),
        ('{"a":{"sessionKey":"ab"}}', None),  # not a top-level member
        ('["sessionKey","ab"]', None),  # not an object
        ('{"sessionKey":12}', None),  # not a string
        ('{"sessionKey":["ab"]}', None),
        ('{"session\\u004bey":"ab"}', None),  # escaped name: left to the parser
        ('{"sessionKey":"ab', None),  # unterminated
        ('{"sessionKey"', None),
    ],
)
def test_the_span_of_the_top_level_member(text: str, span: tuple[int, int] | None) -> None:
    assert _session_key_span(bytearray(text.encode())) == span


def test_two_plain_session_keys_are_refused() -> None:
    text = '{"sessionKey":"' + HEX + '","sessionKey":"' + "11" * 32 + '"}'
    with pytest.raises(CryptoError, match="more than once") as info:
        parse(text)
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA


def test_a_later_escaped_duplicate_is_refused() -> None:
    text = '{"sessionKey":"' + HEX + '","session\\u004bey":"' + "11" * 32 + '"}'
    with pytest.raises(CryptoError, match="more than once"):
        parse(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"session\\u004bey":"' + HEX + '"}',  # escaped member name
        '{"sessionKey":"\\u0030\\u0031' + HEX[2:] + '"}',  # escaped digits
    ],
)
def test_escaped_spellings_still_work_through_the_parser(text: str) -> None:
    expected = bytes.fromhex(json.loads(text)["sessionKey"])
    key, _, _ = parse(text)
    assert key.equals(expected)


@pytest.mark.parametrize(
    "value",
    ["", "ab", HEX[:-1], HEX + "0", "0x" + HEX[:-2], "0x0x" + HEX[:-4], HEX[:-1] + "g"],
)
def test_a_malformed_key_is_still_refused(value: str) -> None:
    with pytest.raises(CryptoError) as info:
        parse(json.dumps({"sessionKey": value}))
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA


def test_every_hex_digit_decodes() -> None:
    for raw in (bytes(range(32)), bytes(range(224, 256)), b"\xff" * 32, b"\x00" * 32):
        for text in (raw.hex(), raw.hex().upper(), "0X" + raw.hex()):
            key, _, _ = parse(json.dumps({"sessionKey": text}))
            assert key.equals(raw)


@pytest.mark.parametrize(
    "text",
    [
        '{"sessionKey":"' + HEX + '", oops}',  # the key is found, the JSON is broken
        '{"sessionKey":"' + HEX + '"} trailing',
        '{"sessionKey":"' + HEX + '","session\\u004bey":"' + "11" * 32 + '"}',
        '{"sessionKey":"' + HEX + '","x":"\\ud800' + '\\"}',
    ],
)
def test_a_key_taken_from_refused_data_is_wiped(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[SecretBytes] = []
    real = session_init._take_session_key

    def recording(buf: bytearray) -> SecretBytes | None:
        key = real(buf)
        if key is not None:
            taken.append(key)
        return key

    monkeypatch.setattr(session_init, "_take_session_key", recording)
    with pytest.raises(CryptoError) as info:
        _parse_session_json(SecretBytes(text.encode("utf-8")))
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA
    (key,) = taken
    assert key.wiped
    assert key.is_all_zero()


# The SDK's own layout (compact, the key first) is read without the token scan.


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ('{"sessionKey":"' + HEX + '","jobId":"1"}', (15, 79)),
        ('{"sessionKey":"' + HEX + '"}', (15, 79)),
        ('{"sessionKey":"' + HEX + '0","jobId":"1"}', None),  # 65 digits
        ('{"sessionKey":"' + HEX[:-1] + '","jobId":"1"}', None),  # 63 digits
        ('{"sessionKey":"' + HEX, None),  # cut short
        ('{"sessionKey": "' + HEX + '"}', None),  # not compact
        ('{"sessionKey":"0x' + HEX + '"}', None),  # prefixed
        ('{"sessionKey":"' + HEX + '","sessionKey":"' + HEX + '"}', None),  # named again
        ('{"sessionKey":"' + HEX + '","v":{"sessionKey":1}}', None),  # nested: the scan
    ],
)
def test_the_sdk_layout_span(text: str, span: tuple[int, int] | None) -> None:
    assert session_init._sdk_key_span(bytearray(text.encode())) == span


@pytest.mark.parametrize(
    "value",
    ["", "ab", HEX[:-1], HEX + "0", HEX + "00", "0x" + HEX[:-2], HEX[:-1] + "g", HEX + '\\"'],
)
def test_a_malformed_key_in_the_sdk_layout_is_refused_as_such(value: str) -> None:
    text = '{"sessionKey":"' + value + '","jobId":"1"}'
    with pytest.raises(CryptoError) as info:
        parse(text)
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA
    assert "more than once" not in info.value.message  # what is wrong is said


def test_the_sdk_layout_with_a_nested_member_so_named_keeps_it() -> None:
    text = '{"sessionKey":"' + HEX + '","vectorDatabase":{"sessionKey":"x"}}'
    key, data, seen = parse(text)
    assert key.equals(SESSION_KEY)
    assert data == {"vectorDatabase": {"sessionKey": "x"}}
    assert HEX not in seen[0]
