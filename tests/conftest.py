"""Shared fixtures: where the shared test vectors live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS = REPO_ROOT.parent / "shared" / "vectors"


def load_vector(relative: str) -> Any:
    path = VECTORS / relative
    if not path.exists():
        pytest.fail(f"test vectors not found at {path} (CI keeps shared/ beside the checkout)")
    return json.loads(path.read_text(encoding="utf-8"))
