"""``serve --workers 2`` as an operator runs it: one socket, whole-node metrics, restarts.

Each test starts the real command line in a subprocess on an OS-chosen port, reads its
log from a thread (bounded waits, no sleeps) and stops it with SIGTERM.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from node.crypto.hostkey import HostKey
from node.settlement.ledger import Ledger
from tests.conftest import REPO_ROOT
from tests.support.wire import SDK_HOST_KEY, wire_client

pytestmark = pytest.mark.slow

STARTUP_S = 90.0
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+).*pid=(\d+)")
WORKER_STARTED = re.compile(r"worker started \[worker=(\d+) worker_pid=(\d+)\]")
SESSION_PID = re.compile(r"session started .*session=(\S+) .*pid=(\d+)\]")


class NodeLog:
    """The node's standard error, line by line, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._proc = proc
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = STARTUP_S) -> re.Match[str]:
        """The next line (after those already read) that matches ``pattern``."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                pytest.fail("the node exited:\n" + "".join(self.lines))
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def text(self) -> str:
        return "".join(self.lines)


def _command(ledger: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "node", "serve", "--backend", "echo", "--host", "127.0.0.1",
        "--ledger", str(ledger), *extra,
    ]  # fmt: skip


@contextmanager
def workers_node(ledger: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], NodeLog]]:
    env = {**os.environ, "HOST_PRIVATE_KEY": SDK_HOST_KEY}
    proc = subprocess.Popen(
        _command(ledger, "--workers", "2", "--port", "0", *extra),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    log = NodeLog(proc)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover - only if shutdown hangs
                proc.kill()
                proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()


def _both_listening(log: NodeLog) -> tuple[int, set[int]]:
    pids = set()
    port = 0
    while len(pids) < 2:
        match = log.wait_for(LISTENING)
        port = int(match.group(1))
        pids.add(int(match.group(2)))
    return port, pids


def _metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def _sessions(port: int, count: int, first: int = 0, hold: bool = False) -> None:
    """``count`` encrypted sessions with one request each, on concurrent connections."""
    host = HostKey.parse(SDK_HOST_KEY)
    url = f"ws://127.0.0.1:{port}/v1/ws"
    done = trio.Event() if hold else None

    async def one(i: int) -> None:
        async with wire_client(url) as client:
            await client.init_encrypted(host.public_key, session_id=str(i), job_id=i)
            text, _ = await client.ask_encrypted(f"hello {i}")
            assert text == f"hello {i}"
            if done is not None:
                await done.wait()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(first, first + count):
                nursery.start_soon(one, i)


def _session_pids(log: NodeLog, count: int) -> dict[str, int]:
    out = {}
    while len(out) < count:
        match = log.wait_for(SESSION_PID, timeout=30)
        out[match.group(1)] = int(match.group(2))
    return out


def _poll(check: Callable[[], bool], what: str, tries: int = 600) -> None:
    """Bounded polling of something another process changes (no fixed sleeps)."""
    event = threading.Event()
    for _ in range(tries):
        if check():
            return
        event.wait(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_every_scrape_reports_the_whole_node(tmp_path: Path) -> None:
    with workers_node(tmp_path / "ledger.sqlite3") as (proc, log):
        port, worker_pids = _both_listening(log)
        total = 0
        served_by: set[int] = set()
        for _ in range(10):  # bounded: until both workers have served sessions
            trio.run(_sessions, port, 8, total)
            served_by |= set(_session_pids(log, 8).values())
            total += 8
            if served_by == worker_pids:
                break
        assert served_by == worker_pids, "the kernel never gave the second worker a connection"
        # Each worker publishes at least every second: wait (bounded) until one scrape
        # shows every session, then every further scrape must show the same totals.

        def complete() -> bool:
            return _metrics(port).get('llm_node_inits_accepted_total{mode="encrypted"}') == total

        _poll(complete, "the totals of both workers")
        scrapes = [_metrics(port) for _ in range(6)]
        for samples in scrapes:
            assert samples['llm_node_inits_accepted_total{mode="encrypted"}'] == total
            assert samples["llm_node_connections_total"] == total
            assert samples['llm_node_requests_total{finish_reason="stop"}'] == total
            assert samples["llm_node_worker_restarts_total"] == 0
        # Gauges of live state are summed over live workers: nothing is open now.
        assert scrapes[-1]["llm_node_connections_open"] == 0
        # OpenMetrics when asked for.
        answer = httpx.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10,
        )
        assert answer.headers["content-type"].startswith("application/openmetrics-text")
        assert answer.text.endswith("# EOF\n")
        plain = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.text()


def test_a_killed_worker_is_replaced_and_its_sessions_settled(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    with workers_node(ledger) as (proc, log):
        port, worker_pids = _both_listening(log)

        async def hold_one_session(ready: trio.Event, stop: trio.Event) -> None:
            host = HostKey.parse(SDK_HOST_KEY)
            async with wire_client(f"ws://127.0.0.1:{port}/v1/ws") as client:
                await client.init_encrypted(host.public_key, session_id="777", job_id=7)
                await client.ask_encrypted("before the crash")
                ready.set()
                await stop.wait()

        def kill_the_worker_holding_a_session() -> int:
            victim: list[int] = []

            async def main() -> None:
                ready, stop = trio.Event(), trio.Event()
                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(hold_one_session, ready, stop)
                        await ready.wait()
                        pid = _session_pids(log, 1)["777"]
                        os.kill(pid, signal.SIGKILL)
                        victim.append(pid)
                        nursery.cancel_scope.cancel()

            trio.run(main)
            return victim[0]

        dead = kill_the_worker_holding_a_session()
        assert dead in worker_pids
        log.wait_for(re.compile(rf"worker exited unexpectedly .*worker_pid={dead} "))
        log.wait_for(re.compile(r"wrote receipts for sessions the dead worker left open"))
        new_pid = int(log.wait_for(WORKER_STARTED).group(2))
        assert new_pid not in worker_pids
        log.wait_for(re.compile(rf"listening on .*pid={new_pid}\]"))
        # The port kept serving throughout, and serves now.
        trio.run(_sessions, port, 4, 100)

        def restart_counted() -> bool:
            return _metrics(port).get("llm_node_worker_restarts_total") == 1

        _poll(restart_counted, "the restart counter")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.text()
    with Ledger.open(ledger, recover=False) as opened:
        receipts = {
            r.columns["session_id"]: r.signed_receipt().receipt
            for r in opened.store.iter_receipts()
        }
    assert receipts["777"].end_reason == "recovered_after_restart"
    assert receipts["777"].request_count == 1
    assert {str(i) for i in range(100, 104)} <= set(receipts)


def test_a_second_node_on_the_same_port_is_refused(tmp_path: Path) -> None:
    with workers_node(tmp_path / "ledger.sqlite3") as (_proc, log):
        port, _ = _both_listening(log)
        for workers in ("2", "1"):
            second = subprocess.run(
                _command(tmp_path / "other.sqlite3", "--workers", workers, "--port", str(port)),
                cwd=REPO_ROOT,
                env={**os.environ, "HOST_PRIVATE_KEY": SDK_HOST_KEY},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode == 1, second.stderr
            assert "error: Address already in use" in second.stderr


def test_worker_configuration_errors_exit_2_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [*_command(tmp_path / "l.sqlite3", "--workers", "3"), "--require-encryption"],
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if k != "HOST_PRIVATE_KEY"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("error: --require-encryption needs HOST_PRIVATE_KEY") == 1
    result = subprocess.run(
        [*_command(tmp_path / "l.sqlite3", "--workers", "3"), "--backend", "llama",
         "--model", str(tmp_path / "missing.gguf")],
        cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("error: cannot create the llama backend") == 1
