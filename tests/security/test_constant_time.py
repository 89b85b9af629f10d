"""Constant time: comparisons of secrets, MACs, keys, signatures and addresses in node/ go
through ``node.crypto.secret.constant_time_equal`` (or ``SecretBytes.equals``), which are
``hmac.compare_digest`` underneath.

A scan of every module's syntax tree flags each ``==``, ``!=``, ``in`` and ``not in`` whose
operands name something sensitive. Automatic exemptions: comparisons where one side is
``len(...)`` (a size against a size: sizes are public) and comparisons with ``None`` or a
bool. Every other hit must be in :data:`ALLOWED` with the reason it is safe; an entry that
no longer matches any code fails too, so the list cannot rot.
"""

from __future__ import annotations

import ast
import hmac
import json
import re
from pathlib import Path
from typing import Any, Final

import pytest
from coincurve import PrivateKey

import node.crypto.secret as secret_module
from node.crypto.hostkey import HostKey
from node.crypto.secret import SecretBytes, constant_time_equal
from node.protocol.messages import SessionInitAck

from ._support import (
    DEV_HOST_KEY_HEX,
    init_frame,
    outputs,
    protocol_state,
    receive_text,
    refused_code,
    with_payload,
)

NODE_DIR: Final = Path(__file__).resolve().parents[2] / "node"

# Name parts (identifiers split at "_" and camelCase, lowercased) that mark a value whose
# comparison could leak something worth protecting, or that the rule covers by policy.
SENSITIVE: Final = frozenset(
    {
        "key",
        "secret",
        "secrets",
        "private",
        "scalar",
        "mac",
        "hmac",
        "tag",
        "signature",
        "sig",
        "signer",
        "recovery",
        "digest",
        "shared",
        "address",
        "password",
    }
)

# (path under node/, the comparison as ast.unparse writes it) -> why it is safe.
ALLOWED: Final[dict[tuple[str, str], str]] = {
    (
        "cli.py",
        "to_checksum_address(bytes.fromhex(digits)) != '0x' + digits",
    ): "EIP-55 check of an address in the operator's own --allowed-clients setting at "
    "start-up: public data, no secret involved",
    (
        "crypto/session_init.py",
        "key_hex[:2] in ('0x', '0X')",
    ): "format marker: whether the text starts with 0x decides the accepted length, which "
    "the length check answers publicly anyway; no key byte is compared",
    (
        "crypto/session_init.py",
        "buf[_SDK_KEY_END] == _QUOTE",
    ): "the byte after the key's 64 digits in the SDK's layout: JSON structure (a closing "
    "quote or not), never a digit of the key; it only picks which parse path reads the key",
    (
        "protocol/connection.py",
        "data.client_address.lower() not in allowed",
    ): "allow-list membership (a hash lookup) of the address the client just proved; the "
    "answer is sent to that client anyway (SESSION_AUTH_DENIED or an ack)",
    (
        "protocol/v2/server.py",
        "verified.client_address.lower() not in allowed",
    ): "v2's allow-list membership of the address the client just proved by signature, as "
    "in v1; the answer goes to that client anyway",
    (
        "protocol/replay.py",
        "self._digest(key) in self._seen",
    ): "replay cache lookup: SHA-256 of the ephemeral public key and nonce, both sent in "
    "clear in the init",
    (
        "protocol/replay.py",
        "digest in self._seen",
    ): "replay cache lookup, as above",
    (
        "protocol/replay.py",
        "digest in seen",
    ): "replay cache lookup in add_all, as above (a session key's entry is SHA-256 of a "
    "keyed HMAC of it, so a lookup's timing says nothing about the key)",
    (
        "protocol/replay.py",
        "digest in digests[:i]",
    ): "add_all: the same digest given twice in one call, as above",
    (
        "server/shared_replay.py",
        "digest in digests[:i]",
    ): "add_all on a full cache: the same digest given twice in one call, as in protocol/replay.py",
    (
        "server/shared_replay.py",
        "conn.execute(_INSERT, (digest, now, cutoff)).rowcount != 1",
    ): "compares a row count, not the digest; the lookup is SQLite's, as above",
    (
        "settlement/ledger.py",
        "c['signed'] != (1 if signature is not None else 0)",
    ): "compares a stored 0/1 flag with whether a signature exists, not signature bytes",
    (
        "logs.py",
        "key not in _STANDARD",
    ): "log-record attribute names, not key material",
    (
        "inference/openai.py",
        "secret in text",
    ): "scrubs the user's own prompt text out of an upstream error message (a substring "
    "search for redaction, not an authentication decision)",
}

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _parts(identifier: str) -> set[str]:
    return {p.lower() for p in _CAMEL.sub("_", identifier).split("_") if p}


def _names(node: ast.AST) -> set[str]:
    """Name parts an operand mentions (variables, attributes, string subscripts)."""
    found: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found |= _parts(sub.id)
        elif isinstance(sub, ast.Attribute):
            found |= _parts(sub.attr)
        elif (
            isinstance(sub, ast.Subscript)
            and isinstance(sub.slice, ast.Constant)
            and isinstance(sub.slice.value, str)
        ):
            found |= _parts(sub.slice.value)
    return found


def _is_len(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"


def _is_trivial_constant(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool))


def sensitive_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, comparison) for each flagged comparison in ``source``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(_is_trivial_constant(o) or _is_len(o) for o in operands):
            continue
        if any(_names(o) & SENSITIVE for o in operands):
            hits.append((node.lineno, ast.unparse(node)))
    return hits


def _scan() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(NODE_DIR.rglob("*.py")):
        rel = path.relative_to(NODE_DIR).as_posix()
        for line, text in sensitive_comparisons(path.read_text(encoding="utf-8")):
            found.setdefault((rel, text), []).append(line)
    return found


def test_no_sensitive_value_is_compared_with_plain_equality() -> None:
    found = _scan()
    unexplained = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not unexplained, "use constant_time_equal (or justify in ALLOWED): " + "\n".join(
        f"node/{path}:{lines}: {text}" for (path, text), lines in unexplained.items()
    )


def test_every_allowed_exception_still_exists() -> None:
    found = _scan()
    stale = [k for k in ALLOWED if k not in found]
    assert not stale, f"ALLOWED entries that match no code any more: {stale}"


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("a = x.client_address == y", True),
        ("a = session_key != other", True),
        ("a = sig[64] == 27", True),
        ("a = sessionKey == b", True),
        ("a = d['signatureHex'] == b", True),
        ("a = tag in seen", True),
        ("a = len(signature) != 65", False),
        ("a = len(raw) != KEY_SIZE", False),
        ("a = signature is None", False),
        ("a = recovery_key == None", False),
        ("a = price_per_token == 0", False),
        ("a = _ERROR_KEYS == b", False),
        ("a = constant_time_equal(signer, recovery)", False),
    ],
)
def test_the_scanner_flags_what_it_should(source: str, flagged: bool) -> None:
    assert bool(sensitive_comparisons(source)) is flagged


def _calls(function: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)}


def test_the_constant_time_helpers_are_hmac_compare_digest() -> None:
    tree = ast.parse((NODE_DIR / "crypto" / "secret.py").read_text(encoding="utf-8"))
    functions = {
        n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    assert "hmac.compare_digest" in _calls(functions["constant_time_equal"])
    assert "hmac.compare_digest" in _calls(functions["equals"])
    # One implementation: nothing else in node/ calls compare_digest itself.
    users = [
        path.relative_to(NODE_DIR).as_posix()
        for path in NODE_DIR.rglob("*.py")
        if "compare_digest" in path.read_text(encoding="utf-8")
    ]
    assert users == ["crypto/secret.py"]


@pytest.mark.parametrize(
    "module",
    [
        "crypto/session_init.py",
        "protocol/connection.py",
        "client/receiver.py",
        "client/session.py",
        "client/discovery.py",
        "settlement/receipt.py",
        "proxy/server.py",
    ],
)
def test_modules_that_compare_authenticators_use_the_helper(module: str) -> None:
    tree = ast.parse((NODE_DIR / module).read_text(encoding="utf-8"))
    assert "constant_time_equal" in _calls(tree)


def test_secret_bytes_refuse_plain_equality() -> None:
    a, b = SecretBytes(b"\x01" * 32), SecretBytes(b"\x01" * 32)
    with pytest.raises(TypeError):
        _ = a == b
    assert a.equals(b)
    assert a.equals(b"\x01" * 32)
    assert not a.equals(b"\x01" * 31 + b"\x02")
    assert constant_time_equal(b"abc", bytearray(b"abc"))
    assert not constant_time_equal(b"abc", b"abd")


_compare_digest = hmac.compare_digest


class CountingCompare:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls += 1
        return _compare_digest(a, b)


@pytest.mark.parametrize("genuine", [True, False])
def test_the_signature_binding_runs_through_compare_digest(
    genuine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CountingCompare()
    monkeypatch.setattr(secret_module.hmac, "compare_digest", counter)
    host = HostKey.parse(DEV_HOST_KEY_HEX)
    frame, _ = init_frame(host.public_key)
    if not genuine:
        other = PrivateKey(bytes.fromhex("0f" * 32))
        from node.crypto.curve import e2ee_v1_digest, sign_recoverable
        from node.crypto.kdf import ZERO_SALT

        digest = e2ee_v1_digest(
            bytes.fromhex(frame["payload"]["ephPubHex"]),
            host.public_key,
            ZERO_SALT,
            bytes.fromhex(frame["payload"]["nonceHex"]),
            b"",
            b"",
        )
        frame = with_payload(frame, signatureHex=sign_recoverable(other, digest))
    actions = receive_text(protocol_state(host), json.dumps(frame))
    if genuine:
        assert isinstance(outputs(actions)[-1], SessionInitAck)
    else:
        assert refused_code(actions) == "INVALID_SIGNATURE"
    assert counter.calls >= 1
