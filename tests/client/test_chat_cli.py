"""``llm-node chat`` as a user runs it: a subprocess against a node subprocess.

The node runs ``python -m node serve --backend echo --port 0`` with a host key in its
environment; the test learns the port from its "listening on" log line (read by a thread,
no polling), then confirms ``/v1/health`` before any chat runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from node.crypto import HostKey
from node.crypto.curve import address_of
from tests.conftest import REPO_ROOT
from tests.support.nodeproc import echo_node_process

STARTUP_S = 60.0
RUN_S = 60.0
CLIENT_KEY_HEX = "0x" + "c1" * 32


@attrs.define
class NodeProcess:
    url: str
    host_key: HostKey
    log: list[str]


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOST_PRIVATE_KEY", "LLM_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


@pytest.fixture(scope="module")
def node_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("node")
    host_key = HostKey.generate()
    env = _client_env()
    env["HOST_PRIVATE_KEY"] = host_key.private_key_hex()
    try:
        with echo_node_process(tmp / "l.sqlite3", env, startup_s=STARTUP_S) as (url, log):
            for attempt in range(3):
                try:
                    health = httpx.get(url + "/v1/health", timeout=10)
                except httpx.TransportError:
                    if attempt == 2:
                        raise
                    continue
                assert health.status_code == 200
                assert health.json()["encryption"] is True
                break
            yield NodeProcess(url, host_key, log)
    finally:
        host_key.wipe()


def chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "chat", *args],
        cwd=REPO_ROOT,
        env=_client_env(),
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=RUN_S,
        check=False,
    )


def test_one_shot_encrypted(node_process: NodeProcess) -> None:
    result = chat("--url", node_process.url, "hello from the command line")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the command line\n"
    assert "ephemeral client key" in result.stderr
    assert "first token" in result.stderr
    assert "tokens/s" in result.stderr
    assert "tokens 5 prompt + 5 completion = 10" in result.stderr
    assert "finish stop" in result.stderr


def test_one_shot_json_with_a_key_file(node_process: NodeProcess, tmp_path: Path) -> None:
    key_file = tmp_path / "client.key"
    key_file.write_text(CLIENT_KEY_HEX + "\n")
    result = chat(
        "--url",
        node_process.url,
        "--client-key-file",
        str(key_file),
        "--expect-host-address",
        node_process.host_key.address,
        "--json",
        "transcript me ✓",
    )
    assert result.returncode == 0, result.stderr
    transcript = json.loads(result.stdout)
    assert transcript["prompt"] == "transcript me ✓"
    assert transcript["text"] == "transcript me ✓"
    assert transcript["finish_reason"] == "stop"
    assert transcript["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert transcript["encrypted"] is True
    assert transcript["host_address"] == node_process.host_key.address
    client = bytes.fromhex(CLIENT_KEY_HEX[2:])
    from coincurve import PrivateKey

    assert transcript["client_address"] == address_of(PrivateKey(client).public_key)
    timings = transcript["timings"]
    assert 0 <= timings["first_token_s"] <= timings["elapsed_s"]
    assert timings["tokens_per_s"] > 0
    assert "ephemeral" not in result.stderr
    assert CLIENT_KEY_HEX[2:] not in result.stderr + result.stdout


def test_plaintext_one_shot(node_process: NodeProcess) -> None:
    result = chat("--url", node_process.url, "--plaintext", "--model", "echo", "plain words")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "plain words\n"
    assert "ephemeral" not in result.stderr


def test_interactive_multi_turn(node_process: NodeProcess) -> None:
    result = chat(
        "--url",
        node_process.url,
        "--host-pubkey",
        node_process.host_key.public_key_hex,
        "--json",
        stdin="first question\n\nsecond question here\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["text"] for t in turns] == ["first question", "second question here"]
    # One connection, one session: the same ids on every turn.
    assert turns[0]["session_id"] == turns[1]["session_id"]
    assert turns[0]["request_id"] != turns[1]["request_id"]


def test_interactive_streaming_text(node_process: NodeProcess) -> None:
    result = chat("--url", node_process.url, "--reinit-each-prompt", stdin="one\ntwo three\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "one\ntwo three\n"
    assert result.stderr.count("finish stop") == 2


def test_wrong_pinned_address_fails_with_the_code(node_process: NodeProcess) -> None:
    result = chat(
        "--url", node_process.url, "--expect-host-address", "0x" + "00" * 19 + "01", "hi there"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error [HOST_KEY_MISMATCH]: ")
    assert node_process.host_key.address in error_lines[0]


def test_missing_key_file_is_refused(node_process: NodeProcess, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    result = chat("--url", node_process.url, "--client-key-file", str(missing), "hi")
    assert result.returncode == 2
    assert "error [INVALID_ARGUMENT]" in result.stderr
    assert "does not exist" in result.stderr
    assert not missing.exists()


def test_bad_key_file_content_is_not_echoed(tmp_path: Path) -> None:
    key_file = tmp_path / "bad.key"
    key_file.write_text("0x" + "ab" * 31 + "zz")
    result = chat("--client-key-file", str(key_file), "hi")
    assert result.returncode == 2
    assert "64 hex digits" in result.stderr
    assert "ab" * 31 not in result.stderr


def test_unreachable_node_fails_cleanly(tmp_path: Path) -> None:
    result = chat("--url", "http://127.0.0.1:1", "--connect-timeout", "5", "hi")
    assert result.returncode == 1
    assert "error [CONNECT_FAILED]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "expected"), [([], "v2"), (["--protocol", "v1"], "v1")])
def test_protocol_choice(node_process: NodeProcess, flag: list[str], expected: str) -> None:
    result = chat("--url", node_process.url, *flag, "--json", "which protocol")
    assert result.returncode == 0, result.stderr
    transcript = json.loads(result.stdout)
    assert transcript["protocol"] == expected
    assert transcript["host_verified_by"] == {"v1": "challenge", "v2": "handshake"}[expected]
    assert transcript["text"] == "which protocol"
    assert "falling back" not in result.stderr
    assert "does not offer protocol v2" not in result.stderr


def test_protocol_v2_is_never_plaintext() -> None:
    result = chat("--protocol", "v2", "--plaintext", "hi")
    assert result.returncode == 2
    assert "error [INVALID_ARGUMENT]: --protocol v2 is always encrypted" in result.stderr


@pytest.fixture(scope="module")
def no_challenge_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node started with ``--no-v1-challenge`` (POST /v1/auth/challenge answers 403)."""
    tmp = tmp_path_factory.mktemp("node-no-challenge")
    host_key = HostKey.generate()
    env = _client_env()
    env["HOST_PRIVATE_KEY"] = host_key.private_key_hex()
    try:
        with echo_node_process(
            tmp / "l.sqlite3", env, startup_s=STARTUP_S, extra_args=("--no-v1-challenge",)
        ) as (url, log):
            refused = httpx.post(url + "/v1/auth/challenge", json={"challenge": "00" * 32})
            assert refused.status_code == 403
            yield NodeProcess(url, host_key, log)
    finally:
        host_key.wipe()


@pytest.mark.parametrize("flag", [[], ["--protocol", "v2"]])
def test_chat_over_v2_needs_no_challenge(no_challenge_node: NodeProcess, flag: list[str]) -> None:
    result = chat(
        "--url",
        no_challenge_node.url,
        *flag,
        "--expect-host-address",
        no_challenge_node.host_key.address,
        "--json",
        "proven by the handshake",
    )
    assert result.returncode == 0, result.stderr
    transcript = json.loads(result.stdout)
    assert transcript["protocol"] == "v2"
    assert transcript["text"] == "proven by the handshake"
    assert transcript["host_address"] == no_challenge_node.host_key.address
    assert transcript["host_verified_by"] == "handshake"


def test_chat_over_v1_without_the_challenge_fails_clearly(no_challenge_node: NodeProcess) -> None:
    result = chat("--url", no_challenge_node.url, "--protocol", "v1", "hi")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error [CONNECT_FAILED]" in result.stderr
    assert "--no-v1-challenge" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_over_v2_refuses_a_wrong_pin_first(no_challenge_node: NodeProcess) -> None:
    result = chat(
        "--url",
        no_challenge_node.url,
        "--protocol",
        "v2",
        "--expect-host-address",
        "0x" + "00" * 19 + "01",
        "hi",
    )
    assert result.returncode == 1
    assert "error [HOST_KEY_MISMATCH]" in result.stderr
    assert no_challenge_node.host_key.address in result.stderr
