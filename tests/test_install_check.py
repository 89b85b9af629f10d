"""scripts/check_shared_python.py: install.sh's warning about an interpreter that a
service account cannot run (a venv built from a Python under /root)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "check_shared_python.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_shared_python", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreter(root: Path, home_mode: int, file_mode: int = 0o755) -> Path:
    home = root / "home"
    bin_dir = home / "pyenv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python3"
    python.write_text("#!/bin/sh\n", encoding="ascii")
    python.chmod(file_mode)
    (bin_dir.parent).chmod(0o755)
    bin_dir.chmod(0o755)
    home.chmod(home_mode)
    root.chmod(0o755)
    return python


def test_a_private_home_is_reported(tmp_path: Path) -> None:
    python = _interpreter(tmp_path / "a", home_mode=0o700)
    link = tmp_path / "venv-python"
    link.symlink_to(python)
    # Only what lies under this test's directory (pytest's own base may be private).
    problems = [p for p in _module().blockers(link) if str(tmp_path / "a") in p]
    assert problems == [
        f"{python.parent.parent.parent} cannot be entered by other users (mode 700)"
    ]


def test_an_unreadable_interpreter_is_reported(tmp_path: Path) -> None:
    python = _interpreter(tmp_path / "b", home_mode=0o755, file_mode=0o750)
    [problem] = [p for p in _module().blockers(python) if str(tmp_path / "b") in p]
    assert "is not readable and executable by other users (750)" in problem


def test_the_script_exits_1_with_the_advice(tmp_path: Path) -> None:
    python = _interpreter(tmp_path / "d", 0o700)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(python)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert "cannot be entered by other users" in run.stderr
    assert "see docs/DEPLOYMENT.md" in run.stderr


def test_a_shared_interpreter_has_no_blockers() -> None:
    shared = Path("/bin/sh")
    if not shared.exists():  # pragma: no cover - every POSIX system has it
        return
    assert _module().blockers(shared) == []


def test_install_sh_runs_the_check() -> None:
    text = (REPO_ROOT / "scripts" / "install.sh").read_text(encoding="utf-8")
    assert ".venv/bin/python scripts/check_shared_python.py" in text
