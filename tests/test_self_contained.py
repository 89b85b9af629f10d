"""The repository stands alone: tests read nothing beside it, and the guard that makes
sure of that (``tests/conftest.py``) really refuses such reads."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import GUARD, REPO_ROOT, VECTORS, OutsideRepositoryRead, ReadGuard, load_vector

# Where the vectors used to live: a folder beside the checkout.
OLD_VECTORS = REPO_ROOT.parent / "shared" / "vectors" / "sdk" / "session_init_dev.json"


def test_an_open_beside_the_repository_is_refused_and_recorded() -> None:
    with pytest.raises(OutsideRepositoryRead, match="outside the repository"):
        OLD_VECTORS.read_text(encoding="utf-8")
    assert GUARD.take() == [str(OLD_VECTORS)]


def test_relative_paths_and_low_level_opens_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    relative = os.path.join("..", "shared", "vectors")
    with pytest.raises(OutsideRepositoryRead):
        open(os.path.join(relative, "x.json"), "rb")  # noqa: SIM115
    with pytest.raises(OutsideRepositoryRead):
        os.open(os.path.join(relative, "x.json"), os.O_RDONLY)
    with pytest.raises(OutsideRepositoryRead):
        os.listdir(relative)
    with pytest.raises(OutsideRepositoryRead):
        os.scandir(str(REPO_ROOT.parent))
    # Climbing out and back in is still inside.
    inside = os.path.join("..", REPO_ROOT.name, "pyproject.toml")
    with open(inside, encoding="utf-8") as f:
        assert "llm-node" in f.read()
    assert len(GUARD.take()) == 4


def test_a_swallowed_refusal_is_still_recorded() -> None:
    try:
        with open(OLD_VECTORS, "rb") as f:
            f.read()
    except Exception:  # what a careless loader might do
        pass
    # The autouse fixture would fail this test with the recorded path; take it here.
    assert GUARD.take() == [str(OLD_VECTORS)]


def test_reads_inside_the_repository_and_elsewhere_are_allowed(tmp_path: Path) -> None:
    assert load_vector("sdk/session_init_dev.json")["cases"]
    (tmp_path / "scratch.txt").write_text("ok", encoding="utf-8")
    assert (tmp_path / "scratch.txt").read_text(encoding="utf-8") == "ok"
    with open(os.__file__, encoding="utf-8") as f:  # the standard library
        assert f.read(1)
    db = sqlite3.connect(tmp_path / "x.sqlite3")
    db.close()
    assert GUARD.take() == []


def test_the_fence_follows_the_repository_not_the_temporary_folder(tmp_path: Path) -> None:
    # A clone inside the temporary folder (as CI makes one) must not read its siblings,
    # although the temporary folder itself is allowed for a clone elsewhere.
    repo = tmp_path / "clone" / "llm-node"
    guard = ReadGuard(repo)
    assert guard.forbidden(str(tmp_path / "clone" / "shared" / "vectors" / "a.json"))
    assert guard.forbidden(str(tmp_path / "clone"))
    assert not guard.forbidden(str(repo / "tests" / "vectors" / "a.json"))
    assert not guard.forbidden(str(tmp_path / "elsewhere.txt"))  # not beside the clone
    assert not guard.forbidden(os.__file__)
    here = ReadGuard(REPO_ROOT)
    assert here.forbidden(str(OLD_VECTORS))
    assert not here.forbidden(str(VECTORS / "sdk" / "session_init_dev.json"))


def test_a_test_that_reads_outside_fails_the_run(tmp_path: Path) -> None:
    """Run pytest on a tiny project whose only test reads beside it: the run fails, even
    though the test catches the error, and the report names the path."""
    project = tmp_path / "proj" / "repo"
    (project / "tests").mkdir(parents=True)
    sibling = tmp_path / "proj" / "shared"
    sibling.mkdir()
    (sibling / "data.txt").write_text("secret", encoding="utf-8")
    conftest = (REPO_ROOT / "tests" / "conftest.py").read_text(encoding="utf-8")
    (project / "tests" / "conftest.py").write_text(conftest, encoding="utf-8")
    (project / "tests" / "__init__.py").write_text("", encoding="utf-8")
    (project / "tests" / "test_reads.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            def test_reads_beside() -> None:
                try:
                    Path(__file__).parents[2].joinpath("shared", "data.txt").read_text()
                except Exception:
                    pass
            """
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(project)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "read outside the repository" in done.stdout
    assert str(sibling / "data.txt") in done.stdout
