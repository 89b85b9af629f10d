"""Warn when an interpreter could not be run by another user (a service account).

``scripts/install.sh`` runs this on the virtual environment's interpreter: a venv built
from a Python under a private home directory (pyenv in ``/root`` or ``/home/me``) links
to an interpreter that the service user cannot reach, and systemd then fails with
``203/EXEC`` (or a shell with exit status 126). Usage: ``check_shared_python.py PATH``;
exit status 1 (and the reasons on standard error) when other users cannot run it.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path


def blockers(interpreter: Path, stdlib: Path | None = None) -> list[str]:
    """Why users other than the owner cannot run ``interpreter`` (empty: they can)."""
    problems: list[str] = []
    real = interpreter.resolve()
    mode = stat.S_IMODE(real.stat().st_mode)
    if mode & 0o005 != 0o005:
        problems.append(f"{real} is not readable and executable by other users ({mode:o})")
    paths = [real.parent, *real.parents]
    if stdlib is not None:
        stdlib = stdlib.resolve()
        paths += [stdlib, *stdlib.parents]
    seen: set[Path] = set()
    for directory in paths:
        if directory in seen:
            continue
        seen.add(directory)
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & 0o001:
            problems.append(f"{directory} cannot be entered by other users (mode {mode:o})")
    return problems


def main(argv: list[str]) -> int:
    target = Path(argv[1] if len(argv) > 1 else sys.executable)
    stdlib = Path(sys.base_prefix) / "lib" if len(argv) <= 1 else None
    problems = blockers(target, stdlib)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if problems:
        print(
            "warning: a service user (systemd's User=) cannot run this interpreter; build "
            "the venv from a system-wide Python (e.g. PYTHON=/usr/bin/python3.12), see "
            "docs/DEPLOYMENT.md",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
