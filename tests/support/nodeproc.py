"""A node subprocess for tests that drive it like a user: ``python -m node serve``.

The port is chosen by the OS (``--port 0``) and learned from the node's "listening on"
log line, read by a thread (no polling). Leaving the context stops the node with SIGINT
and waits for it.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


@contextmanager
def echo_node_process(
    ledger: Path,
    env: dict[str, str],
    *,
    startup_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[str, list[str]]]:
    """Run an echo-backend node; yields (base URL, the node's log lines so far).
    ``extra_args`` go to ``llm-node serve`` after the others."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "serve",
            "--backend",
            "echo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ledger",
            str(ledger),
            *extra_args,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=startup_s)
            if line is None:
                pytest.fail("the node exited during start-up:\n" + "".join(log))
            match = LISTENING.search(line)
            if match:
                port = int(match.group(1))
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if shutdown hangs
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
