"""The example frames in docs/API.md are what the code produces now (they cannot drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest

from node.crypto.errors import ErrorCode
from tests.docs._markdown import load_generator, read_doc


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def examples(gen: ModuleType) -> dict[str, str]:
    built: dict[str, str] = gen.build_examples()
    return built


def test_api_md_holds_exactly_what_the_code_generates(
    gen: ModuleType, examples: dict[str, str]
) -> None:
    current = read_doc("docs/API.md")
    wanted = gen.apply(current, examples)
    stale = gen.changed_blocks(current, wanted)
    assert wanted == current, (
        f"docs/API.md is out of date in {stale}; run .venv/bin/python scripts/gen_api_examples.py"
    )


def test_generation_is_deterministic(gen: ModuleType, examples: dict[str, str]) -> None:
    assert gen.build_examples() == examples


def test_check_mode_reports_drift(gen: ModuleType, tmp_path: Path) -> None:
    copy = tmp_path / "API.md"
    text = read_doc("docs/API.md").replace('"type": "pong"', '"type": "pong!"', 1)
    copy.write_text(text, encoding="utf-8")
    assert gen.main(["--check", "--path", str(copy)]) == 1
    assert gen.main(["--path", str(copy)]) == 0  # rewrites the block
    assert gen.main(["--check", "--path", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == read_doc("docs/API.md")


def test_markers_must_match_the_generator(gen: ModuleType, examples: dict[str, str]) -> None:
    text = read_doc("docs/API.md")
    with pytest.raises(ValueError, match="END marker of 'ping' without its BEGIN"):
        gen.apply(text.replace("<!-- BEGIN GENERATED: ping -->", ""), examples)
    without_ping = re.sub(
        r"<!-- BEGIN GENERATED: ping -->.*?<!-- END GENERATED: ping -->", "", text, flags=re.S
    )
    with pytest.raises(ValueError, match="lacks the generated blocks ping"):
        gen.apply(without_ping, examples)
    unknown = text + "\n<!-- BEGIN GENERATED: nope -->\n<!-- END GENERATED: nope -->\n"
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        gen.apply(unknown, examples)
    with pytest.raises(ValueError, match="no END marker"):
        gen.apply(text.replace("<!-- END GENERATED: ping -->", ""), examples)


def _json_blocks(markdown: str) -> list[object]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", markdown, re.S)]


def test_every_error_code_but_internal_has_a_generated_example(
    examples: dict[str, str],
) -> None:
    frames = _json_blocks(examples["error-examples"])
    codes = {f["code"] for f in frames if isinstance(f, dict) and f.get("type") == "error"}
    assert codes == {c.value for c in ErrorCode} - {"INTERNAL_ERROR"}


def test_generated_frames_cover_every_message_type(examples: dict[str, str]) -> None:
    kinds = set()
    for text in examples.values():
        for frame in _json_blocks(text):
            if isinstance(frame, dict) and "type" in frame:
                kinds.add(frame["type"])
    client_to_node = {
        "ping",
        "encrypted_session_init",
        "encrypted_message",
        "stream_cancel",
        "session_init",
        "prompt",
    }
    node_to_client = {
        "connected",
        "pong",
        "session_init_ack",
        "encrypted_chunk",
        "encrypted_response",
        "stream_chunk",
        "stream_end",
        "error",
    }
    assert client_to_node | node_to_client <= kinds


def test_worked_example_decrypts_with_the_documented_values(
    gen: ModuleType, examples: dict[str, str]
) -> None:
    """The inputs block lets a reader decrypt the example chunks by hand: do it here."""
    from node.crypto import aead

    inputs = examples["inputs"]
    found = re.search(r"session key\s+([0-9a-f]{64})", inputs)
    assert found is not None
    session_key = bytes.fromhex(found[1])
    text = b""
    for frame in _json_blocks(examples["encrypted-chunks"]):
        assert isinstance(frame, dict)
        p = frame["payload"]
        text += aead.open(
            session_key,
            bytes.fromhex(p["nonceHex"]),
            bytes.fromhex(p["ciphertextHex"]),
            bytes.fromhex(p["aadHex"]),
        )
    assert text.decode() == gen.PROMPT
