"""The documentation names only things the code has, and names all of them.

- every wire error code appears in docs/TROUBLESHOOTING.md (as a heading), docs/API.md and
  the error table of docs/PROTOCOL.md, which names nothing else;
- every closing code appears in docs/API.md, docs/TROUBLESHOOTING.md and docs/PROTOCOL.md;
- every client-side error code appears in docs/TROUBLESHOOTING.md;
- every flag of ``llm-node serve --help`` is in the flag table of docs/DEPLOYMENT.md with
  its environment variable and default, and the variable really sets the flag;
- every ``LLM_NODE_*`` variable, ``llm_node_*`` metric and command-line flag the documents
  mention exists;
- every relative link points to a file and heading that exist;
- README.md keeps the two fresh-machine commands CI relies on;
- README.md and every document link docs/PROTOCOL.md, and none sends readers to a folder
  outside the repository.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

import node.client.errors as client_errors
from node.cli import Switch, build_parser
from node.client.cli import UsageError
from node.crypto.errors import ErrorCode
from node.server.metrics import NodeMetrics
from tests.conftest import REPO_ROOT
from tests.docs._markdown import (
    DOCS,
    anchors,
    headings,
    prose,
    read_doc,
    table_rows,
)

# --------------------------------------------------------------------------- helpers


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")
    }


def _serve_actions() -> Iterator[argparse.Action]:
    serve = _subparsers(build_parser())["serve"]
    for action in serve._actions:
        if action.option_strings and action.option_strings[0] != "-h":
            yield action


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("LLM_NODE_"):
            monkeypatch.delenv(name)
    return monkeypatch


# ------------------------------------------------------------------------ error codes


def test_every_wire_error_code_is_documented() -> None:
    trouble = set(headings(read_doc("docs/TROUBLESHOOTING.md")))
    api = read_doc("docs/API.md")
    for code in ErrorCode:
        assert f"`{code.value}`" in trouble, f"TROUBLESHOOTING.md lacks a heading for {code}"
        assert f"`{code.value}`" in api, f"API.md does not mention {code}"


def test_protocol_lists_every_wire_error_code_and_nothing_else() -> None:
    rows = table_rows(read_doc("docs/PROTOCOL.md"), "Code")
    listed = [re.fullmatch(r"`([A-Z_]+)`", cells[0]) for cells in rows]
    assert all(listed), f"bad code cells in PROTOCOL.md: {[r[0] for r in rows]}"
    codes = [m.group(1) for m in listed if m]
    assert sorted(codes) == sorted(c.value for c in ErrorCode)
    assert all(len(cells) == 2 and cells[1] for cells in rows), "a code without its reason"


def test_every_client_error_code_is_documented() -> None:
    codes = {
        cls.code
        for cls in vars(client_errors).values()
        if isinstance(cls, type) and issubclass(cls, client_errors.ClientError)
    }
    codes.add(UsageError.code)
    trouble = set(headings(read_doc("docs/TROUBLESHOOTING.md")))
    missing = sorted(c for c in codes if f"`{c}`" not in trouble)
    assert not missing, f"TROUBLESHOOTING.md lacks headings for {missing}"


def test_troubleshooting_names_no_unknown_codes() -> None:
    known = {c.value for c in ErrorCode} | {
        cls.code
        for cls in vars(client_errors).values()
        if isinstance(cls, type) and issubclass(cls, client_errors.ClientError)
    }
    known.add(UsageError.code)
    for heading in headings(read_doc("docs/TROUBLESHOOTING.md")):
        match = re.fullmatch(r"`([A-Z_]+)`", heading)
        if match:
            assert match.group(1) in known, f"TROUBLESHOOTING.md documents unknown {heading}"


def test_closing_codes_are_documented() -> None:
    for doc in ("docs/API.md", "docs/TROUBLESHOOTING.md", "docs/PROTOCOL.md"):
        text = read_doc(doc)
        for code in ("1000", "1001", "1008", "1009"):
            assert re.search(rf"^\| {code}\b", text, re.M), f"{doc} lacks close code {code}"


# ----------------------------------------------------------------------- serve flags


def _flag_table() -> dict[str, tuple[str, str]]:
    rows = table_rows(read_doc("docs/DEPLOYMENT.md"), "Flag")
    table: dict[str, tuple[str, str]] = {}
    for cells in rows:
        flag = re.fullmatch(r"`(--[a-z0-9-]+)`", cells[0])
        env = re.fullmatch(r"`(LLM_NODE_[A-Z0-9_]+)`", cells[1])
        assert flag is not None, f"bad flag cell {cells[0]!r}"
        assert env is not None, f"bad environment cell {cells[1]!r}"
        assert flag.group(1) not in table, f"{flag.group(1)} is listed twice"
        table[flag.group(1)] = (env.group(1), cells[2])
    return table


def test_deployment_lists_every_serve_flag_and_nothing_else() -> None:
    assert set(_flag_table()) == {a.option_strings[0] for a in _serve_actions()}


def _sample(action: argparse.Action) -> tuple[str, object]:
    """An environment value for ``action`` that differs from its default, and its parse."""
    if isinstance(action, argparse._StoreTrueAction | Switch):
        return "yes", True
    if action.choices:
        choice = next(c for c in action.choices if c != action.default)
        return str(choice), choice
    if callable(action.type):
        # Numeric flags parse their text (argparse applies ``type`` to env defaults too).
        for text in ("2048", "7.5"):
            try:
                return text, action.type(text)
            except (ValueError, argparse.ArgumentTypeError):
                continue
    return "sample-value", "sample-value"


def test_each_environment_variable_sets_its_flag(clean_env: pytest.MonkeyPatch) -> None:
    table = _flag_table()
    for action in _serve_actions():
        env_name, _ = table[action.option_strings[0]]
        assert env_name == "LLM_NODE_" + action.option_strings[0][2:].upper().replace("-", "_")
        text, expected = _sample(action)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(env_name, text)
            args = build_parser().parse_args(["serve"])
        assert getattr(args, action.dest) == expected, f"{env_name} does not set {action.dest}"


def test_documented_defaults_are_the_real_defaults(clean_env: pytest.MonkeyPatch) -> None:
    table = _flag_table()
    for action in _serve_actions():
        flag = action.option_strings[0]
        cell = table[flag][1]
        default = action.default
        if isinstance(default, str) and callable(action.type):
            default = action.type(default)  # what argparse turns a text default into
        if cell == "unset":
            assert default is None, f"{flag}: documented unset, default is {default!r}"
        elif cell == "off":
            assert default is False, f"{flag}: documented off, default is {default!r}"
        else:
            value = re.fullmatch(r"`([^`]+)`", cell)
            assert value is not None, f"{flag}: default cell {cell!r}"
            parsed = action.type(value.group(1)) if callable(action.type) else value.group(1)
            assert parsed == default, f"{flag}: documented {cell}, default is {default!r}"


# --------------------------------------------------------- names the documents use


def _all_docs() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        yield doc, read_doc(doc)


def _known_env_vars() -> set[str]:
    known = {
        "LLM_NODE_" + a.option_strings[0][2:].upper().replace("-", "_") for a in _serve_actions()
    }
    for path in (REPO_ROOT / "node").rglob("*.py"):
        known |= set(re.findall(r"LLM_NODE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    for path in (REPO_ROOT / "scripts").glob("*.sh"):
        known |= set(re.findall(r"LLM_NODE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    return known


def test_every_environment_variable_mentioned_exists() -> None:
    known = _known_env_vars()
    for doc, text in _all_docs():
        for name in set(re.findall(r"LLM_NODE_[A-Z0-9_]+", text)):
            if name == "LLM_NODE_":  # the prefix itself, as in LLM_NODE_<FLAG>
                continue
            assert name in known, f"{doc} mentions {name}, which the code does not read"


def test_every_metric_mentioned_exists() -> None:
    rendered = NodeMetrics().render()
    names = set(re.findall(r"^# TYPE (\S+)", rendered, re.M))
    for doc, text in _all_docs():
        for name in set(re.findall(r"\bllm_node_[a-z_]+", text)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in names or name in names, f"{doc} mentions unknown metric {name}"


def test_every_metric_is_documented_in_the_api() -> None:
    names = set(re.findall(r"^# TYPE (\S+)", NodeMetrics().render(), re.M))
    table = {
        re.sub(r"\{.*", "", row[0].strip("`"))
        for row in table_rows(read_doc("docs/API.md"), "Metric")
    }
    assert names == table


_COMMAND = re.compile(
    r"(?:llm-node|run-node\.sh)\s*(serve|chat|keygen|pubkey|receipts\s+\w+)?([^`|\n]*)"
)


def _command_lines(text: str) -> Iterator[tuple[str, str]]:
    """(sub-command, rest of line) for every line that runs llm-node or run-node.sh."""
    for line in text.splitlines():
        for match in _COMMAND.finditer(line):
            sub = match.group(1) or ""
            if "run-node.sh" in match.group(0):
                sub = "serve"
            yield sub, match.group(2)


def test_flags_in_documented_commands_exist() -> None:
    parsers = _subparsers(build_parser())
    receipts = _subparsers(parsers["receipts"])
    for doc, text in _all_docs():
        for sub, rest in _command_lines(text):
            if not sub:
                continue
            parser = receipts[sub.split()[1]] if sub.startswith("receipts") else parsers[sub]
            valid = _long_flags(parser)
            # Stop at the end of the command (a comment, a parenthesis, a sentence).
            command = re.split(r"[)]|\s#|\. ", rest)[0]
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command):
                assert flag in valid, f"{doc}: `{sub}` has no flag {flag} ({rest.strip()})"


# ------------------------------------------------------------------------------- links


def test_relative_links_and_anchors_resolve() -> None:
    for doc, text in _all_docs():
        base = (REPO_ROOT / doc).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else REPO_ROOT / doc
            assert file.exists(), f"{doc}: link to missing {target}"
            if anchor:
                assert file.suffix == ".md", f"{doc}: anchor on a non-markdown file {target}"
                assert anchor in anchors(file.read_text(encoding="utf-8")), (
                    f"{doc}: no heading for #{anchor} in {file.name}"
                )


def test_readme_keeps_the_two_fresh_machine_commands() -> None:
    readme = read_doc("README.md")
    for command in (
        "./scripts/install.sh && ./scripts/run-node.sh",
        "./scripts/install.sh --dev && ./scripts/test.sh",
    ):
        assert f"```sh\n{command}\n```" in readme


def test_readme_links_every_document() -> None:
    readme = read_doc("README.md")
    for doc in DOCS[1:]:
        assert f"]({doc})" in readme, f"README.md does not link {doc}"


def test_every_document_links_the_protocol() -> None:
    for doc, text in _all_docs():
        if doc == "docs/PROTOCOL.md":
            continue
        target = "docs/PROTOCOL.md" if doc == "README.md" else "PROTOCOL.md"
        assert re.search(rf"\]\({re.escape(target)}(#[^)]*)?\)", prose(text)), (
            f"{doc} does not link {target}"
        )


def test_no_document_points_outside_the_repository() -> None:
    """A reader of a fresh clone has nothing beside it: no ``../`` paths that leave the
    repository, and no mention of the folder beside the checkout where the contract and the
    vectors used to live."""
    old_home = "shared" + "/"  # spelled so that grepping the repository for it finds nothing
    for doc, text in _all_docs():
        assert old_home not in text, f"{doc} refers to {old_home}"
        base = (REPO_ROOT / doc).parent
        for target in re.findall(r"\]\(([^)\s#]+)", prose(text)):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (base / target).resolve()
            assert resolved.is_relative_to(REPO_ROOT), f"{doc} links {target}, outside"
