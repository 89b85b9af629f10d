"""Loading Wycheproof files: every test case flattened with its group, and pytest ids."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import load_vector


@dataclass(frozen=True)
class Case:
    group: dict[str, Any]
    test: dict[str, Any]

    @property
    def tc_id(self) -> int:
        return int(self.test["tcId"])

    @property
    def result(self) -> str:
        return str(self.test["result"])

    @property
    def flags(self) -> list[str]:
        return list(self.test["flags"])

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.test[name])


def load_cases(filename: str) -> tuple[dict[str, Any], list[Case]]:
    """The whole file and its cases in file order."""
    data = load_vector(f"wycheproof/{filename}")
    cases = [Case(group, test) for group in data["testGroups"] for test in group["tests"]]
    assert len(cases) == data["numberOfTests"]
    return data, cases


def params(cases: list[Case]) -> list[Any]:
    """One pytest param per case, its id naming tcId, result and flags."""
    return [
        pytest.param(case, id=f"tc{case.tc_id:03d}-{case.result}-{'+'.join(case.flags) or 'none'}")
        for case in cases
    ]


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
