"""Run every example marked ``<!-- runnable -->`` in the documentation and check its output.

Each document gets its own node: ``python -m node serve --backend echo --port 0`` on
127.0.0.1 with the example host key of docs/API.md and a ledger in a temporary
directory. The examples see ``$NODE_URL`` (the node's base URL) and ``$LLM_NODE_DATA_DIR``
(the directory of that ledger, so ``llm-node receipts`` finds it); in a document whose
examples use an OpenAI client, an ``llm-node proxy`` runs in front of that node and the
examples see ``$OPENAI_BASE_URL`` (its ``/v1``) and ``$OPENAI_API_KEY``, as the README's
tour exports them. They run in document order in a scratch directory, with the
virtualenv's ``bin`` first on ``PATH``. Every process is bounded by a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx
import pytest

from tests.docs._markdown import (
    DOCS,
    Example,
    MarkdownError,
    load_generator,
    output_matches,
    runnable_examples,
)
from tests.support.nodeproc import echo_node_process, proxy_process

STARTUP_S = 60.0
EXAMPLE_S = 60.0
# The example host key of docs/API.md, so outputs that show the host key are the same as
# the generated ones.
DOCS_HOST_KEY: str = load_generator().HOST_KEY_HEX
WITH_EXAMPLES = [d for d in DOCS if runnable_examples(d)]


@attrs.define
class DocNode:
    url: str
    data_dir: Path
    log: list[str]
    proxy_url: str | None = None


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOST_PRIVATE_KEY", "LLM_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture
def doc_node(tmp_path: Path) -> Iterator[DocNode]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = _clean_env()
    env["HOST_PRIVATE_KEY"] = DOCS_HOST_KEY
    with echo_node_process(data_dir / "ledger.sqlite3", env, startup_s=STARTUP_S) as (url, log):
        health = httpx.get(url + "/v1/health", timeout=10)
        assert health.status_code == 200
        yield DocNode(url, data_dir, log)


def uses_proxy(doc: str) -> bool:
    return any("OPENAI_BASE_URL" in e.code or "OpenAI(" in e.code for e in runnable_examples(doc))


@contextmanager
def doc_proxy(node: DocNode, doc: str) -> Iterator[None]:
    """``llm-node proxy`` in front of the document's node, for examples that use it."""
    if not uses_proxy(doc):
        yield
        return
    with proxy_process(node.url, _clean_env(), startup_s=STARTUP_S) as (url, log):
        node.proxy_url = url
        try:
            yield
        finally:
            node.proxy_url = None
            node.log.extend(["--- proxy log:\n", *log])


def run_example(example: Example, node: DocNode, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = _clean_env()
    env["NODE_URL"] = node.url
    env["LLM_NODE_DATA_DIR"] = str(node.data_dir)
    if node.proxy_url is not None:
        # What the README's tour exports for OpenAI clients.
        env["OPENAI_BASE_URL"] = node.proxy_url + "/v1"
        env["OPENAI_API_KEY"] = "unused"
    if example.lang == "sh":
        command = ["bash", "-e", "-o", "pipefail", "-c", example.code]
    else:
        script = workdir / f"example_{example.line}.py"
        script.write_text(example.code + "\n", encoding="utf-8")
        command = [sys.executable, str(script)]
    return subprocess.run(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        timeout=EXAMPLE_S,
        check=False,
    )


@pytest.mark.parametrize("doc", WITH_EXAMPLES)
def test_runnable_examples(doc: str, doc_node: DocNode, tmp_path: Path) -> None:
    uses_curl = any(e.lang == "sh" and "curl " in e.code for e in runnable_examples(doc))
    if uses_curl and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    workdir = Path(tempfile.mkdtemp(dir=tmp_path))
    failures: list[str] = []
    with doc_proxy(doc_node, doc):
        for example in runnable_examples(doc):
            result = run_example(example, doc_node, workdir)
            problems = []
            if result.returncode != example.exit_code:
                problems.append(f"exit status {result.returncode}, documented {example.exit_code}")
            if not output_matches(example.expected, result.stdout, example.mode):
                problems.append(f"output differs ({example.mode})")
            if problems:
                failures.append(
                    f"{example.where}: {'; '.join(problems)}\n--- documented:\n"
                    f"{example.expected}\n--- actual:\n{result.stdout}"
                )
    assert not failures, "\n\n".join(failures) + "\n--- node log:\n" + "".join(doc_node.log)


def test_the_main_documents_keep_their_runnable_examples() -> None:
    counts = {doc: len(runnable_examples(doc)) for doc in DOCS}
    assert counts["README.md"] >= 4
    assert counts["docs/API.md"] >= 5
    assert counts["docs/TROUBLESHOOTING.md"] >= 3


def test_runnable_marker_needs_an_output_block() -> None:
    bad = "<!-- runnable -->\n```sh\necho hi\n```\nno output block\n"
    with pytest.raises(MarkdownError, match="needs <!-- output"):
        runnable_examples("inline", bad)
    good = "<!-- runnable -->\n```sh\nexit 3\n```\n<!-- output: exact, exit=3 -->\n```text\n```\n"
    (example,) = runnable_examples("inline", good)
    assert example.exit_code == 3
    assert example.code == "exit 3"


def test_output_matching_rules() -> None:
    assert output_matches("a\nb", "a  \nb\n\n", "exact")
    assert not output_matches("a\nb", "a\nc", "exact")
    assert output_matches("key 0x...\nend", "key 0xABC\nmore\nend", "ellipsis")
    assert not output_matches("key 0x...\nend", "key 0xABC\nmore", "ellipsis")
    assert not output_matches("a (b)", "a b", "ellipsis")  # the rest is literal
