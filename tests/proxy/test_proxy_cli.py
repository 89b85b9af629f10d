"""``llm-node proxy`` argument handling (the running proxy is tested in tests/docs too)."""

from __future__ import annotations

import pytest

from node.cli import main


def test_listening_off_loopback_needs_an_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["proxy", "--node", "http://127.0.0.1:1", "--listen", "0.0.0.0:0"])
    assert status == 2
    assert "requires --api-key" in capsys.readouterr().err


def test_the_node_is_required(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_NODE_PROXY_NODE", raising=False)
    assert main(["proxy"]) == 2
    assert "--node is required" in capsys.readouterr().err


def test_a_bad_pin_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["proxy", "--node", "http://127.0.0.1:1", "--expect-host-address", "0x12"])
    assert status == 2
    assert "--expect-host-address" in capsys.readouterr().err


def test_an_unreachable_node_stops_the_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--node", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"]) == 1
    assert "error [CONNECT_FAILED]" in capsys.readouterr().err


def test_environment_variables_set_the_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_NODE_PROXY_NODE", "http://127.0.0.1:1")
    monkeypatch.setenv("LLM_NODE_PROXY_LISTEN", "0.0.0.0:0")
    assert main(["proxy"]) == 2  # the env listen address is off loopback, and no key
    assert "requires --api-key" in capsys.readouterr().err
    monkeypatch.setenv("LLM_NODE_PROXY_API_KEY", "k")
    assert main(["proxy"]) == 1  # now it gets as far as the (unreachable) node
    assert "CONNECT_FAILED" in capsys.readouterr().err
