"""``parse_request_plaintext``: the decrypted text of an ``encrypted_message``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.crypto.errors import ErrorCode
from node.protocol import InferenceRequest, ProtocolError
from node.protocol.messages import PromptRequest
from node.protocol.requests import INFERENCE_ACTIONS, MAX_STOP_SEQUENCES, parse_request_plaintext
from tests.conftest import load_vector

SDK = load_vector("sdk/session_init_dev.json")


def test_sdk_shaped_object() -> None:
    text = '{"prompt":"Hi","model":"m","max_tokens":4000,"temperature":0.7,"stream":true}'
    assert parse_request_plaintext(text) == InferenceRequest(
        prompt="Hi", model="m", max_tokens=4000, temperature=0.7, stream=True
    )


@pytest.mark.parametrize(
    "item",
    [m for c in SDK["cases"] for m in c["messages"]],
    ids=[f"{c['id']}-{i}" for c in SDK["cases"] for i in range(len(c["messages"]))],
)
def test_every_sdk_plaintext(item: dict[str, Any]) -> None:
    request = parse_request_plaintext(item["expected_plaintext"])
    expected = item["expected_request"]
    assert request.prompt == expected["prompt"]
    assert request.model == expected["model"]
    assert request.max_tokens == expected["max_tokens"]
    assert request.temperature == expected["temperature"]
    assert request.stream is expected["stream"]


@pytest.mark.parametrize(
    "text",
    ["What is 2+2?", "", "  leading spaces", "[1, 2]", "42", '"quoted"', "null", "\U0001f999"],
)
def test_bare_text_is_the_prompt(text: str) -> None:
    assert parse_request_plaintext(text) == InferenceRequest(prompt=text)


@pytest.mark.parametrize("text", ["{not json", "{", "{}}", '  {"prompt": "x",}', "{" * 5000])
def test_non_json_starting_with_brace_is_the_prompt(text: str) -> None:
    assert parse_request_plaintext(text) == InferenceRequest(prompt=text)


def test_messages_list() -> None:
    text = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi", "name": "ignored"},
            ],
            "stop": ["\n\n", "User:"],
            "seed": 7,
            "stream": False,
        }
    )
    assert parse_request_plaintext(text) == InferenceRequest(
        prompt=None,
        messages=(("system", "be brief"), ("user", "hi")),
        stop=("\n\n", "User:"),
        seed=7,
        stream=False,
    )


def test_single_stop_string_and_unknown_keys() -> None:
    request = parse_request_plaintext('{"prompt":"p","stop":"END","web_search":true,"x":[1]}')
    assert request.stop == ("END",)
    assert request.prompt == "p"


@pytest.mark.parametrize("action", sorted(INFERENCE_ACTIONS))
def test_inference_actions_are_accepted(action: str) -> None:
    assert parse_request_plaintext(json.dumps({"action": action, "prompt": "p"})).prompt == "p"


@pytest.mark.parametrize("action", ["embed", "search", "", "INFERENCE", 1, ["inference"], {"a": 1}])
def test_other_actions_are_unsupported(action: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_plaintext(json.dumps({"action": action, "prompt": "p"}))
    assert info.value.code is ErrorCode.UNSUPPORTED_ACTION


def test_unsupported_action_message_does_not_echo_decrypted_text() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_plaintext('{"action":"secret-plan-9","prompt":"p"}')
    assert "secret-plan-9" not in info.value.message


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("max-tokens-zero", {"max_tokens": 0}),
    ("max-tokens-negative", {"max_tokens": -5}),
    ("max-tokens-huge", {"max_tokens": 1_000_001}),
    ("max-tokens-string", {"max_tokens": "10"}),
    ("max-tokens-float", {"max_tokens": 1.5}),
    ("max-tokens-bool", {"max_tokens": True}),
    ("temperature-high", {"temperature": 10.01}),
    ("temperature-negative", {"temperature": -1}),
    ("temperature-string", {"temperature": "0.5"}),
    ("temperature-bool", {"temperature": False}),
    ("seed-negative", {"seed": -1}),
    ("seed-too-big", {"seed": 2**32}),
    ("seed-float", {"seed": 1.0}),
    ("seed-bool", {"seed": True}),
    ("stop-number", {"stop": 5}),
    ("stop-empty-string", {"stop": ""}),
    ("stop-list-with-number", {"stop": ["a", 1]}),
    ("stop-too-many", {"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}),
    ("stop-surrogate", {"stop": ["\ud800"]}),
    ("stream-string", {"stream": "true"}),
    ("model-number", {"model": 3}),
    ("prompt-number", {"prompt": 3}),
    ("prompt-surrogate", {"prompt": "a\udfff"}),
    ("no-prompt-no-messages", {"prompt": None}),
    ("messages-empty", {"prompt": None, "messages": []}),
    ("messages-not-list", {"prompt": None, "messages": "hi"}),
    ("messages-item-not-object", {"prompt": None, "messages": ["hi"]}),
    ("messages-role-missing", {"prompt": None, "messages": [{"content": "x"}]}),
    ("messages-content-number", {"prompt": None, "messages": [{"role": "user", "content": 1}]}),
    ("messages-surrogate", {"prompt": None, "messages": [{"role": "user", "content": "\ud83d"}]}),
]


@pytest.mark.parametrize(("fields"), [b[1] for b in BAD_FIELDS], ids=[b[0] for b in BAD_FIELDS])
def test_bad_fields_are_invalid_payload(fields: dict[str, Any]) -> None:
    obj = {"prompt": "p", **fields}
    obj = {k: v for k, v in obj.items() if not (k == "prompt" and v is None)}
    with pytest.raises(ProtocolError) as info:
        parse_request_plaintext(json.dumps(obj))
    assert info.value.code is ErrorCode.INVALID_PAYLOAD, info.value.message


def test_lone_surrogate_in_raw_text_is_an_error() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_plaintext("plain \ud800 text")
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_limits_are_inclusive() -> None:
    request = parse_request_plaintext(
        json.dumps({"prompt": "p", "max_tokens": 1_000_000, "temperature": 10, "seed": 2**32 - 1})
    )
    assert (request.max_tokens, request.temperature, request.seed) == (1_000_000, 10.0, 2**32 - 1)
    low = parse_request_plaintext(json.dumps({"prompt": "p", "max_tokens": 1, "temperature": 0}))
    assert (low.max_tokens, low.temperature) == (1, 0.0)


def test_from_prompt_copies_the_plaintext_request() -> None:
    message = PromptRequest(prompt="p", model="m", max_tokens=3, temperature=0.5, stream=False)
    assert InferenceRequest.from_prompt(message) == InferenceRequest(
        prompt="p", model="m", max_tokens=3, temperature=0.5, stream=False
    )
