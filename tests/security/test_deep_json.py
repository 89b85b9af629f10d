"""Deeply nested JSON never reaches the C parser, wherever untrusted JSON is read.

Python's json module recurses once per nesting level in C. At the default recursion
limit it raises RecursionError (which most callers did not expect); with the limit raised
(Hypothesis raises it while it runs) 500,000 levels overflowed the C stack and killed the
test process with a segfault. Every parser of untrusted JSON goes through
``node.crypto.encoding.loads_bounded``; these tests pin each entry point.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from node.client.errors import MalformedFrame
from node.client.frames import parse_server_frame
from node.crypto.encoding import loads_bounded, too_deep
from node.crypto.errors import ErrorCode
from node.protocol.messages import request_id_of
from tests.crypto._frames import Frame

DEEP = ["[" * 500_000, '{"a":' * 200_000 + "1" + "}" * 200_000, "[1," * 100 + "1" + "]" * 100]


@pytest.fixture
def high_recursion_limit() -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.usefixtures("high_recursion_limit")
@pytest.mark.parametrize("text", DEEP, ids=["arrays", "objects", "mixed-101"])
def test_every_entry_point_refuses_deep_json(text: str) -> None:
    assert too_deep(text)
    with pytest.raises(ValueError, match="too deeply"):
        loads_bounded(text)
    assert request_id_of(text) is None  # the error path of the server's reader
    with pytest.raises(MalformedFrame):
        parse_server_frame(text[:4000])  # the client's parser (it caps frame size first)


def test_deep_session_data_is_invalid_session_data() -> None:
    from node.crypto.errors import NodeError
    from node.crypto.session_init import open_session_init, parse_init_payload
    from tests.crypto._frames import HOST

    frame = Frame(plaintext=("[" * 100_000).encode())
    with pytest.raises(NodeError) as info:
        open_session_init(HOST, parse_init_payload(frame.payload()))
    assert info.value.code is ErrorCode.INVALID_SESSION_DATA


def test_shallow_json_still_parses() -> None:
    assert loads_bounded('{"a":[1,{"b":[]}],"s":"[[[[[["}') == {"a": [1, {"b": []}], "s": "[[[[[["}
    nested = "[" * 64 + "]" * 64
    assert loads_bounded(nested) is not None
