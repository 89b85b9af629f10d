#!/usr/bin/env python3
"""Throw generated and mutated frames at a node process and report how it coped.

    .venv/bin/python scripts/fuzz_node.py                      # 100,000 frames, 8 connections
    .venv/bin/python scripts/fuzz_node.py --frames 20000 --connections 4 --seed 7
    .venv/bin/python scripts/fuzz_node.py --json fuzz.json

It starts ``python -m node serve --backend echo --port 0 --ledger <tmp>`` with a fresh
``HOST_PRIVATE_KEY`` on 127.0.0.1 and runs several connections at once. Each sends
batches of frames (mutations of the SDK's recorded frames, frames built from the
protocol's keys, random JSON, random text and binary frames, deep nesting, huge values,
and genuine encrypted inits and messages with their own mutations and replays),
reconnecting whenever the node closes one (10 errors -> 1008, a frame over 1 MiB ->
1009). After each batch a ping must be answered within ``--pong-timeout`` seconds, or it
counts as a hang. Among the frames are the shapes of ``tests/security/_adversarial.py``
(input that once made a parser quadratic); after the fuzzing, each shape is sent at 200,000
and 800,000 characters and the node's answer times compared: more than 8 times as long for 4 times
the input fails the run (a linear parser takes about 4 times as long).

Every frame the node sends is checked: UTF-8 JSON object, known type, errors with a code
from ``ErrorCode`` and a message; encrypted chunks for our own sessions must open under one
of our keys. At the end a well-behaved encrypted session (``node.client``, with host-key
discovery) must work, and the ``llm_node_session_keys`` gauge must read 0.

Exit status 1 on any crash (the node process exited), hang, uncoded reply, corrupt chunk,
traceback in the node's log, failed final session or leftover key; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from node.client import open_session  # noqa: E402
from node.crypto import aead  # noqa: E402
from node.crypto.errors import DecryptionFailed, ErrorCode  # noqa: E402
from node.crypto.hostkey import HostKey  # noqa: E402
from node.crypto.session_init import seal_session_init  # noqa: E402
from tests.security._adversarial import SHAPES  # noqa: E402

VECTORS = REPO / "tests" / "vectors" / "sdk" / "session_init_dev.json"
HOSTILE_MODELS = (
    "echo\n1    2099-01-01T00:00:00.000Z  forged  1  echo  1  1  0  0  yes  disconnect",
    "echo\x1b[2J\x1b]0;title\x07",
    "\u202eohce",
    "echo\u2028next\x85line\x9b31m",
    "echo\r\x00\x7f",
)
_TERMINAL_CONTROLS = tuple("\n\r\x1b\x07\x00\x7f\x85\x9b\u202e\u2028")
ERROR_CODES = frozenset(c.value for c in ErrorCode)
REPLY_TYPES = frozenset(
    {
        "connected",
        "pong",
        "session_init_ack",
        "encrypted_chunk",
        "encrypted_response",
        "stream_chunk",
        "stream_end",
        "error",
    }
)
TYPES = [
    "ping",
    "encrypted_session_init",
    "session_init",
    "encrypted_message",
    "prompt",
    "inference",
    "stream_cancel",
]
KEYS = [
    "id",
    "session_id",
    "sessionId",
    "job_id",
    "jobId",
    "chain_id",
    "chainId",
    "prompt",
    "request",
    "model",
    "max_tokens",
    "temperature",
    "stream",
    "reason",
]
PAYLOAD_KEYS = [
    "ephPubHex",
    "ciphertextHex",
    "nonceHex",
    "signatureHex",
    "aadHex",
    "saltHex",
    "info",
    "recid",
    "alg",
]
MAX_FRAME = 1 << 20
SAMPLES_KEPT = 10
# The linearity probe: each adversarial shape at PROBE_SIZE and 4 * PROBE_SIZE characters;
# a node whose answer takes more than GROWTH_FACTOR times as long for the larger one (a
# linear parser: about 4, a quadratic one: 16) fails the run; the allowance grows with
# what a plain padded ping of those sizes shows (see growth_allowed).
PROBE_SIZE = 200_000
GROWTH_FACTOR = 8.0
PROBE_ROUNDS = 5


# ---------------------------------------------------------------------- results


@dataclass
class Results:
    frames_sent: int = 0
    frames_by_kind: Counter[str] = field(default_factory=Counter)
    replies_by_type: Counter[str] = field(default_factory=Counter)
    errors_by_code: Counter[str] = field(default_factory=Counter)
    closes_by_code: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    pings: int = 0
    max_pong_s: float = 0.0
    hangs: list[str] = field(default_factory=list)
    uncoded: list[str] = field(default_factory=list)
    corrupt_chunks: int = 0
    chunks_opened: int = 0
    crash: str | None = None
    tracebacks: int = 0
    contained_failures: int = 0
    final_session: str = "not run"
    ledger_check: str = "not run"
    session_keys_after: float | None = None
    rss_kib_before: dict[str, int] = field(default_factory=dict)
    rss_kib_after: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # shape -> (best reply time at PROBE_SIZE, at 4 * PROBE_SIZE, their ratio)
    growth: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def uncoded_reply(self, why: str, text: str | bytes) -> None:
        if len(self.uncoded) < SAMPLES_KEPT:
            shown = text[:200] if isinstance(text, str) else repr(text[:200])
            self.uncoded.append(f"{why}: {shown}")
        else:
            self.uncoded.append(why)

    @property
    def failed(self) -> bool:
        return bool(
            self.crash
            or self.hangs
            or self.uncoded
            or self.corrupt_chunks
            or self.tracebacks
            or self.final_session != "ok"
            or self.ledger_check != "ok"
            or self.session_keys_after != 0
            or any(ratio > growth_allowed(self) for _, _, ratio in self.growth.values())
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "frames_sent": self.frames_sent,
            "frames_by_kind": dict(self.frames_by_kind),
            "connections": self.connections,
            "replies_by_type": dict(self.replies_by_type),
            "errors_by_code": dict(self.errors_by_code),
            "closes_by_code": dict(self.closes_by_code),
            "pings": self.pings,
            "max_pong_s": round(self.max_pong_s, 4),
            "crash": self.crash,
            "hangs": len(self.hangs),
            "hang_samples": self.hangs[:SAMPLES_KEPT],
            "uncoded_errors": len(self.uncoded),
            "uncoded_samples": self.uncoded[:SAMPLES_KEPT],
            "chunks_opened": self.chunks_opened,
            "corrupt_chunks": self.corrupt_chunks,
            "node_log_tracebacks": self.tracebacks,
            "contained_connection_failures": self.contained_failures,
            "final_session": self.final_session,
            "ledger_check": self.ledger_check,
            "session_keys_after": self.session_keys_after,
            "rss_kib_before": self.rss_kib_before,
            "rss_kib_after": self.rss_kib_after,
            "elapsed_s": round(self.elapsed_s, 1),
            "growth": {
                name: {"small_s": round(a, 5), "large_s": round(b, 5), "ratio": round(r, 2)}
                for name, (a, b, r) in self.growth.items()
            },
            "failed": self.failed,
        }


# ---------------------------------------------------------------------- frame maker


@dataclass
class Conversation:
    """Our own encrypted sessions on one connection, so that genuine frames (and their
    mutations and replays) reach the deeper states, and so that chunks can be checked."""

    keys: dict[str, list[bytes]] = field(default_factory=dict)
    current: tuple[str, bytes] | None = None
    next_index: int = 0
    last_message: str | None = None


class FrameMaker:
    def __init__(self, rng: random.Random, host_public: bytes, sdk: list[str]) -> None:
        self.rng = rng
        self.host_public = host_public
        self.sdk = sdk
        menu: list[tuple[str, int]] = [
            ("sdk_mutation", 22),
            ("protocol_object", 18),
            ("random_json", 10),
            ("random_text", 8),
            ("random_binary", 6),
            ("bytes_as_text", 3),
            ("deep_nesting", 3),
            ("adversarial", 2),
            ("big_value", 2),
            ("ping", 3),
            ("plaintext", 5),
            ("encrypted_init", 6),
            ("encrypted_message", 10),
            ("mutated_message", 3),
            ("replayed_message", 1),
        ]
        self.kinds = [k for k, _ in menu]
        self.weights = [w for _, w in menu]

    # random values -------------------------------------------------------------

    def text(self, limit: int = 40) -> str:
        r = self.rng
        n = r.randint(0, limit)
        pools = (
            "abcdefghijklmnopqrstuvwxyz0123456789 ",
            "0123456789abcdefABCDEFxX",
            '{}[]":,\\ \n\t\x00\x1f',
            "äöü€😀秘密\u200b\ufeff\u202e",
        )
        pool = r.choice(pools)
        return "".join(r.choice(pool) for _ in range(n))

    def scalar(self) -> Any:
        r = self.rng
        roll = r.random()
        if roll < 0.15:
            return None
        if roll < 0.25:
            return r.random() < 0.5
        if roll < 0.45:
            return r.choice([0, -1, 1, 2**53 + 1, 2**64, -(2**63), 10**80, r.randint(-1000, 10**6)])
        if roll < 0.55:
            return r.choice([0.5, -0.0, 1e308, 3.14])
        if roll < 0.75:
            return r.randbytes(r.choice([0, 1, 16, 23, 24, 25, 32, 33, 64, 65, 66])).hex()
        return self.text()

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        if depth > 3 or r.random() < 0.6:
            return self.scalar()
        if r.random() < 0.5:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text(8): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    # frames ---------------------------------------------------------------------

    def make(self, conv: Conversation) -> tuple[str, str | bytes]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return kind, getattr(self, "_" + kind)(conv)

    def _sdk_mutation(self, conv: Conversation) -> str:
        r = self.rng
        wire = r.choice(self.sdk)
        how = r.random()
        if how < 0.15:
            return wire[: r.randint(0, len(wire) - 1)]
        if how < 0.35:
            chars = list(wire)
            for _ in range(r.randint(1, 4)):
                chars[r.randrange(len(chars))] = r.choice('0af"{}\\:,x Z\u00e9')
            return "".join(chars)
        obj: dict[str, Any] = json.loads(wire)
        for _ in range(r.randint(1, 3)):
            target = obj
            if isinstance(obj.get("payload"), dict) and r.random() < 0.6:
                target = obj["payload"]
            if not target:
                break
            key = r.choice(sorted(target))
            value = target[key]
            op = r.random()
            if op < 0.25:
                del target[key]
            elif op < 0.5 or not isinstance(value, str) or not value:
                target[key] = self.value()
            elif op < 0.8:
                i = r.randrange(len(value))
                target[key] = value[:i] + r.choice("0123456789abcdefgX ") + value[i + 1 :]
            else:
                target[key] = r.choice(["0x", "0X", "-", " ", "0x0x"]) + value
        return json.dumps(obj)

    def _protocol_object(self, conv: Conversation) -> str:
        r = self.rng
        obj: dict[str, Any] = {"type": r.choice(TYPES) if r.random() < 0.9 else self.text(6)}
        for key in r.sample(KEYS, r.randint(0, 5)):
            obj[key] = self.value()
        if r.random() < 0.6:
            obj["payload"] = {k: self.scalar() for k in r.sample(PAYLOAD_KEYS, r.randint(0, 7))}
        return json.dumps(obj)

    def _random_json(self, conv: Conversation) -> str:
        return json.dumps(self.value())

    def _random_text(self, conv: Conversation) -> str:
        return self.text(300)

    def _random_binary(self, conv: Conversation) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 300))

    def _bytes_as_text(self, conv: Conversation) -> str:
        return self.rng.randbytes(self.rng.randint(1, 300)).decode("utf-8", "replace")

    def _deep_nesting(self, conv: Conversation) -> str:
        n = self.rng.choice([65, 100, 1_000, 100_000, 400_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        inner = "1" if opener != "[" else ""
        return opener * n + inner + closer * n

    def _adversarial(self, conv: Conversation) -> str:
        """A shape that made a parser slow (quadratic) once; up to 256 KiB."""
        name = self.rng.choice(sorted(SHAPES))
        return SHAPES[name](self.rng.choice([1_000, 16_384, 65_536, 262_144]))

    def _big_value(self, conv: Conversation) -> str:
        r = self.rng
        roll = r.random()
        if roll < 0.1:  # over the 1 MiB frame limit: the node closes 1009
            return json.dumps({"type": "prompt", "prompt": "A" * (MAX_FRAME + r.randint(1, 4096))})
        if roll < 0.4:
            return '{"type":"session_init","job_id":' + "9" * r.randint(80, 50_000) + "}"
        if roll < 0.7:
            return json.dumps({"type": "ping", "id": "x" * r.randint(257, 100_000)})
        body = " ".join("w" for _ in range(r.randint(1_000, 20_000)))
        return json.dumps({"type": "prompt", "prompt": body})

    def _ping(self, conv: Conversation) -> str:
        return json.dumps({"type": "ping", "id": self.rng.randint(0, 10**6)})

    def _plaintext(self, conv: Conversation) -> str:
        r = self.rng
        if r.random() < 0.5:
            return json.dumps({"type": "session_init", "session_id": str(r.randint(0, 99))})
        return json.dumps({"type": "prompt", "prompt": self.text(60), "id": r.randint(0, 99)})

    def _encrypted_init(self, conv: Conversation) -> str:
        r = self.rng
        session_id = str(r.randint(1, 5))
        key = r.randbytes(32)
        payload = seal_session_init(
            self.host_public,
            PrivateKey(),
            key,
            job_id=r.randint(0, 10**6),
            # Sometimes a model name built to forge rows or drive a terminal wherever it
            # is shown later (receipts list, logs): checked by check_ledger at the end.
            model_name=r.choice(HOSTILE_MODELS) if r.random() < 0.2 else "echo",
            include_recovery_key=r.random() < 0.8,
        )
        conv.keys.setdefault(session_id, []).append(key)
        conv.current = (session_id, key)
        conv.next_index = 0
        return json.dumps(
            {
                "type": "encrypted_session_init",
                "session_id": session_id,
                "job_id": "1",
                "payload": payload,
            }
        )

    def _encrypted_message(self, conv: Conversation) -> str:
        if conv.current is None:
            return self._encrypted_init(conv)
        session_id, key = conv.current
        r = self.rng
        index = conv.next_index + (r.randint(1, 3) if r.random() < 0.1 else 0)
        conv.next_index = index + 1
        nonce = os.urandom(24)
        aad = b"message_%d" % index
        body = json.dumps({"prompt": self.text(50) or "hi", "max_tokens": r.randint(1, 64)})
        frame = json.dumps(
            {
                "type": "encrypted_message",
                "session_id": session_id,
                "id": f"m{r.randint(0, 10**6)}",
                "payload": {
                    "ciphertextHex": aead.seal(key, nonce, body.encode(), aad).hex(),
                    "nonceHex": nonce.hex(),
                    "aadHex": aad.hex(),
                },
            }
        )
        conv.last_message = frame
        return frame

    def _mutated_message(self, conv: Conversation) -> str:
        frame = json.loads(self._encrypted_message(conv))
        payload = frame["payload"]
        field_name = self.rng.choice(["ciphertextHex", "nonceHex", "aadHex"])
        raw = bytearray(bytes.fromhex(payload[field_name]))
        if raw:
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        payload[field_name] = raw.hex()
        return json.dumps(frame)

    def _replayed_message(self, conv: Conversation) -> str:
        return conv.last_message or self._ping(conv)


# ---------------------------------------------------------------------- one connection


class Connection:
    """One fuzzing connection: a reader task that checks every reply and answers pings."""

    def __init__(self, ws: WebSocketConnection, results: Results, conv: Conversation) -> None:
        self.ws = ws
        self.results = results
        self.conv = conv
        self.pongs: dict[str, trio.Event] = {}
        self.closed = trio.Event()

    async def reader(self) -> None:
        try:
            for _ in range(10**9):
                text = await self.ws.get_message()
                self.check(text)
        except ConnectionClosed:
            pass  # the worker records how the connection ended
        finally:
            self.closed.set()
            for event in self.pongs.values():
                event.set()

    def check(self, text: str | bytes) -> None:
        results = self.results
        if not isinstance(text, str):
            results.uncoded_reply("binary frame from the node", text)
            return
        try:
            frame = json.loads(text)
        except ValueError:
            results.uncoded_reply("not JSON", text)
            return
        if not isinstance(frame, dict) or frame.get("type") not in REPLY_TYPES:
            results.uncoded_reply("unknown reply", text)
            return
        kind = frame["type"]
        results.replies_by_type[kind] += 1
        if kind == "error":
            code = frame.get("code")
            message = frame.get("message")
            if code not in ERROR_CODES or not isinstance(message, str) or not message:
                results.uncoded_reply("error without a valid code and message", text)
                return
            results.errors_by_code[code] += 1
        elif kind == "pong":
            event = self.pongs.get(str(frame.get("id")))
            if event is not None:
                event.set()
        elif kind == "encrypted_chunk":
            self.check_chunk(frame)

    def check_chunk(self, frame: dict[str, Any]) -> None:
        keys = self.conv.keys.get(str(frame.get("session_id")))
        if not keys:
            return  # a session some SDK vector opened: not ours to check
        try:
            p = frame["payload"]
            nonce, sealed, aad = (
                bytes.fromhex(p[k]) for k in ("nonceHex", "ciphertextHex", "aadHex")
            )
        except (KeyError, TypeError, ValueError):
            self.results.uncoded_reply("malformed encrypted_chunk", json.dumps(frame))
            return
        for key in keys:
            try:
                aead.open(key, nonce, sealed, aad)
            except DecryptionFailed:
                continue
            self.results.chunks_opened += 1
            return
        self.results.corrupt_chunks += 1

    async def ping(self, ping_id: str, timeout_s: float) -> bool | None:
        """True: answered in time; False: not answered (a hang); None: the node closed."""
        event = trio.Event()
        self.pongs[ping_id] = event
        started = time.perf_counter()
        try:
            await self.ws.send_message(json.dumps({"type": "ping", "id": ping_id}))
        except ConnectionClosed:
            return None
        with trio.move_on_after(timeout_s):
            await event.wait()
        del self.pongs[ping_id]
        if self.closed.is_set():
            return None
        if not event.is_set():
            return False
        self.results.pings += 1
        self.results.max_pong_s = max(self.results.max_pong_s, time.perf_counter() - started)
        return True


@dataclass
class Budget:
    left: int

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def worker(
    index: int,
    url: str,
    maker: FrameMaker,
    budget: Budget,
    results: Results,
    node: nodeproc.NodeProcess | None,
    args: argparse.Namespace,
) -> None:
    batch_no = 0
    for _ in range(10**9):
        if budget.left <= 0 or results.crash:
            return
        if node is not None and not node.alive:
            results.crash = f"node exited with status {node.process.returncode}"
            return
        conv = Conversation()
        try:
            async with nodeproc.websocket(url) as ws:
                results.connections += 1
                conn = Connection(ws, results, conv)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.reader)
                    while budget.left > 0 and not conn.closed.is_set():
                        for _ in range(args.batch):
                            if not budget.take():
                                break
                            kind, frame = maker.make(conv)
                            try:
                                await ws.send_message(frame)
                            except ConnectionClosed:
                                budget.left += 1  # not delivered: does not count
                                break
                            results.frames_sent += 1
                            results.frames_by_kind[kind] += 1
                        batch_no += 1
                        answered = await conn.ping(f"fz-{index}-{batch_no}", args.pong_timeout)
                        if answered is False:
                            alive = node is None or node.alive
                            results.hangs.append(
                                f"connection {index} batch {batch_no}: no pong within "
                                f"{args.pong_timeout:g} s (node {'alive' if alive else 'dead'})"
                            )
                            break
                        if answered is None:
                            break
                    nursery.cancel_scope.cancel()
                reason = ws.closed
                how = str(reason.code) if reason is not None else "left open by the fuzzer"
                results.closes_by_code[how] += 1
        except (OSError, trio.TooSlowError, ConnectionClosed) as exc:
            if node is not None and not node.alive:
                results.crash = f"node exited with status {node.process.returncode}"
                return
            results.hangs.append(f"connection {index}: could not connect ({type(exc).__name__})")
            return


def _control(n: int) -> str:
    """A valid ping padded to ``n`` characters: what any frame of that size costs."""
    return '{"type":"ping","pad":"' + "a" * n + '"}'


async def probe_growth(url: str, results: Results) -> None:
    """Time the node's answer to each adversarial shape at two sizes (best of a few).

    One connection per shape: refused frames count against its error budget (10). The
    control (a padded ping) shows what 4 times the bytes cost on this machine anyway
    (caches, copies); a shape is allowed GROWTH_FACTOR times that growth over 4."""
    for name, make in [("control", _control), *sorted(SHAPES.items())]:
        best: list[float] = []
        async with nodeproc.websocket(url) as ws:
            await ws.get_message()  # connected
            for size in (PROBE_SIZE, 4 * PROBE_SIZE):
                text = make(size)
                times = []
                for _ in range(PROBE_ROUNDS):
                    started = time.perf_counter()
                    await ws.send_message(text)
                    await ws.get_message()  # an error, or the pong of a valid ping
                    times.append(time.perf_counter() - started)
                best.append(min(times))
        results.growth[name] = (best[0], best[1], best[1] / max(best[0], 1e-6))


def growth_allowed(results: Results) -> float:
    control = results.growth.get("control")
    return GROWTH_FACTOR * max(1.0, control[2] / 4.0 if control else 1.0)


async def final_session(url: str, results: Results) -> None:
    prompt = "a well-behaved session after the fuzzing: " + " ".join(f"w{i}" for i in range(50))
    try:
        with trio.fail_after(30):
            async with open_session(url, model="echo", job_id=424242) as session:
                completion = await session.complete(prompt)
                if completion.text != prompt or completion.finish_reason != "stop":
                    results.final_session = "wrong answer"
                    return
                await session.reinit()
                again = await session.complete("and after a re-init")
                ok = again.text == "and after a re-init"
                results.final_session = "ok" if ok else "wrong answer after re-init"
    except Exception as exc:  # report, do not crash the report
        results.final_session = f"failed: {type(exc).__name__}: {exc}"


async def check_ledger(ledger: Path, results: Results) -> None:
    """``receipts list`` shows one line per receipt whatever the models were called (no
    control character reaches the terminal), and ``receipts verify`` finds the ledger
    whole (signatures, totals, sequence numbers and the hash chain)."""

    async def cli(*argv: str) -> tuple[int, str]:
        done = await trio.run_process(
            [sys.executable, "-m", "node", "receipts", *argv, "--ledger", str(ledger)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return done.returncode, done.stdout.decode("utf-8", "replace")

    code, listing = await cli("list")
    lines = listing.splitlines()
    if code != 0 or not lines:
        results.ledger_check = f"receipts list failed (exit {code})"
        return
    count = int(lines[-1].split()[0])
    if len(lines) != count + 2:
        results.ledger_check = f"receipts list printed {len(lines)} lines for {count} receipts"
        return
    if any(ch in line for line in lines for ch in _TERMINAL_CONTROLS):
        results.ledger_check = "receipts list printed a control character"
        return
    code, verdict = await cli("verify")
    if code != 0:
        results.ledger_check = "receipts verify failed: " + verdict.splitlines()[-1]
        return
    results.ledger_check = "ok"


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    sdk_data = json.loads(VECTORS.read_text(encoding="utf-8"))
    sdk = [c["wire_text"] for c in sdk_data["cases"]]
    sdk += [m["wire_text"] for c in sdk_data["cases"] for m in c["messages"]]
    nodeproc.raise_nofile()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-node-") as tmp:
        log_path = Path(args.log) if args.log else Path(tmp) / "node.log"
        key = HostKey.generate()
        key_hex = key.private_key_hex()
        key.wipe()
        async with nodeproc.spawn_node(
            "--backend",
            "echo",
            "--ledger",
            str(Path(tmp) / "ledger.sqlite3"),
            "--log-level",
            "info",
            # Every connection comes from 127.0.0.1: the per-address session allowance
            # would refuse most inits before they reach the paths being fuzzed.
            "--address-init-burst",
            "0",
            host_key_hex=key_hex,
            log_path=log_path,
        ) as node:
            url = node.url
            results.rss_kib_before = nodeproc.rss_kib(node.pid)
            host_public = await nodeproc.host_public_key(url)
            budget = Budget(args.frames)
            async with trio.open_nursery() as nursery:
                for i in range(args.connections):
                    maker = FrameMaker(random.Random(args.seed * 1000 + i), host_public, sdk)
                    nursery.start_soon(worker, i, url, maker, budget, results, node, args)
            if node.alive:
                await probe_growth(url, results)
                await final_session(url, results)
                results.session_keys_after = await nodeproc.wait_for_gauge(
                    url, "llm_node_session_keys", 0.0, within_s=10
                )
                results.rss_kib_after = nodeproc.rss_kib(node.pid)
            else:
                results.crash = f"node exited with status {node.process.returncode}"
            log = node.log_text()
        await check_ledger(Path(tmp) / "ledger.sqlite3", results)
        results.tracebacks = log.count("Traceback")
        results.contained_failures = log.count("WebSocket connection failed")
    results.elapsed_s = time.perf_counter() - started
    return results


def report(results: Results) -> str:
    r = results
    lines = [
        f"frames sent          {r.frames_sent:,} over {r.connections:,} connections "
        f"in {r.elapsed_s:.1f} s",
        "frames by kind       "
        + ", ".join(f"{k} {v:,}" for k, v in r.frames_by_kind.most_common()),
        f"crashes              {1 if r.crash else 0}" + (f" ({r.crash})" if r.crash else ""),
        f"hangs                {len(r.hangs)} (pings answered {r.pings:,}, "
        f"slowest {r.max_pong_s * 1000:.0f} ms)",
        f"uncoded errors       {len(r.uncoded)}",
        f"corrupt chunks       {r.corrupt_chunks} (chunks of our sessions opened: "
        f"{r.chunks_opened:,})",
        f"node log tracebacks  {r.tracebacks} (connection failures contained and logged: "
        f"{r.contained_failures})",
        "closes by code       "
        + ", ".join(f"{k}: {v:,}" for k, v in sorted(r.closes_by_code.items())),
        "replies by type      "
        + ", ".join(f"{k} {v:,}" for k, v in r.replies_by_type.most_common()),
        "errors by code       "
        + ", ".join(f"{k} {v:,}" for k, v in r.errors_by_code.most_common()),
        f"well-behaved session {r.final_session}",
        f"ledger check         {r.ledger_check}",
        f"session keys after   {r.session_keys_after}",
        f"node RSS (KiB)       before {r.rss_kib_before.get('VmRSS')}, after "
        f"{r.rss_kib_after.get('VmRSS')}, peak {r.rss_kib_after.get('VmHWM')}",
    ]
    for name, (small, large, ratio) in sorted(r.growth.items()):
        mark = "  ! " if ratio > growth_allowed(r) else ""
        lines.append(
            f"{mark}growth {name:32} {small * 1000:8.1f} ms -> {large * 1000:8.1f} ms "
            f"(x{ratio:.1f} for 4x the size)"
        )
    for sample in [*r.hangs[:SAMPLES_KEPT], *r.uncoded[:SAMPLES_KEPT]]:
        lines.append(f"  ! {sample}")
    lines.append("RESULT               " + ("FAIL" if r.failed else "PASS"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames to deliver")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections")
    parser.add_argument("--batch", type=int, default=5, help="frames between liveness pings")
    parser.add_argument("--pong-timeout", type=float, default=2.0, help="seconds per ping")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--log", help="keep the node's log at this path")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.connections < 1 or args.batch < 1:
        parser.error("--frames, --connections and --batch must be positive")
    results = trio.run(run, args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
