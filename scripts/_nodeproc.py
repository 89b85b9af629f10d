"""Shared pieces of ``fuzz_node.py`` and ``loadtest.py``: a node subprocess on 127.0.0.1
(OS-chosen port), a WebSocket connection that owns its TCP stream, ``/metrics`` and RSS.

Not a test helper: the scripts run outside pytest, against a real ``python -m node serve``.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


class NodeProcess:
    """A running ``python -m node serve``; its stderr goes to ``log_path``."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port: int | None = None
        self._log = bytearray()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self._log.decode("utf-8", "replace")

    async def _pump(self, listening: trio.Event) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("ab") as out:
            for _ in range(10**9):
                data = await self.process.stderr.receive_some(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
                self._log += data
                if self.port is None:
                    match = LISTENING.search(self._log)
                    if match:
                        self.port = int(match.group(1))
                        listening.set()
        listening.set()


CHECKOUT_LISTENING = b"listening on http://127.0.0.1:"


async def start_checkout_node(
    repo: Path, tmp: Path, *args: str, host_key_hex: str = "0x" + "5a" * 32
) -> tuple[trio.Process, int]:
    """``python -m node serve --backend echo --port 0 --ledger <tmp>/ledger.sqlite3 <args>``
    run from the checkout ``repo`` (its code, not this one's: the before/after scripts
    point it at an older commit). Returns the process and its port once it listens; the
    caller drains its stderr (:func:`drain`) and stops it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_NODE_")}
    env["HOST_PRIVATE_KEY"] = host_key_hex
    env["PYTHONPATH"] = str(repo)
    command = [sys.executable, "-m", "node", "serve", "--backend", "echo", "--port", "0"]
    proc = await trio.lowlevel.open_process(
        [*command, "--ledger", str(tmp / "ledger.sqlite3"), *args],
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    marker = CHECKOUT_LISTENING
    try:
        with trio.fail_after(120):
            while marker not in seen or b" " not in seen.split(marker, 1)[1]:
                chunk = await proc.stderr.receive_some(4096)
                if not chunk:
                    raise RuntimeError("node exited: " + seen.decode(errors="replace")[-500:])
                seen += chunk
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    digits = seen.split(marker, 1)[1]
    port = int(digits[: len(digits) - len(digits.lstrip(b"0123456789"))])
    return proc, port


async def drain(stream: trio.abc.ReceiveStream) -> None:
    """Read a stream to its end (a node's stderr, so that it never blocks on a full pipe)."""
    while await stream.receive_some(65536):
        pass


@asynccontextmanager
async def spawn_node(
    *args: str, host_key_hex: str, log_path: Path, startup_s: float = 60.0
) -> AsyncIterator[NodeProcess]:
    """``python -m node serve --port 0 <args>`` with ``HOST_PRIVATE_KEY`` set; yields once
    it listens. SIGTERM (then SIGKILL after 10 s) on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_NODE_")}
    env["HOST_PRIVATE_KEY"] = host_key_hex
    command = [sys.executable, "-m", "node", "serve", "--port", "0", *args]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    node = NodeProcess(process, log_path)
    try:
        async with trio.open_nursery() as nursery:
            listening = trio.Event()
            nursery.start_soon(node._pump, listening)
            with trio.fail_after(startup_s):
                await listening.wait()
            if node.port is None:
                raise RuntimeError("the node exited before listening:\n" + node.log_text()[-2000:])
            yield node
            if node.alive:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stderr is not None:
            with trio.CancelScope(shield=True):
                await process.stderr.aclose()


@asynccontextmanager
async def websocket(
    url: str, *, connect_timeout: float = 10.0
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket to ``ws://127.0.0.1:<port>/v1/ws`` (or the HTTP base URL). The
    TCP stream is ours, so it is closed even when the node closed the WebSocket first."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await wrap_client_stream(nursery, stream, host, "/v1/ws")
            try:
                yield ws
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def metrics(base_url: str) -> dict[str, float]:
    """``GET /metrics`` parsed to ``{"name{labels}": value}``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


async def host_public_key(base_url: str) -> bytes:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        return bytes.fromhex((await http.get("/v1/host-key")).json()["publicKey"])


async def wait_for_gauge(base_url: str, name: str, value: float, within_s: float) -> float:
    """Poll ``/metrics`` (bounded) until ``name`` equals ``value``; returns the last value."""
    last = float("nan")
    with trio.move_on_after(within_s):
        for _ in range(10_000):
            last = (await metrics(base_url)).get(name, float("nan"))
            if last == value:
                break
            await trio.sleep(0.05)
    return last


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` from /proc, in KiB (empty if unreadable)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0])
    return out


def raise_nofile(wanted: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
