#!/usr/bin/env python3
"""N concurrent encrypted sessions x M prompts against a node; every answer checked.

    .venv/bin/python scripts/loadtest.py --spawn                       # 1,000 x 5, echo node
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8080 --node-pid 1234
    .venv/bin/python scripts/loadtest.py --spawn --sessions 200 --prompts 20 --json out.json

Each session is its own WebSocket connection with its own client key and session key. All
sessions connect and initialise first (at most ``--connect-concurrency`` handshakes at a
time) and stay open; then all of them send their prompts at once, one after the other per
session. Every chunk is checked against PROTOCOL.md section 4 (index ``i`` under AAD
``chunk_<i>``, opened with the session key, the empty final chunk, ``encrypted_response``,
``stream_end``) and the decrypted answer is compared with the prompt (the echo backend
returns the prompt). Reported: sessions and prompts completed, lost chunks (index gaps,
missing final chunk, answers that never ended), corrupt chunks (failed authentication,
wrong AAD), wrong answers, error frames by code, latency to ``stream_end`` and to the first
chunk (p50/p95/p99), node RSS before and after (from /proc when ``--spawn`` or
``--node-pid``), the ``llm_node_session_keys`` gauge while all sessions are open and after
all clients left (must be 0).

With ``--spawn`` the node is ``python -m node serve --backend echo --port 0`` on 127.0.0.1
with a fresh host key and a temporary ledger, stopped at the end. Exit status 1 when
anything was lost, corrupt, wrong, refused, or a key was left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _nodeproc as nodeproc  # noqa: E402
import trio  # noqa: E402
from coincurve import PrivateKey  # noqa: E402
from trio_websocket import ConnectionClosed, WebSocketConnection  # noqa: E402

from node.crypto import aead  # noqa: E402
from node.crypto.curve import address_of  # noqa: E402
from node.crypto.errors import DecryptionFailed  # noqa: E402
from node.crypto.hostkey import HostKey  # noqa: E402
from node.crypto.session_init import seal_session_init  # noqa: E402

RESPONSE_FINAL_AAD = b"encrypted_response_final"
MAX_FRAMES_PER_ANSWER = 100_000


@dataclass
class Results:
    sessions: int = 0
    sessions_opened: int = 0
    sessions_completed: int = 0
    prompts_sent: int = 0
    prompts_completed: int = 0
    chunks: int = 0
    lost_chunks: int = 0
    corrupt_chunks: int = 0
    wrong_answers: int = 0
    unfinished_answers: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    first_chunk_s: list[float] = field(default_factory=list)
    connect_phase_s: float = 0.0
    prompt_phase_s: float = 0.0
    keys_while_open: float | None = None
    keys_after: float | None = None
    rss_kib_before: dict[str, int] = field(default_factory=dict)
    rss_kib_after: dict[str, int] = field(default_factory=dict)
    nofile: int = 0

    @property
    def failed(self) -> bool:
        return bool(
            self.lost_chunks
            or self.corrupt_chunks
            or self.wrong_answers
            or self.unfinished_answers
            or self.errors_by_code
            or self.failures
            or self.sessions_completed != self.sessions
            or self.keys_after != 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "sessions_opened": self.sessions_opened,
            "sessions_completed": self.sessions_completed,
            "prompts_sent": self.prompts_sent,
            "prompts_completed": self.prompts_completed,
            "chunks": self.chunks,
            "lost_chunks": self.lost_chunks,
            "corrupt_chunks": self.corrupt_chunks,
            "wrong_answers": self.wrong_answers,
            "unfinished_answers": self.unfinished_answers,
            "errors_by_code": dict(self.errors_by_code),
            "failures": dict(self.failures),
            "latency_ms": percentiles(self.latencies_s),
            "first_chunk_ms": percentiles(self.first_chunk_s),
            "connect_phase_s": round(self.connect_phase_s, 2),
            "prompt_phase_s": round(self.prompt_phase_s, 2),
            "prompts_per_s": round(self.prompts_completed / self.prompt_phase_s, 1)
            if self.prompt_phase_s
            else None,
            "session_keys_while_open": self.keys_while_open,
            "session_keys_after": self.keys_after,
            "node_rss_kib_before": self.rss_kib_before,
            "node_rss_kib_after": self.rss_kib_after,
            "rlimit_nofile": self.nofile,
            "failed": self.failed,
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    if len(ordered) == 1:
        ordered = ordered * 2
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": round(cuts[49] * 1000, 2),
        "p95": round(cuts[94] * 1000, 2),
        "p99": round(cuts[98] * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }


def _open(key: bytes, payload: dict[str, Any], aad: bytes) -> bytes | None:
    try:
        if bytes.fromhex(payload["aadHex"]) != aad:
            return None
        return aead.open(
            key, bytes.fromhex(payload["nonceHex"]), bytes.fromhex(payload["ciphertextHex"]), aad
        )
    except (DecryptionFailed, KeyError, TypeError, ValueError):
        return None


class Session:
    """One connection, one encrypted session, ``prompts`` prompts."""

    def __init__(self, index: int, ws: WebSocketConnection, results: Results) -> None:
        self.index = index
        self.ws = ws
        self.results = results
        self.session_id = str(index + 1)
        self.key = os.urandom(32)
        self.client_key = PrivateKey()

    async def recv(self, timeout_s: float) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            text = await self.ws.get_message()
        frame = json.loads(text)
        if not isinstance(frame, dict):
            raise ValueError("frame is not an object")
        return frame

    async def init(self, host_public: bytes, timeout_s: float) -> bool:
        connected = await self.recv(timeout_s)
        if connected.get("type") != "connected":
            self.results.failures["no connected greeting"] += 1
            return False
        payload = seal_session_init(
            host_public, self.client_key, self.key, job_id=self.index + 1, model_name="echo"
        )
        frame = {
            "type": "encrypted_session_init",
            "session_id": self.session_id,
            "job_id": str(self.index + 1),
            "chain_id": 84532,
            "payload": payload,
        }
        await self.ws.send_message(json.dumps(frame))
        ack = await self.recv(timeout_s)
        if ack.get("type") == "error":
            self.results.errors_by_code[str(ack.get("code"))] += 1
            return False
        expected = address_of(self.client_key.public_key)
        if ack.get("type") != "session_init_ack" or ack.get("client_address") != expected:
            self.results.failures["bad session_init_ack"] += 1
            return False
        return True

    async def ask(self, index: int, prompt: str, timeout_s: float) -> bool:
        results = self.results
        request_id = f"s{self.index}-p{index}"
        nonce = os.urandom(24)
        aad = b"message_%d" % index
        body = json.dumps({"prompt": prompt, "model": "echo", "stream": True}).encode()
        frame = {
            "type": "encrypted_message",
            "session_id": self.session_id,
            "id": request_id,
            "payload": {
                "ciphertextHex": aead.seal(self.key, nonce, body, aad).hex(),
                "nonceHex": nonce.hex(),
                "aadHex": aad.hex(),
            },
        }
        started = time.perf_counter()
        await self.ws.send_message(json.dumps(frame))
        results.prompts_sent += 1
        pieces: list[str] = []
        expected = 0
        final_seen = False
        reason: bytes | None = None
        for _ in range(MAX_FRAMES_PER_ANSWER):
            try:
                frame = await self.recv(timeout_s)
            except trio.TooSlowError:
                results.unfinished_answers += 1
                results.lost_chunks += 0 if final_seen else 1
                return False
            kind = frame.get("type")
            if kind == "error":
                results.errors_by_code[str(frame.get("code"))] += 1
                continue
            if frame.get("id") != request_id:
                results.failures["frame for another request"] += 1
                continue
            if kind == "encrypted_chunk":
                payload = frame.get("payload", {})
                got = payload.get("index")
                if not isinstance(got, int) or got < expected or final_seen:
                    results.corrupt_chunks += 1  # duplicated, reordered or after the end
                    continue
                if got > expected:
                    results.lost_chunks += got - expected
                data = _open(self.key, payload, b"chunk_%d" % got)
                expected = got + 1
                if data is None:
                    results.corrupt_chunks += 1
                    continue
                results.chunks += 1
                if frame.get("final"):
                    final_seen = True
                    if data:
                        results.corrupt_chunks += 1
                else:
                    if not pieces:
                        results.first_chunk_s.append(time.perf_counter() - started)
                    pieces.append(data.decode("utf-8", "replace"))
            elif kind == "encrypted_response":
                reason = _open(self.key, frame.get("payload", {}), RESPONSE_FINAL_AAD)
                if reason is None:
                    results.corrupt_chunks += 1
            elif kind == "stream_end":
                results.latencies_s.append(time.perf_counter() - started)
                if not final_seen:
                    results.lost_chunks += 1
                ok = final_seen and reason == b"stop" and frame.get("reason") == "complete"
                if "".join(pieces) != prompt:
                    results.wrong_answers += 1
                    ok = False
                if ok:
                    results.prompts_completed += 1
                return ok
            else:
                results.failures[f"unexpected {kind} frame"] += 1
        results.unfinished_answers += 1
        return False


async def run_session(
    index: int,
    url: str,
    host_public: bytes,
    args: argparse.Namespace,
    results: Results,
    connect_limit: trio.Semaphore,
    arrived: list[int],
    all_open: trio.Event,
    go: trio.Event,
) -> None:
    """Connect and init (under the connect limit), wait for ``go``, send the prompts."""
    words = " ".join(f"w{index}.{k}" for k in range(args.words))
    counted = False

    def arrive() -> None:
        nonlocal counted
        if not counted:
            counted = True
            arrived[0] += 1
            if arrived[0] == args.sessions:
                all_open.set()

    await connect_limit.acquire()
    released = False
    try:
        async with nodeproc.websocket(url, connect_timeout=args.timeout) as ws:
            session = Session(index, ws, results)
            ready = await session.init(host_public, args.timeout)
            connect_limit.release()
            released = True
            arrive()
            if not ready:
                return
            results.sessions_opened += 1
            await go.wait()
            ok = True
            for j in range(args.prompts):
                prompt = f"session {index} prompt {j}: {words}"
                ok = await session.ask(j, prompt, args.timeout) and ok
            if ok:
                results.sessions_completed += 1
    except (OSError, ConnectionClosed, trio.TooSlowError, ValueError) as exc:
        results.failures[f"session ended by {type(exc).__name__}"] += 1
    finally:
        if not released:
            connect_limit.release()
        arrive()


async def load(url: str, pid: int | None, args: argparse.Namespace, results: Results) -> None:
    host_public = await nodeproc.host_public_key(url)
    if pid is not None:
        results.rss_kib_before = nodeproc.rss_kib(pid)
    results.sessions = args.sessions
    connect_limit = trio.Semaphore(args.connect_concurrency)
    arrived = [0]
    all_open = trio.Event()
    go = trio.Event()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(args.sessions):
            nursery.start_soon(
                run_session,
                i,
                url,
                host_public,
                args,
                results,
                connect_limit,
                arrived,
                all_open,
                go,
            )
        await all_open.wait()
        results.connect_phase_s = time.perf_counter() - started
        results.keys_while_open = (await nodeproc.metrics(url)).get("llm_node_session_keys")
        prompts_started = time.perf_counter()
        go.set()
    results.prompt_phase_s = time.perf_counter() - prompts_started
    results.keys_after = await nodeproc.wait_for_gauge(
        url, "llm_node_session_keys", 0.0, within_s=30
    )
    if pid is not None:
        results.rss_kib_after = nodeproc.rss_kib(pid)


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    results.nofile = nodeproc.raise_nofile(max(4096, 2 * args.sessions + 512))
    if not args.spawn:
        await load(args.url, args.node_pid, args, results)
        return results
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        key = HostKey.generate()
        key_hex = key.private_key_hex()
        key.wipe()
        async with nodeproc.spawn_node(
            "--backend",
            "echo",
            "--ledger",
            str(Path(tmp) / "ledger.sqlite3"),
            "--log-level",
            "info",  # the "listening on" line (with the port) is an info line
            "--max-connections",
            str(args.sessions + 100),
            "--address-init-burst",  # every session comes from 127.0.0.1
            "0",
            "--echo-delay-ms",
            str(args.echo_delay_ms),
            host_key_hex=key_hex,
            log_path=Path(tmp) / "node.log",
        ) as node:
            await load(node.url, node.pid, args, results)
            if not node.alive:
                results.failures["node exited"] += 1
    return results


def report(r: Results) -> str:
    lat = percentiles(r.latencies_s)
    ttft = percentiles(r.first_chunk_s)
    rate = r.prompts_completed / r.prompt_phase_s if r.prompt_phase_s else 0.0
    lines = [
        f"sessions             {r.sessions_completed:,} of {r.sessions:,} completed "
        f"({r.sessions_opened:,} opened; all connected in {r.connect_phase_s:.1f} s)",
        f"prompts              {r.prompts_completed:,} of {r.prompts_sent:,} answered correctly "
        f"in {r.prompt_phase_s:.1f} s ({rate:,.0f}/s)",
        f"chunks               {r.chunks:,} opened; lost {r.lost_chunks}, corrupt "
        f"{r.corrupt_chunks}, wrong answers {r.wrong_answers}, unfinished "
        f"{r.unfinished_answers}",
        "errors by code       "
        + (", ".join(f"{k} {v}" for k, v in r.errors_by_code.most_common()) or "none"),
        "other failures       "
        + (", ".join(f"{k} {v}" for k, v in r.failures.most_common()) or "none"),
        f"latency to end (ms)  p50 {lat['p50']}, p95 {lat['p95']}, p99 {lat['p99']}, "
        f"max {lat['max']}",
        f"first chunk (ms)     p50 {ttft['p50']}, p95 {ttft['p95']}, p99 {ttft['p99']}",
        f"session keys gauge   {r.keys_while_open} while all open, {r.keys_after} after",
        f"node RSS (KiB)       before {r.rss_kib_before.get('VmRSS')}, after "
        f"{r.rss_kib_after.get('VmRSS')}, peak {r.rss_kib_after.get('VmHWM')}",
        f"RLIMIT_NOFILE        {r.nofile}",
        "RESULT               " + ("FAIL" if r.failed else "PASS"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running node's HTTP base URL, e.g. http://127.0.0.1:8080")
    where.add_argument("--spawn", action="store_true", help="start an echo node for the run")
    parser.add_argument("--node-pid", type=int, help="the node's pid, for RSS (with --url)")
    parser.add_argument("--sessions", type=int, default=1_000, help="concurrent sessions")
    parser.add_argument("--prompts", type=int, default=5, help="prompts per session")
    parser.add_argument("--words", type=int, default=20, help="words per prompt")
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    parser.add_argument("--echo-delay-ms", type=float, default=0.0, help="with --spawn")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.prompts < 1 or args.connect_concurrency < 1:
        parser.error("--sessions, --prompts and --connect-concurrency must be positive")
    results = trio.run(run, args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
