"""Reading the documentation: runnable blocks, tables, headings, links.

A runnable example is a fenced ``sh`` or ``python`` block right after a line
``<!-- runnable -->``, followed by a line ``<!-- output: MODE -->`` or
``<!-- output: MODE, exit=N -->`` and a fenced ``text`` block with the expected output
(standard output and standard error together). MODE is ``exact`` (the same lines, trailing
spaces ignored) or ``ellipsis`` (``...`` stands for any text, also across lines).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import attrs

from tests.conftest import REPO_ROOT

RUNNABLE = "<!-- runnable -->"
_OUTPUT = re.compile(r"<!-- output: (exact|ellipsis)(?:, exit=(\d+))? -->")
_FENCE = re.compile(r"```([a-z]*)\s*$")
LANGUAGES = ("sh", "python")

#: The documents this package checks (docs/BENCHMARKS.md belongs to the benchmark script).
DOCS = (
    "README.md",
    "docs/API.md",
    "docs/PROTOCOL.md",
    "docs/DEPLOYMENT.md",
    "docs/ENCRYPTION_MIGRATION.md",
    "docs/ENCRYPTION_SECURITY.md",
    "docs/PROTOCOL_V2.md",
    "docs/TROUBLESHOOTING.md",
)


def load_generator() -> ModuleType:
    """``scripts/gen_api_examples.py`` as a module (scripts/ is not a package)."""
    loaded = sys.modules.get("gen_api_examples")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        "gen_api_examples", REPO_ROOT / "scripts" / "gen_api_examples.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_api_examples"] = module
    spec.loader.exec_module(module)
    return module


def doc_path(name: str) -> Path:
    return REPO_ROOT / name


def read_doc(name: str) -> str:
    return doc_path(name).read_text(encoding="utf-8")


@attrs.frozen
class Example:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str
    exit_code: int
    expected: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


class MarkdownError(ValueError):
    pass


def _fenced(lines: list[str], start: int, doc: str) -> tuple[str, str, int]:
    """The fenced block opening at ``lines[start]``: (language, body, index after it)."""
    match = _FENCE.fullmatch(lines[start].strip()) if start < len(lines) else None
    if match is None:
        raise MarkdownError(f"{doc}:{start + 1}: expected a fenced code block")
    body: list[str] = []
    i = start + 1
    while i < len(lines) and lines[i].strip() != "```":
        body.append(lines[i])
        i += 1
    if i == len(lines):
        raise MarkdownError(f"{doc}:{start + 1}: code block is not closed")
    return match.group(1), "\n".join(body), i + 1


def runnable_examples(doc: str, text: str | None = None) -> list[Example]:
    lines = (read_doc(doc) if text is None else text).splitlines()
    out: list[Example] = []
    i = 0
    in_fence = False
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        if in_fence or stripped != RUNNABLE:
            i += 1
            continue
        lang, code, after = _fenced(lines, i + 1, doc)
        if lang not in LANGUAGES:
            raise MarkdownError(f"{doc}:{i + 2}: a runnable block must be one of {LANGUAGES}")
        marker = _OUTPUT.fullmatch(lines[after].strip()) if after < len(lines) else None
        if marker is None:
            raise MarkdownError(
                f"{doc}:{after + 1}: a runnable block needs <!-- output: exact|ellipsis --> "
                "and an output block right after it"
            )
        out_lang, expected, end = _fenced(lines, after + 1, doc)
        if out_lang != "text":
            raise MarkdownError(f"{doc}:{after + 2}: the output block must be ```text")
        out.append(
            Example(
                doc=doc,
                line=i + 2,
                lang=lang,
                code=code,
                mode=marker.group(1),
                exit_code=int(marker.group(2) or 0),
                expected=expected,
            )
        )
        i = end
    return out


def normalize(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def output_matches(expected: str, actual: str, mode: str) -> bool:
    want, got = normalize(expected), normalize(actual)
    if mode == "exact":
        return want == got
    pattern = ".*?".join(re.escape(part) for part in want.split("..."))
    return re.fullmatch(pattern, got, re.DOTALL) is not None


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    out: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in headings(text):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def prose(text: str) -> str:
    """The text outside fenced blocks (where links are links)."""
    out: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(line)
    return "\n".join(out)


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """Cells of the markdown table whose first header cell is ``first_header``."""
    rows: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise MarkdownError(f"no table with the header {first_header!r}")
