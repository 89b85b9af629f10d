"""The ``llm-node`` command line: keygen and pubkey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from node import __version__
from node.cli import main
from node.crypto import HostKey
from node.crypto.hostkey import ENV_VAR

KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def _lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and line.startswith(ENV_VAR):
            name, value = line.split("=", 1)
            out[name] = value
        elif ":" in line:
            name, value = line.split(":", 1)
            out[name.strip()] = value.strip()
    return out


def test_keygen_prints_a_consistent_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    captured = capsys.readouterr()
    fields = _lines(captured.out)
    private = fields[ENV_VAR]
    assert private.startswith("0x")
    assert len(private) == 66
    key = HostKey.parse(private)
    assert fields["public key"] == key.public_key_hex
    assert fields["address"] == key.address == Account.from_key(private).address
    # The private key goes to stdout only; the hint on stderr never repeats it.
    assert private[2:] not in captured.err
    assert ENV_VAR in captured.err


def test_keygen_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    key = HostKey.parse(data["private_key"])
    assert data["public_key"] == key.public_key_hex
    assert data["address"] == Account.from_key(data["private_key"]).address


def test_keygen_gives_fresh_keys(capsys: pytest.CaptureFixture[str]) -> None:
    main(["keygen", "--json"])
    main(["keygen", "--json"])
    first, second = capsys.readouterr().out.splitlines()
    assert json.loads(first)["private_key"] != json.loads(second)["private_key"]


@pytest.mark.parametrize("value", ["0x" + KEY_HEX, "0X" + KEY_HEX.upper(), f" 0x{KEY_HEX}\n"])
def test_pubkey_prints_public_key_and_address_only(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    assert main(["pubkey"]) == 0
    captured = capsys.readouterr()
    expected = HostKey.parse("0x" + KEY_HEX)
    fields = _lines(captured.out)
    assert fields["public key"] == expected.public_key_hex
    assert fields["address"] == Account.from_key("0x" + KEY_HEX).address
    everything = (captured.out + captured.err).lower()
    assert KEY_HEX not in everything
    assert KEY_HEX[:16] not in everything
    assert ENV_VAR + "=" not in captured.out


def test_pubkey_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_VAR, "0x" + KEY_HEX)
    assert main(["pubkey", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "public_key": HostKey.parse("0x" + KEY_HEX).public_key_hex,
        "address": Account.from_key("0x" + KEY_HEX).address,
    }
    assert KEY_HEX not in out.lower()


def test_pubkey_unset_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert main(["pubkey"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert ENV_VAR in captured.err
    assert "not set" in captured.err


@pytest.mark.parametrize(
    "value",
    [
        KEY_HEX,  # no 0x
        "0x" + KEY_HEX[:-2],  # short
        "0x" + KEY_HEX + "ab",  # long
        "0x" + KEY_HEX[:-1] + "z",  # non-hex
        "0x" + "00" * 32,  # zero
        "0x" + "ff" * 32,  # >= n
        "",
    ],
)
def test_pubkey_invalid_exits_2_without_echoing(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    assert main(["pubkey"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert ENV_VAR in captured.err
    if value:
        assert value not in captured.err
        assert value.removeprefix("0x") not in captured.err
        assert value[2:18] not in captured.err


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_protocols_v2_needs_the_host_key(
    workers: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    ledger = str(tmp_path / "ledger.sqlite3")
    args = ["serve", "--backend", "echo", "--protocols", "v2", "--workers", workers]
    assert main([*args, "--ledger", ledger]) == 2
    assert "--protocols v2 needs HOST_PRIVATE_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["v3", "", "v1,v1", "v1;v2", "V2,x"])
def test_serve_refuses_unknown_protocol_lists(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert main(["serve", "--backend", "echo", "--protocols", value]) == 2
    assert "is not a list of protocols" in capsys.readouterr().err


def test_protocol_lists_parse_in_a_fixed_order() -> None:
    from node.cli import parse_protocols

    assert parse_protocols("v2, V1") == ("v1", "v2")
    assert parse_protocols("v2") == ("v2",)
