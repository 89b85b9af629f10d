"""The protocol core is sans-I/O: nothing under node/protocol imports Trio (or sockets)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import node.protocol

PROTOCOL_DIR = Path(node.protocol.__file__).parent
FORBIDDEN = {"trio", "trio_websocket", "socket", "asyncio", "h11", "httpx"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            names.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            names.add(item.module)
    return names


def test_sources_do_not_import_io_modules() -> None:
    sources = sorted(PROTOCOL_DIR.rglob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & FORBIDDEN, f"{path.name} imports {sorted(roots & FORBIDDEN)}"


def test_the_scanner_sees_imports() -> None:
    found = imported_modules(PROTOCOL_DIR / "connection.py")
    assert "node.crypto.aead" in found or "node.crypto" in found
    assert "attrs" in found


def test_importing_the_protocol_does_not_load_trio() -> None:
    code = (
        "import sys, node.protocol, node.protocol.connection, node.protocol.messages, "
        "node.protocol.requests, node.protocol.replay; "
        "print(sorted(m for m in ('trio', 'trio_websocket') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
