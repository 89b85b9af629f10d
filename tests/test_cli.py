"""The ``llm-node`` command line: keygen and pubkey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from node import __version__
from node.cli import main
from node.config import NodeConfig
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


# ------------------------------------------------------------- serve settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("LLM_NODE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _serve_config(*argv: str) -> NodeConfig:
    from node.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["serve", *argv]))


def _serve_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The error of a serve command line that must stop before serving (exit 2)."""
    with pytest.raises(SystemExit) as stopped:
        main(["serve", *argv])
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LLM_NODE_LOG_LEVEL", "verbose", "LLM_NODE_LOG_LEVEL: 'verbose' is not one of"),
        ("LLM_NODE_PORT", "80x", "LLM_NODE_PORT: '80x' is not a non-negative integer"),
        ("LLM_NODE_REQUIRE_ENCRYPTION", "maybe", "LLM_NODE_REQUIRE_ENCRYPTION: 'maybe' is not"),
        ("LLM_NODE_LOG_FORMAT", "xml", "LLM_NODE_LOG_FORMAT: 'xml' is not one of text, json"),
    ],
)
def test_a_bad_environment_value_names_its_variable(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    expected: str,
) -> None:
    clean_env.setenv(variable, value)
    err = _serve_error(capsys)
    assert expected in err
    assert "Traceback" not in err


def test_the_same_bad_value_on_the_command_line_names_the_flag(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve_error(capsys, "--log-level", "verbose")
    assert "argument --log-level: 'verbose' is not one of" in err
    assert "LLM_NODE_" not in err.splitlines()[-1]


def test_names_in_lists_are_accepted_in_any_case(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LLM_NODE_LOG_FORMAT", "JSON")
    clean_env.setenv("LLM_NODE_LOG_LEVEL", "Warning")
    config = _serve_config("--backend", "ECHO")
    assert (config.log_format, config.log_level, config.backend) == ("json", "warning", "echo")


def test_a_boolean_variable_can_be_overridden_on_the_command_line(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LLM_NODE_REQUIRE_ENCRYPTION", "TRUE")
    assert _serve_config().require_encryption is True
    assert _serve_config("--no-require-encryption").require_encryption is False
    clean_env.setenv("LLM_NODE_REQUIRE_ENCRYPTION", "off")
    assert _serve_config().require_encryption is False
    assert _serve_config("--require-encryption").require_encryption is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x12", "is not an Ethereum address"),
        ("a3c508742417dfcda2067FF05b98750Fe6e5e0Fa", "is not an Ethereum address"),
        ("0xa3c508742417dfcda2067FF05b98750Fe6e5e0FA", "wrong EIP-55 checksum"),
        ("0xa3c508742417dfcda2067ff05b98750fe6e5e0fg", "is not an Ethereum address"),
        (",", "names no address"),
    ],
)
def test_allowed_clients_refuses_malformed_addresses(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    assert main(["serve", "--backend", "echo", "--allowed-clients", text]) == 2
    assert "error: --allowed-clients: " in capsys.readouterr().err
    clean_env.setenv("LLM_NODE_ALLOWED_CLIENTS", text)
    assert main(["serve", "--backend", "echo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LLM_NODE_ALLOWED_CLIENTS: ")
    assert expected in err


def test_allowed_clients_accepts_good_addresses(clean_env: pytest.MonkeyPatch) -> None:
    config = _serve_config(
        "--allowed-clients",
        "0xa3c508742417dfcda2067FF05b98750Fe6e5e0Fa, 0xABC0000000000000000000000000000000000000",
    )
    assert config.allowed_clients == {
        "0xa3c508742417dfcda2067ff05b98750fe6e5e0fa",
        "0xabc0000000000000000000000000000000000000",
    }


def test_model_map_errors_name_the_variable_and_bare_names_map_to_themselves(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("LLM_NODE_UPSTREAM_MODEL_MAP", "a=")
    assert main(["serve", "--backend", "echo"]) == 2
    assert capsys.readouterr().err.startswith("error: LLM_NODE_UPSTREAM_MODEL_MAP: ")
    clean_env.setenv("LLM_NODE_UPSTREAM_MODEL_MAP", "qwen=Qwen/Qwen2.5,llama3")
    assert _serve_config().upstream_model_map == {"qwen": "Qwen/Qwen2.5", "llama3": "llama3"}


def test_new_knobs_reach_the_config(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LLM_NODE_SHUTDOWN_GRACE", "12")
    config = _serve_config(
        "--max-sessions", "5", "--init-burst", "3", "--init-refill", "0.5",
        "--n-gpu-layers", "20", "--default-max-tokens", "64", "--default-temperature", "0.1",
        "--trusted-proxies", "10.0.0.0/8,::1",
    )  # fmt: skip
    assert (
        config.max_sessions,
        config.init_burst,
        config.init_refill_per_s,
        config.n_gpu_layers,
        config.default_max_tokens,
        config.default_temperature,
        config.shutdown_grace_s,
        config.trusted_proxies,
    ) == (5, 3, 0.5, 20, 64, 0.1, 12.0, ("10.0.0.0/8", "::1/128"))


def test_serve_help_shows_variables_and_defaults(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[LLM_NODE_PORT; default: 8080]" in text
    assert "[LLM_NODE_REQUIRE_ENCRYPTION; default: off]" in text
    assert "--no-require-encryption" in text


def test_settings_from_the_environment_can_travel_to_workers(
    clean_env: pytest.MonkeyPatch,
) -> None:
    import pickle

    clean_env.setenv("LLM_NODE_HOST", "127.0.0.1")
    config = _serve_config()
    assert type(config.host) is str
    assert pickle.loads(pickle.dumps(config)) == config


def test_replay_cache_entries_from_flag_and_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _serve_config().replay_cache_entries == 4_000_000
    clean_env.setenv("LLM_NODE_REPLAY_CACHE_ENTRIES", "20000000")
    assert _serve_config().replay_cache_entries == 20_000_000
    assert _serve_config("--replay-cache-entries", "3").replay_cache_entries == 3
    clean_env.setenv("LLM_NODE_REPLAY_CACHE_ENTRIES", "0")
    assert "LLM_NODE_REPLAY_CACHE_ENTRIES: '0' is not" in _serve_error(capsys)


def test_a_replay_cache_too_small_for_its_window_is_warned_about() -> None:
    from node.serve import replay_capacity_warning

    assert replay_capacity_warning(NodeConfig()) is None  # 4,000,000 entries, 24 h: 23.1/s
    warning = replay_capacity_warning(NodeConfig(replay_cache_entries=1_000_000))
    assert warning is not None
    assert "only 5.79 new encrypted sessions per second" in warning
    assert "--replay-cache-entries" in warning
    assert replay_capacity_warning(NodeConfig(replay_cache_entries=1_728_000)) is None  # 10/s
    assert replay_capacity_warning(NodeConfig(replay_cache_entries=1_727_999)) is not None
    assert replay_capacity_warning(NodeConfig(replay_window_s=900.0)) is None  # 555/s


def test_the_node_opens_its_replay_cache_with_the_configured_size(tmp_path: Path) -> None:
    from node.serve import open_replay_cache

    config = NodeConfig(
        ledger_path=str(tmp_path / "ledger.sqlite3"), replay_cache_entries=4, replay_window_s=60.0
    )
    cache = open_replay_cache(config)
    try:
        assert cache.path == tmp_path / "replay-cache.sqlite3"
        assert (cache.max_entries, cache.window_s) == (4, 60.0)
        assert cache.add_all((b"a", b"b")) is None
        assert cache.add_all((b"c", b"d")) is None
        assert cache.add_all((b"e", b"f")) is not None  # full at 4 entries
    finally:
        cache.close()
