"""Shared fixtures: where the test vectors live, and a guard against reading outside.

Every file a test reads lives inside this repository (the vectors are in
``tests/vectors/``). A test that opens a path beside the checkout (a folder next to the
clone, another clone) would pass on a developer's machine and fail on a fresh clone, so this
module installs an audit hook (``sys.addaudithook``) that refuses such opens: the open
raises :class:`OutsideRepositoryRead` and the test that caused it fails, even if the
exception was caught and swallowed.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS = REPO_ROOT / "tests" / "vectors"


def load_vector(relative: str) -> Any:
    """A JSON file under ``tests/vectors/`` (see the README there for each file's source)."""
    path = VECTORS / relative
    if not path.exists():
        pytest.fail(f"test vector file {path} is missing from the repository")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------ outside-read guard


class OutsideRepositoryRead(RuntimeError):
    """A test opened a path beside the repository (not an OSError: ``except OSError``
    must not hide it)."""


# The audit events that name a path the process is about to read or list.
_EVENTS: Final = frozenset({"open", "os.listdir", "os.scandir"})


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ReadGuard:
    """Refuses opens of paths under the repository's parent folder but outside the
    repository itself.

    Paths elsewhere (the interpreter, the virtual environment, site-packages, the
    temporary folder, ``/proc``, ``/dev``) stay allowed, as long as that allowed folder
    does not contain the repository's parent: a checkout in ``/tmp/x/llm-node`` must
    still not read ``/tmp/x/shared``. Violations are also recorded, so that one whose
    exception was swallowed still fails its test.
    """

    def __init__(self, repo: Path) -> None:
        self.repo = os.path.normpath(str(repo))
        self.fence = os.path.dirname(self.repo)
        allowed = {self.repo, os.path.realpath(self.repo)}
        venv = os.path.join(self.repo, ".venv")
        candidates = [
            venv,
            os.path.realpath(venv),
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            os.path.realpath(sys.prefix),
            tempfile.gettempdir(),
            "/proc",
            "/dev",
            "/sys",
            *(p for p in sysconfig.get_paths().values() if p),
        ]
        for root in candidates:
            root = os.path.normpath(root)
            if not _is_under(self.fence, root):
                allowed.add(root)
        self.allowed: tuple[str, ...] = tuple(sorted(allowed))
        self.violations: list[str] = []
        self.stray: list[str] = []  # recorded outside any test (collection, fixtures' setup)
        self.active = True

    def forbidden(self, path: str) -> bool:
        """Whether reading ``path`` (absolute or relative to the working folder) is refused."""
        full = os.path.normpath(os.path.join(os.getcwd(), path))
        if not _is_under(full, self.fence):
            return False
        return not any(_is_under(full, root) for root in self.allowed)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in _EVENTS or not self.active or not args:
            return
        target = args[0]
        if isinstance(target, int) or target is None:
            return  # a file descriptor (already open) or the working folder
        try:
            path = os.fsdecode(target)
        except TypeError:
            return
        if self.forbidden(path):
            self.violations.append(path)
            raise OutsideRepositoryRead(
                f"a test read {path!r}, which is outside the repository {self.repo}; "
                "every file tests need must live inside it (see tests/vectors/)"
            )

    def take(self) -> list[str]:
        """The violations recorded so far, clearing them."""
        taken, self.violations = self.violations, []
        return taken


GUARD = ReadGuard(REPO_ROOT)
sys.addaudithook(GUARD.hook)  # an audit hook cannot be removed: GUARD.active switches it


@pytest.fixture(autouse=True)
def _no_reads_outside_the_repository() -> Iterator[None]:
    GUARD.stray += GUARD.take()  # recorded between tests: the session hook reports it
    yield
    violations = GUARD.take()
    if violations:
        pytest.fail(f"this test read outside the repository: {violations}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    violations = GUARD.stray + GUARD.take()
    if violations:
        print(f"\nfiles outside the repository were read: {violations}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
