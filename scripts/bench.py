#!/usr/bin/env python3
"""End-to-end benchmarks of the node, each next to a baseline measured in the same run.

    .venv/bin/python scripts/bench.py                 # everything, full size (a few minutes)
    .venv/bin/python scripts/bench.py --quick         # everything, small (under a minute)
    .venv/bin/python scripts/bench.py --only B1,B3    # some measures
    .venv/bin/python scripts/bench.py --json out.json # default bench-results/bench-<time>.json

B1 init CPU, B2 encrypted vs plaintext streaming, B3 node vs a bare trio-websocket server,
B4 2,000 concurrent sessions, B5 node vs llama-cpp-python alone, B6 two workers vs one,
B7 protocol v2 handshake CPU vs the v1 init, B8 protocol v2 vs v1 encrypted streaming,
P1 first token and tokens/s through ``llm-node proxy`` vs node.client direct.
See docs/BENCHMARKS.md for what each figure means. The node, the clients, the bare server
and the direct model run are separate processes on 127.0.0.1 (OS-chosen ports); all are
killed when the script ends. The ``--role`` modes are those child processes.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _benchlib as lib  # noqa: E402
import trio  # noqa: E402

ALL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "P1")
B5_FIRST_TOKEN_MAX_TOKENS = 4  # B5 first-token rounds: the model goes on past the first
B5_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle, and describe every room of the lighthouse."
)


class Row:
    def __init__(
        self,
        measure: str,
        label: str,
        value: float,
        unit: str,
        *,
        baseline_label: str = "",
        baseline: float | None = None,
        ratio: float | None = None,
        goal: str = "",
        met: bool | None = None,
        note: str = "",
    ) -> None:
        self.measure = measure
        self.label = label
        self.value = value
        self.unit = unit
        self.baseline_label = baseline_label
        self.baseline = baseline
        self.ratio = ratio
        self.goal = goal
        self.met = met
        self.note = note

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif (float(value).is_integer() and not unit) or abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_table(rows: list[Row]) -> str:
    head = ["#", "measure", "value", "baseline (same run)", "ratio", "goal", "met"]
    body = []
    for r in rows:
        base = (
            f"{_fmt(r.baseline, r.unit)} {r.baseline_label}".strip()
            if r.baseline is not None
            else r.baseline_label or "-"
        )
        body.append(
            [
                r.measure,
                r.label + (f" [{r.note}]" if r.note else ""),
                _fmt(r.value, r.unit),
                base,
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                r.goal or "-",
                "-" if r.met is None else ("MET" if r.met else "MISSED"),
            ]
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(row.rstrip() for row in out)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "opened": 0,
        "requests": 0,
        "chunks": 0,
        "tokens": 0,
        "bytes": 0,
        "errors": 0,
        "error_samples": [],
        "first_token_s": [],
        "first_token_wait_s": [],
        "decode_tok_s": [],
        "latencies_ms": [],
        "worst_gaps_ms": [],
        "first_frame_ms": [],
        "text_sha256": [],
        "request_s": [],
    }
    starts = [r["t_start"] for r in results if r.get("t_start") is not None]
    ends = [r["t_end"] for r in results if r.get("t_end") is not None]
    for r in results:
        for key in ("opened", "requests", "chunks", "tokens", "bytes", "errors"):
            out[key] += r.get(key, 0)
        for key in (
            "error_samples",
            "first_token_s",
            "first_token_wait_s",
            "decode_tok_s",
            "latencies_ms",
            "worst_gaps_ms",
            "first_frame_ms",
        ):
            out[key] += r.get(key, [])
        out["text_sha256"] += r.get("text_sha256", [])
        out["request_s"] += r.get("request_s", [])
    where: dict[str, int] = {}
    for r in results:
        for k, v in r.get("worst_gap_where", {}).items():
            where[k] = where.get(k, 0) + v
    out["worst_gap_where"] = where
    out["client_gc_max_pause_ms"] = max(
        (r.get("client_gc_max_pause_ms", 0.0) for r in results), default=0.0
    )
    out["wall_s"] = (max(ends) - min(starts)) if starts and ends else float("nan")
    wall = out["wall_s"]
    out["tokens_per_s"] = out["tokens"] / wall if wall and wall == wall and wall > 0 else 0.0
    out["chunks_per_s"] = out["chunks"] / wall if wall and wall == wall and wall > 0 else 0.0
    out["tokens_per_chunk"] = out["tokens"] / out["chunks"] if out["chunks"] else 0.0
    out["frame_bytes_avg"] = out["bytes"] / out["chunks"] if out["chunks"] else 0.0
    return out


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median of the per-round ratios a[i]/b[i]: rounds alternate, so each pair ran under
    nearly the same background load (steadier than a ratio of medians on a noisy box)."""
    return lib.median([x[key] / y[key] for x, y in zip(a, b, strict=True) if y[key]])


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """A round without its long lists (for the JSON details)."""
    return {
        k: v
        for k, v in r.items()
        if k not in ("latencies_ms", "worst_gaps_ms", "first_frame_ms", "text_sha256", "request_s")
    }


def model_thread_first_token_ms(log_text: str) -> list[float]:
    """The ``first_token_ms`` of each "generation finished" line of a node's text log."""
    out = []
    for line in log_text.splitlines():
        if "generation finished" not in line:
            continue
        for word in line.split():
            if word.startswith("first_token_ms="):
                out.append(float(word.partition("=")[2]))
    return out


class ClientGroup:
    """Client processes that share a target; rounds run on all of them at once."""

    def __init__(self, name: str, children: list[lib.Child]) -> None:
        self.name = name
        self.children = children
        self.ready: list[dict[str, Any]] = []

    async def round(
        self, requests: int, limit_s: float, server: lib.Child | None = None, spread_s: float = 0.0
    ) -> dict[str, Any]:
        """Run ``requests`` requests on every connection; CPU use of the server and clients."""
        server_cpu = lib.group_cpu_seconds(server.pid) if server is not None else 0.0
        client_cpu = sum(lib.cpu_seconds(c.pid) for c in self.children)
        started = time.monotonic()
        for child in self.children:
            await child.send(f"go {requests} {spread_s}")
        results = [await child.event(limit_s) for child in self.children]
        elapsed = time.monotonic() - started
        out = merge(results)
        out["client_cpu_s"] = sum(lib.cpu_seconds(c.pid) for c in self.children) - client_cpu
        out["round_s"] = elapsed
        if server is not None:
            cpu = lib.group_cpu_seconds(server.pid) - server_cpu
            out["server_cpu_s"] = cpu
            out["server_cpu_util"] = cpu / elapsed
            out["server_cpu_us_per_chunk"] = cpu / out["chunks"] * 1e6 if out["chunks"] else 0.0
        return out

    @property
    def opened(self) -> int:
        return sum(r.get("opened", 0) for r in self.ready)

    @property
    def setup_errors(self) -> int:
        return sum(r.get("setup_errors", 0) for r in self.ready)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from node.crypto.curve import SECP256K1_N
        from node.crypto.hostkey import HostKey

        self.args = args
        self.quick: bool = args.quick
        self.tmp = tmp
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self.children: list[lib.Child] = []
        self.noise: dict[str, dict[str, float]] = {}
        # A throwaway host key for this run; it reaches the node only through its env.
        while True:
            scalar = os.urandom(32)
            if 0 < int.from_bytes(scalar, "big") < SECP256K1_N:
                break
        self._node_env = {"HOST_PRIVATE_KEY": "0x" + scalar.hex()}
        self.host_scalar = scalar
        self.host_key = HostKey.parse("0x" + scalar.hex())
        self.host_pub_hex = self.host_key.public_key.hex()

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    # ------------------------------------------------------------------ processes

    async def start_node(
        self,
        name: str,
        *,
        backend: str = "echo",
        cli: list[str] | None = None,
        config: dict[str, Any] | None = None,
        ready_timeout: float = 60.0,
    ) -> tuple[lib.Child, int]:
        port = lib.free_port()
        ledger = str(self.tmp / f"{name}.sqlite3")
        if config is not None:
            full = {
                "host": lib.HOST,
                "port": port,
                "backend": backend,
                "ledger_path": ledger,
                "log_level": "warning",
                "address_init_burst": 0,  # every client runs on this machine
                **config,
            }
            cmd = lib.bench_cmd("node", "--config", json.dumps(full))
        else:
            cmd = [
                sys.executable,
                "-m",
                "node",
                "serve",
                "--backend",
                backend,
                "--host",
                lib.HOST,
                "--port",
                str(port),
                "--ledger",
                ledger,
                "--log-level",
                "warning",
                "--address-init-burst",
                "0",
                *(cli or []),
            ]
        child = await lib.Child.start(name, cmd, log_dir=self.tmp, env=self._node_env, pipes=False)
        self.children.append(child)
        await lib.wait_http_ready(port, ready_timeout, child)
        return child, port

    async def start_clients(
        self,
        name: str,
        port: int,
        *,
        processes: int = 1,
        connections: int = 1,
        mode: str = "encrypted",
        options: list[str] | None = None,
        ready_timeout: float = 60.0,
    ) -> ClientGroup:
        children = []
        for i in range(processes):
            cmd = lib.bench_cmd(
                "client",
                "--port",
                str(port),
                "--mode",
                mode,
                "--connections",
                str(connections),
                "--host-pub",
                self.host_pub_hex,
                *(options or []),
            )
            child = await lib.Child.start(f"{name}-{i}", cmd, log_dir=self.tmp)
            self.children.append(child)
            children.append(child)
        group = ClientGroup(name, children)
        group.ready = [await c.event(ready_timeout) for c in children]
        return group

    async def stop(self, *children: lib.Child) -> None:
        for child in children:
            await child.stop()
            if child in self.children:
                self.children.remove(child)

    async def stop_all(self) -> None:
        await self.stop(*list(self.children))

    # ------------------------------------------------------------------------ B1

    def b1_init(self) -> None:
        from coincurve import PrivateKey, PublicKey
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

        from node.crypto.curve import e2ee_v1_digest
        from node.crypto.session_init import parse_init_payload, seal_session_init
        from node.protocol.connection import ConnectionState, Send
        from node.protocol.messages import decode, encode
        from node.protocol.replay import InitReplayCache

        n = 300 if self.quick else 3000
        warm = 30
        self.say(f"B1: sealing {n + warm} distinct init frames")
        host = self.host_key
        frames = []
        for i in range(n + warm):
            payload = seal_session_init(
                host.public_key,
                PrivateKey(),
                os.urandom(32),
                job_id=i + 1,
                model_name="bench-model",
                price_per_token=1000,
            )
            frames.append(
                json.dumps(
                    {
                        "type": "encrypted_session_init",
                        "session_id": str(i + 1),
                        "job_id": str(i + 1),
                        "chain_id": 84532,
                        "id": f"init-{i}",
                        "payload": payload,
                    }
                )
            )
        # The floor's inputs: the same frames' bytes, decoded ahead. The floor is the work
        # an init cannot avoid: reading the client's ephemeral key as a point (its on-curve
        # check and decompression; the B7 floor counts it too), ECDH, HKDF, decryption and
        # the signer's recovery.
        scalar = self.host_scalar
        host_pub = host.public_key
        inputs = []
        for text in frames:
            init = parse_init_payload(json.loads(text)["payload"])
            eph_bytes = init.ephemeral_public
            digest = e2ee_v1_digest(
                PublicKey(eph_bytes).format(compressed=True),
                host_pub,
                init.salt,
                init.nonce,
                b"",
                init.aad,
            )
            inputs.append(
                (eph_bytes, init.ciphertext, init.nonce, init.aad, init.signature, digest)
            )
        zero_salt = bytes(32)
        cache = InitReplayCache(window_s=900, max_entries=4 * (n + warm), clock=time.monotonic)
        # CPU time of this thread: a preemption by another process is not counted.
        perf = time.thread_time_ns

        def time_init(text: str) -> int:
            state = ConnectionState(host_key=host, replay_cache=cache, clock=time.monotonic)
            t0 = perf()
            message = decode(text)
            actions = state.receive(message)
            out = [encode(a.message) for a in actions if isinstance(a, Send)]
            t1 = perf()
            state.close()
            if len(out) != 1 or '"session_init_ack"' not in out[0]:
                raise RuntimeError("B1: an init was not acknowledged")
            return t1 - t0

        def time_floor(item: tuple[Any, ...]) -> int:
            eph, ct, nonce, aad, sig, digest = item
            t0 = perf()
            x = PublicKey(eph).multiply(scalar).format(compressed=True)[1:]
            prk = hmac.digest(zero_salt, x, "sha256")
            key = hmac.digest(prk, b"\x01", "sha256")
            crypto_aead_xchacha20poly1305_ietf_decrypt(ct, aad or None, nonce, key)
            PublicKey.from_signature_and_message(sig, digest, hasher=None)
            return perf() - t0

        # Blocks of inits and of floors alternate (A B B A ...), so each block ratio is
        # taken under nearly the same background load; the ratio is their median.
        block = 50 if self.quick else 100
        init_ns: list[int] = []
        floor_ns: list[int] = []
        block_ratios: list[float] = []
        gc.collect()
        for i in range(warm):
            time_init(frames[i])
            time_floor(inputs[i])
        for number, start in enumerate(range(warm, len(frames), block)):
            span = range(start, min(start + block, len(frames)))
            got_init: list[int] = []
            got_floor: list[int] = []
            for phase in ("init", "floor") if number % 2 == 0 else ("floor", "init"):
                if phase == "init":
                    got_init += [time_init(frames[i]) for i in span]
                else:
                    got_floor += [time_floor(inputs[i]) for i in span]
            init_ns += got_init
            floor_ns += got_floor
            block_ratios.append(lib.median(got_init) / lib.median(got_floor))

        # The same inits with the CPU caches flushed before each one (32 MiB written, not
        # timed): what an init costs when other work ran since the last one, as in a node
        # that handles one init between a client's other frames. [info]
        cold_n = min(len(frames), 100 if self.quick else 600)
        cold_cache = InitReplayCache(window_s=900, max_entries=4 * cold_n, clock=time.monotonic)
        junk = bytearray(32 << 20)
        cold_ns: list[int] = []
        for text in frames[:cold_n]:
            state = ConnectionState(host_key=host, replay_cache=cold_cache, clock=time.monotonic)
            junk[::64] = bytes(len(junk) // 64)
            t0 = perf()
            actions = state.receive(decode(text))
            _ = [encode(a.message) for a in actions if isinstance(a, Send)]
            t1 = perf()
            state.close()
            cold_ns.append(t1 - t0)
        del junk

        parts: dict[str, list[int]] = {
            "parse": [],
            "ecdh": [],
            "hkdf": [],
            "decrypt": [],
            "recover": [],
        }
        for i, (eph_bytes, ct, nonce, aad, sig, digest) in enumerate(inputs):  # the parts
            t = perf()
            eph = PublicKey(eph_bytes)
            t0 = perf()
            x = eph.multiply(scalar).format(compressed=True)[1:]
            t1 = perf()
            prk = hmac.digest(zero_salt, x, "sha256")
            key = hmac.digest(prk, b"\x01", "sha256")
            t2 = perf()
            crypto_aead_xchacha20poly1305_ietf_decrypt(ct, aad or None, nonce, key)
            t3 = perf()
            PublicKey.from_signature_and_message(sig, digest, hasher=None)
            t4 = perf()
            if i >= warm:
                parts["parse"].append(t0 - t)
                parts["ecdh"].append(t1 - t0)
                parts["hkdf"].append(t2 - t1)
                parts["decrypt"].append(t3 - t2)
                parts["recover"].append(t4 - t3)
        init_us = lib.median(init_ns) / 1000
        floor_us = lib.median(floor_ns) / 1000
        ratio = lib.median(block_ratios)
        self.details["B1"] = {
            "block_ratios": [round(r, 3) for r in block_ratios],
            "inits": n,
            "init_median_us": init_us,
            "init_p90_us": lib.percentile(init_ns, 90) / 1000,
            "init_min_us": min(init_ns) / 1000,
            "floor_median_us": floor_us,
            "floor_parts_median_us": {k: lib.median(v) / 1000 for k, v in parts.items()},
            # As the floor was defined before it counted the key's parse (round two).
            "ratio_to_floor_without_parse": init_us
            / (floor_us - lib.median(parts["parse"]) / 1000),
            "init_ciphertext_bytes": len(inputs[0][1]),
            "init_cold_caches_median_us": lib.median(cold_ns) / 1000,
        }
        self.add(
            Row(
                "B1",
                f"encrypted_session_init CPU, frame text -> ack text (median of {n})",
                init_us,
                "us",
                baseline_label="floor: parse+ECDH+HKDF+decrypt+recover",
                baseline=floor_us,
                ratio=ratio,
                goal="<= 1.7x",
                met=ratio <= 1.7,
            )
        )

        self.add(
            Row(
                "B1",
                f"the same, CPU caches flushed before each init (median of {cold_n})",
                lib.median(cold_ns) / 1000,
                "us",
                baseline_label="B1 CPU above",
                baseline=init_us,
                ratio=lib.median(cold_ns) / 1000 / init_us,
                note="info",
            )
        )

    async def b1_socket(self) -> None:
        """The init as a client sees it: wall clock from sending the init frame to the ack,
        encrypted against plaintext, on one node, in alternating rounds."""
        q = self.quick
        conns = 40 if q else 150
        rounds = 4 if q else 8  # per mode; each connection does one init per round
        cpu_us = self.details["B1"]["init_median_us"]
        self.say(f"B1: init round trips over a socket, {rounds} rounds x {conns} per mode")
        node, port = await self.start_node("b1-node")
        client = await lib.Child.start(
            "b1-client",
            lib.bench_cmd(
                "initclient",
                "--port",
                str(port),
                "--connections",
                str(conns),
                "--host-pub",
                self.host_pub_hex,
            ),
            log_dir=self.tmp,
        )
        self.children.append(client)
        await client.event(120)

        async def one(mode: str) -> dict[str, Any]:
            await client.send(f"go {mode}")
            return await client.event(120)

        await one("encrypted")  # warm-up (first frames, first log lines, caches)
        await one("plaintext")
        got: dict[str, list[dict[str, Any]]] = {"encrypted": [], "plaintext": []}
        for i in range(rounds):
            for mode in ("encrypted", "plaintext") if i % 2 == 0 else ("plaintext", "encrypted"):
                got[mode].append(await one(mode))
        await client.send("quit")
        await self.stop(client, node)
        errors = sum(r["errors"] for rs in got.values() for r in rs)
        med = {mode: [lib.median(r["rtt_us"]) for r in rs] for mode, rs in got.items()}
        diffs = [e - p for e, p in zip(med["encrypted"], med["plaintext"], strict=True)]
        diff = lib.median(diffs)
        enc_all = [x for r in got["encrypted"] for x in r["rtt_us"]]
        pla_all = [x for r in got["plaintext"] for x in r["rtt_us"]]
        self.details["B1"]["socket"] = {
            "connections_per_mode": conns,
            "rounds_per_mode": rounds,
            "encrypted_round_medians_us": med["encrypted"],
            "plaintext_round_medians_us": med["plaintext"],
            "difference_per_round_us": diffs,
            "encrypted_p90_us": lib.percentile(enc_all, 90),
            "plaintext_p90_us": lib.percentile(pla_all, 90),
            "encrypted_p99_us": lib.percentile(enc_all, 99),
            "plaintext_p99_us": lib.percentile(pla_all, 99),
            "encrypted_max_us": max(enc_all, default=float("nan")),
            "plaintext_max_us": max(pla_all, default=float("nan")),
            "errors": errors,
            "error_samples": [e for rs in got.values() for r in rs for e in r["error_samples"]][:5],
        }
        self.add(
            Row(
                "B1",
                "init round trip over a socket, encrypted - plaintext, client wall clock "
                f"({lib.median(med['encrypted']):.0f} vs {lib.median(med['plaintext']):.0f} us, "
                f"{rounds}x{conns} each)",
                diff,
                "us",
                baseline_label="B1 CPU above",
                baseline=cpu_us,
                ratio=diff / cpu_us,
                goal="<= 1.3x",
                met=diff / cpu_us <= 1.3 and errors == 0,
                note=f"{errors} errors" if errors else "",
            )
        )

    # ------------------------------------------------------------------------ B7

    def b7_v2_handshake(self) -> None:
        """Server CPU to accept a v2 session vs a v1 encrypted init, alternating rounds.

        v2: constructing the connection state, message 1 -> message 2 (ephemeral key,
        two ECDH, HKDFs, AEADs) and the session record -> session_ack (decrypt, EIP-191
        recovery); v1: init frame text -> ack text as in B1 (construction not counted,
        so the ratio leans against v2). Client work is done between the timed calls.
        """
        from coincurve import PrivateKey

        from node.crypto.noise import EphemeralPool
        from node.crypto.session_init import seal_session_init
        from node.protocol.connection import ConnectionState, SessionStarted
        from node.protocol.connection import Send as SendV1
        from node.protocol.messages import decode, encode
        from node.protocol.replay import InitReplayCache
        from node.protocol.v2 import ClientConnectionV2, ServerConnectionV2, SessionTerms
        from node.protocol.v2 import Send as SendV2

        per_round = 100 if self.quick else 400
        rounds = 4 if self.quick else 8
        warm = 20
        host = self.host_key
        perf = time.thread_time_ns
        terms = SessionTerms(job_id=1, model="bench-model", price_per_token=1000, chain_id=84532)
        self.say(f"B7: {rounds} alternating rounds of {per_round} v1 inits and v2 handshakes")
        cache = InitReplayCache(
            window_s=900, max_entries=4 * rounds * (per_round + warm), clock=time.monotonic
        )

        def v1_round(count: int) -> list[int]:
            frames = [
                json.dumps(
                    {
                        "type": "encrypted_session_init",
                        "session_id": "1",
                        "job_id": "1",
                        "chain_id": 84532,
                        "id": f"init-{i}",
                        "payload": seal_session_init(
                            host.public_key,
                            PrivateKey(),
                            os.urandom(32),
                            job_id=1,
                            model_name="bench-model",
                            price_per_token=1000,
                        ),
                    }
                )
                for i in range(count)
            ]
            out = []
            gc.collect()
            for text in frames:
                state = ConnectionState(host_key=host, replay_cache=cache, clock=time.monotonic)
                t0 = perf()
                actions = state.receive(decode(text))
                sent = [encode(a.message) for a in actions if isinstance(a, SendV1)]
                t1 = perf()
                if len(sent) != 1 or '"session_init_ack"' not in sent[0]:
                    raise RuntimeError("B7: a v1 init was not acknowledged")
                out.append(t1 - t0)
                state.close()
            return out

        def v2_round(count: int) -> tuple[list[int], list[int], list[int]]:
            keys = [PrivateKey() for _ in range(count)]
            total, first, second = [], [], []
            # As the node does: ephemeral keys made ahead, off the handshake path (the
            # node's EphemeralKeys refills in a worker thread); each used once.
            pool = EphemeralPool(count)
            pool.fill()
            gc.collect()
            for key in keys:
                client = ClientConnectionV2(host.public_key)
                msg1 = client.start()
                t0 = perf()
                server = ServerConnectionV2(
                    host_key=host, clock=time.monotonic, ephemeral=pool.take()
                )
                (reply,) = server.receive(msg1)
                t1 = perf()
                assert isinstance(reply, SendV2)
                client.receive(reply.frame)
                record = client.session(terms, key)
                t2 = perf()
                actions = server.receive(record)
                t3 = perf()
                if not any(isinstance(a, SessionStarted) for a in actions):
                    raise RuntimeError("B7: a v2 session was not accepted")
                client.receive(next(a.frame for a in actions if isinstance(a, SendV2)))
                total.append((t1 - t0) + (t3 - t2))
                first.append(t1 - t0)
                second.append(t3 - t2)
                client.wipe()
                server.close()
            return total, first, second

        v1_round(warm)
        v2_round(warm)
        v1_med: list[float] = []
        v2_med: list[float] = []
        parts: dict[str, list[float]] = {"message1": [], "session_record": []}
        for r in range(rounds):
            order = ("v1", "v2") if r % 2 == 0 else ("v2", "v1")
            for kind in order:
                if kind == "v1":
                    v1_med.append(lib.median(v1_round(per_round)) / 1000)
                else:
                    total, first, second = v2_round(per_round)
                    v2_med.append(lib.median(total) / 1000)
                    parts["message1"].append(lib.median(first) / 1000)
                    parts["session_record"].append(lib.median(second) / 1000)
        ratios = [b / a for a, b in zip(v1_med, v2_med, strict=True)]
        ratio = lib.median(ratios)
        # The floors: elliptic-curve work each cannot avoid, on this machine, this run.
        # v1: one ECDH and one signature recovery; v2: an ephemeral key, two ECDH (es,
        # ee) and one recovery.
        from coincurve import PublicKey

        peer = PrivateKey().public_key.format()
        digest = os.urandom(32)
        sig = PrivateKey().sign_recoverable(digest, hasher=None)
        scalar = PrivateKey().secret
        floor: dict[str, list[int]] = {"ecdh": [], "keygen": [], "recover": []}
        for _ in range(per_round):
            t0 = perf()
            PublicKey(peer).multiply(scalar).format()
            t1 = perf()
            PrivateKey().public_key.format()
            t2 = perf()
            PublicKey.from_signature_and_message(sig, digest, hasher=None)
            t3 = perf()
            floor["ecdh"].append(t1 - t0)
            floor["keygen"].append(t2 - t1)
            floor["recover"].append(t3 - t2)
        f = {k: lib.median(v) / 1000 for k, v in floor.items()}
        floor_v1 = f["ecdh"] + f["recover"]
        # the ephemeral key comes from the pool: off the timed path, not in the floor
        floor_v2 = 2 * f["ecdh"] + f["recover"]
        # the node's total CPU per handshake still includes making that key (in the
        # pool's worker thread): the ratio with it added back
        ratio_with_keygen = (lib.median(v2_med) + f["keygen"]) / lib.median(v1_med)
        self.details["B7"] = {
            "floor_parts_median_us": f,
            "floor_v1_us": floor_v1,
            "floor_v2_us": floor_v2,
            "floor_ratio": floor_v2 / floor_v1,
            "ratio_with_pooled_keygen": ratio_with_keygen,
            "rounds": rounds,
            "per_round": per_round,
            "v1_init_median_us_per_round": v1_med,
            "v2_handshake_median_us_per_round": v2_med,
            "v2_parts_median_us": {k: lib.median(v) for k, v in parts.items()},
            "ratio_per_round": ratios,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        self.add(
            Row(
                "B7",
                f"v2 handshake server CPU, msg1 + session record (median of {rounds} rounds "
                f"of {per_round}; ratio spread {min(ratios):.2f}-{max(ratios):.2f})",
                lib.median(v2_med),
                "us",
                baseline_label="v1 encrypted_session_init",
                baseline=lib.median(v1_med),
                ratio=ratio,
                goal="<= 1.3x",
                met=ratio <= 1.3,
                note=f"EC floor ratio {floor_v2 / floor_v1:.2f}x; with the pooled key's "
                f"generation ({f['keygen']:.0f} us, worker thread) {ratio_with_keygen:.2f}x",
            )
        )

    # ------------------------------------------------------------------------ B8

    async def b8_v2_streaming(self) -> None:
        """Echo streaming over v2 vs v1 encrypted: one node, alternating rounds."""
        q = self.quick
        words = 2000 if q else 4000
        conns = 2
        per_round = 2 if q else 4
        rounds = 4 if q else 12
        self.say(f"B8: v2 vs v1 encrypted, {conns} connections x {per_round} x {words} words")
        node, port = await self.start_node("b8-node")
        opts = ["--prompt-words", str(words)]
        modes = ("encrypted", "v2")
        groups = {
            mode: await self.start_clients(
                f"b8-{mode}", port, connections=conns, mode=mode, options=opts
            )
            for mode in modes
        }
        got: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for group in groups.values():  # warm-up
            await group.round(1, 120)
        for i in range(rounds):
            order = modes if i % 2 == 0 else modes[::-1]
            for mode in order:
                got[mode].append(await groups[mode].round(per_round, 300, node))
        await self.stop(*(c for g in groups.values() for c in g.children), node)
        med = {
            mode: {
                "tokens_per_s": lib.median([r["tokens_per_s"] for r in rs]),
                "chunks_per_s": lib.median([r["chunks_per_s"] for r in rs]),
                "tokens_per_chunk": lib.median([r["tokens_per_chunk"] for r in rs]),
                "node_cpu_us_per_token": lib.median(
                    [r["server_cpu_s"] / r["tokens"] * 1e6 for r in rs if r["tokens"]]
                ),
                "errors": sum(r["errors"] for r in rs),
                "rounds": [summary(r) for r in rs],
            }
            for mode, rs in got.items()
        }
        ratios = [
            b["tokens_per_s"] / a["tokens_per_s"]
            for a, b in zip(got["encrypted"], got["v2"], strict=True)
            if a["tokens_per_s"]
        ]
        self.details["B8"] = {
            "words": words,
            "connections": conns,
            "requests_per_round": per_round,
            "ratio_per_round": ratios,
            **med,
        }
        v2, v1 = med["v2"], med["encrypted"]
        errors = v2["errors"] + v1["errors"]
        ratio = paired_ratio(got["v2"], got["encrypted"], "tokens_per_s")
        self.add(
            Row(
                "B8",
                f"v2 tokens/s, echo over WebSocket (ratio spread {min(ratios):.2f}-"
                f"{max(ratios):.2f} over {rounds} rounds)",
                v2["tokens_per_s"],
                "tok/s",
                baseline_label="v1 encrypted",
                baseline=v1["tokens_per_s"],
                ratio=ratio,
                goal=">= 1.0x",
                met=ratio >= 1.0 and errors == 0,
                note=f"{errors} errors" if errors else "",
            )
        )
        self.add(
            Row(
                "B8",
                "node CPU per token, v2 (ratio = capacity if the node is the bottleneck)",
                v2["node_cpu_us_per_token"],
                "us",
                baseline_label="v1 encrypted",
                baseline=v1["node_cpu_us_per_token"],
                ratio=v1["node_cpu_us_per_token"] / v2["node_cpu_us_per_token"],
                note="info",
            )
        )

    # ------------------------------------------------------------------------ P1

    async def p1_proxy(self) -> None:
        """First token and tokens/s through ``llm-node proxy`` vs node.client, same node.

        One echo node (a per-token delay stands in for a model), one proxy in front of it
        (its own process, as a user runs it). This process is the client of both: direct
        requests on one node.client v2 session, proxied ones as streaming HTTP requests
        (``stream: true``, one TCP connection each, as curl makes;
        read with a bare socket client, so the figure is the proxy's cost, not a client
        library's),
        alternating, so that both see the same machine load.
        """
        from node.client import open_session

        q = self.quick
        words = 100 if q else 200
        delay_ms = 2.0
        requests = 10 if q else 40
        self.say(f"P1: proxy vs direct, {requests} requests each of {words} words")
        node, port = await self.start_node("p1-node", cli=["--echo-delay-ms", str(delay_ms)])
        node_url = f"http://{lib.HOST}:{port}"
        proxy_port = lib.free_port()
        cmd = [
            sys.executable,
            "-m",
            "node",
            "proxy",
            "--node",
            node_url,
            "--listen",
            f"{lib.HOST}:{proxy_port}",
            "--expect-host-address",
            self.host_key.address,
            "--log-level",
            "warning",
        ]
        proxy = await lib.Child.start("p1-proxy", cmd, log_dir=self.tmp, pipes=False)
        self.children.append(proxy)
        await lib.wait_http_ready(proxy_port, 60.0, proxy)
        prompt = lib.bench_prompt(words)
        body = {
            "model": "echo",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        got: dict[str, list[tuple[float, float]]] = {"direct": [], "proxy": []}

        request = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {lib.HOST}:{proxy_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(request)}\r\n\r\n"
        ).encode()
        usage_re = re.compile(rb'"usage":\{"prompt_tokens":\d+,"completion_tokens":(\d+)')

        async def proxied() -> tuple[float, float]:
            # A lean HTTP client (what curl does), so that the figure is the proxy's cost
            # rather than a client library's; it reads events as they arrive.
            started = time.perf_counter()
            first: float | None = None
            data = b""
            stream = await trio.open_tcp_stream(lib.HOST, proxy_port)
            async with stream:
                await stream.send_all(head + request)
                while b"data: [DONE]" not in data:
                    got = await stream.receive_some(65536)
                    if not got:
                        raise RuntimeError("the proxy closed before data: [DONE]")
                    data += got
                    if first is None and b'"delta":{"content":"' in data:
                        first = time.perf_counter()
            ended = time.perf_counter()
            match = usage_re.search(data)
            if first is None or match is None or not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError("the proxy's answer had no text or no usage")
            return first - started, int(match.group(1)) / (ended - started)

        async with open_session(
            node_url, model="echo", job_id=1, host_public_key=self.host_pub_hex, protocol="v2"
        ) as session:
            # Warm-up: the proxy opens its pooled session on its first request.
            await proxied()
            await session.complete(prompt, max_tokens=None, temperature=None)
            for i in range(requests):
                for way in ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"):
                    if way == "direct":
                        started = time.perf_counter()
                        stream = session.stream(prompt, max_tokens=None, temperature=None)
                        first_at: float | None = None
                        async for _ in stream:
                            if first_at is None:
                                first_at = time.perf_counter()
                        ended = time.perf_counter()
                        done = stream.completion
                        assert done is not None
                        assert first_at is not None
                        got[way].append(
                            (first_at - started, done.completion_tokens / (ended - started))
                        )
                    else:
                        got[way].append(await proxied())
        await self.stop(proxy, node)
        ttft = {w: lib.median([r[0] * 1000 for r in rs]) for w, rs in got.items()}
        tps = {w: lib.median([r[1] for r in rs]) for w, rs in got.items()}
        self.details["P1"] = {
            "words": words,
            "echo_delay_ms": delay_ms,
            "requests": requests,
            "first_token_ms": ttft,
            "tokens_per_s": tps,
            "first_token_ms_p90": {
                w: lib.percentile([r[0] * 1000 for r in rs], 90) for w, rs in got.items()
            },
        }
        extra = ttft["proxy"] - ttft["direct"]
        self.add(
            Row(
                "P1",
                f"first token through the proxy, median of {requests} (+{extra:.2f} ms)",
                ttft["proxy"],
                "ms",
                baseline_label="node.client direct",
                baseline=ttft["direct"],
                ratio=ttft["proxy"] / ttft["direct"] if ttft["direct"] else None,
                goal="+3 ms or less",
                met=extra <= 3.0,
            )
        )
        ratio = tps["proxy"] / tps["direct"]
        self.add(
            Row(
                "P1",
                f"tokens/s through the proxy ({words}-word echo, {delay_ms:g} ms per token)",
                tps["proxy"],
                "tok/s",
                baseline_label="node.client direct",
                baseline=tps["direct"],
                ratio=ratio,
                goal=">= 0.9x",
                met=ratio >= 0.9,
            )
        )

    # ------------------------------------------------------------------------ B2

    async def b2_streaming(self) -> None:
        q = self.quick
        words = 2000 if q else 4000
        conns = 2
        per_round = 2 if q else 4
        rounds = 2 if q else 6
        self.say(
            f"B2: node (echo) with {conns} connections x {per_round} requests of {words} words"
        )
        node, port = await self.start_node("b2-node")
        opts = ["--prompt-words", str(words)]
        groups = {
            mode: await self.start_clients(
                f"b2-{mode}", port, connections=conns, mode=mode, options=opts
            )
            for mode in ("plaintext", "encrypted")
        }
        got: dict[str, list[dict[str, Any]]] = {"plaintext": [], "encrypted": []}
        for group in groups.values():  # warm-up
            await group.round(1, 120)
        for i in range(rounds):
            order = ("plaintext", "encrypted") if i % 2 == 0 else ("encrypted", "plaintext")
            for mode in order:
                got[mode].append(await groups[mode].round(per_round, 300, node))
        await self.stop(*(c for g in groups.values() for c in g.children), node)
        med = {
            mode: {
                "tokens_per_s": lib.median([r["tokens_per_s"] for r in rs]),
                "chunks_per_s": lib.median([r["chunks_per_s"] for r in rs]),
                "tokens_per_chunk": lib.median([r["tokens_per_chunk"] for r in rs]),
                "node_cpu_us_per_chunk": lib.median([r["server_cpu_us_per_chunk"] for r in rs]),
                "node_cpu_util": lib.median([r["server_cpu_util"] for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "rounds": [summary(r) for r in rs],
            }
            for mode, rs in got.items()
        }
        self.details["B2"] = {
            "words": words,
            "connections": conns,
            "requests_per_round": per_round,
            **med,
        }
        enc, pla = med["encrypted"], med["plaintext"]
        errors = enc["errors"] + pla["errors"]
        ratio = paired_ratio(got["encrypted"], got["plaintext"], "tokens_per_s")
        self.add(
            Row(
                "B2",
                "encrypted tokens/s, echo over WebSocket",
                enc["tokens_per_s"],
                "tok/s",
                baseline_label="plaintext",
                baseline=pla["tokens_per_s"],
                ratio=ratio,
                goal=">= 0.87x",
                met=ratio >= 0.87 and errors == 0,
                note=f"{errors} errors" if errors else "",
            )
        )
        self.add(
            Row(
                "B2",
                f"encrypted chunks/s ({enc['tokens_per_chunk']:.1f} vs "
                f"{pla['tokens_per_chunk']:.1f} tok/chunk)",
                enc["chunks_per_s"],
                "ch/s",
                baseline_label="plaintext",
                baseline=pla["chunks_per_s"],
                ratio=paired_ratio(got["encrypted"], got["plaintext"], "chunks_per_s"),
            )
        )
        cpu = {
            mode: lib.median([r["server_cpu_s"] / r["tokens"] * 1e6 for r in rs if r["tokens"]])
            for mode, rs in got.items()
        }
        self.details["B2"]["node_cpu_us_per_token"] = cpu
        self.add(
            Row(
                "B2",
                "node CPU per token, encrypted (ratio = capacity if the node is the bottleneck)",
                cpu["encrypted"],
                "us",
                baseline_label="plaintext",
                baseline=cpu["plaintext"],
                ratio=cpu["plaintext"] / cpu["encrypted"],
                note="info",
            )
        )

    # ------------------------------------------------------------------------ B3

    async def b3_ceiling(self) -> None:
        q = self.quick
        words = 2000 if q else 4000
        per_round = 2 if q else 4
        rounds = 2 if q else 4
        slow_words = 1000 if q else 3000
        slow_ms = 1.0
        fixed_key = os.urandom(32).hex()  # a benchmark-only key shared with the bare server
        self.say("B3: node without coalescing vs a bare trio-websocket server")
        bare = await lib.Child.start(
            "b3-bare",
            lib.bench_cmd("bare", "--fixed-key", fixed_key, "--prompt-words", str(words)),
            log_dir=self.tmp,
        )
        self.children.append(bare)
        bare_ready = await bare.event(60)
        node, port = await self.start_node("b3-node-perframe", config={"coalesce": False})
        opts = ["--prompt-words", str(words)]
        g_node = await self.start_clients("b3-c-node", port, options=opts)
        g_bare = await self.start_clients(
            "b3-c-bare", bare_ready["port"], options=[*opts, "--fixed-key", fixed_key]
        )
        got: dict[str, list[dict[str, Any]]] = {"node": [], "bare": []}
        for g in (g_node, g_bare):
            await g.round(1, 120)
        servers = {"node": node, "bare": bare}
        for i in range(rounds):
            pairs = [("node", g_node), ("bare", g_bare)]
            for name, g in pairs if i % 2 == 0 else pairs[::-1]:
                got[name].append(await g.round(per_round, 300, servers[name]))
        await self.stop(*g_node.children, *g_bare.children, node, bare)

        self.say(f"B3: coalescing on, a client that spends {slow_ms} ms per frame")
        bare = await lib.Child.start(
            "b3-bare-slow",
            lib.bench_cmd("bare", "--fixed-key", fixed_key, "--prompt-words", str(slow_words)),
            log_dir=self.tmp,
        )
        self.children.append(bare)
        bare_ready = await bare.event(60)
        node, port = await self.start_node("b3-node-coalesce", config={"coalesce": True})
        slow = ["--prompt-words", str(slow_words), "--slow-ms", str(slow_ms), "--rcvbuf", "16384"]
        s_node = await self.start_clients("b3-slow-node", port, options=slow)
        s_bare = await self.start_clients(
            "b3-slow-bare", bare_ready["port"], options=[*slow, "--fixed-key", fixed_key]
        )
        slow_node = await s_node.round(1, 300, node)
        slow_bare = await s_bare.round(1, 300, bare)
        await self.stop(*s_node.children, *s_bare.children, node, bare)

        node_cps = lib.median([r["chunks_per_s"] for r in got["node"]])
        bare_cps = lib.median([r["chunks_per_s"] for r in got["bare"]])
        errors = sum(r["errors"] for rs in got.values() for r in rs)
        node_fb = lib.median([r["frame_bytes_avg"] for r in got["node"]])
        bare_fb = lib.median([r["frame_bytes_avg"] for r in got["bare"]])
        self.details["B3"] = {
            "words": words,
            "node_frame_bytes_avg": node_fb,
            "bare_frame_bytes_avg": bare_fb,
            "node_cpu_us_per_frame": lib.median(
                [r["server_cpu_us_per_chunk"] for r in got["node"]]
            ),
            "bare_cpu_us_per_frame": lib.median(
                [r["server_cpu_us_per_chunk"] for r in got["bare"]]
            ),
            "node_cpu_util": lib.median([r["server_cpu_util"] for r in got["node"]]),
            "bare_cpu_util": lib.median([r["server_cpu_util"] for r in got["bare"]]),
            "client_cpu_util_with_node": lib.median(
                [r["client_cpu_s"] / r["round_s"] for r in got["node"]]
            ),
            "client_cpu_util_with_bare": lib.median(
                [r["client_cpu_s"] / r["round_s"] for r in got["bare"]]
            ),
            "node_rounds": [summary(r) for r in got["node"]],
            "bare_rounds": [summary(r) for r in got["bare"]],
            "slow_client_ms_per_frame": slow_ms,
            "slow_words": slow_words,
            "slow_node": summary(slow_node),
            "slow_bare": summary(slow_bare),
        }
        ratio = paired_ratio(got["node"], got["bare"], "chunks_per_s")
        self.add(
            Row(
                "B3",
                f"node chunks/s, 1 token/frame ({node_fb:.0f} B vs {bare_fb:.0f} B frames)",
                node_cps,
                "fr/s",
                baseline_label="bare trio-websocket",
                baseline=bare_cps,
                ratio=ratio,
                goal=">= 0.8x",
                met=ratio >= 0.8 and errors == 0,
                note=f"{errors} errors" if errors else "",
            )
        )
        node_cpu = self.details["B3"]["node_cpu_us_per_frame"]
        bare_cpu = self.details["B3"]["bare_cpu_us_per_frame"]
        self.add(
            Row(
                "B3",
                "server CPU per frame, node (ratio = capacity if the server is the bottleneck)",
                node_cpu,
                "us",
                baseline_label="bare",
                baseline=bare_cpu,
                ratio=bare_cpu / node_cpu if node_cpu else None,
                note="info",
            )
        )
        slow_errors = slow_node["errors"] + slow_bare["errors"]
        sratio = slow_node["tokens_per_s"] / slow_bare["tokens_per_s"]
        self.add(
            Row(
                "B3",
                "coalescing on, slow client: tokens/s "
                f"({slow_node['tokens_per_chunk']:.1f} tok/frame)",
                slow_node["tokens_per_s"],
                "tok/s",
                baseline_label="bare, same slow client",
                baseline=slow_bare["tokens_per_s"],
                ratio=sratio,
                goal="> 1x",
                met=sratio > 1.0 and slow_errors == 0,
            )
        )

    # ------------------------------------------------------------------------ B4

    async def b4_scale(self) -> None:
        q = self.quick
        wanted = self.args.sessions or (300 if q else 2000)
        procs = 1 if wanted <= 500 else 2
        conns = -(-wanted // procs)
        sessions = procs * conns
        pieces, delay_ms = 10, 50.0
        spread_s = max(1.0, sessions / 100.0)
        self.say(
            f"B4: {sessions} concurrent encrypted sessions ({pieces} pieces x {delay_ms:.0f} ms)"
        )
        workers = self.args.b4_workers
        node, port = await self.start_node(
            "b4-node",
            cli=[
                "--echo-delay-ms",
                str(delay_ms),
                "--max-connections",
                str(sessions + 500),
                "--workers",
                str(workers),
            ],
        )
        opts = [
            "--prompt-words",
            str(pieces),
            "--delay-ms",
            str(delay_ms),
            "--record-latency",
            "--connect-concurrency",
            "64",
            "--request-timeout",
            "120",
        ]
        await trio.sleep(0.5)
        rss_before = lib.group_rss_kib(node.pid)
        alone = await self.start_clients("b4-alone", port, options=opts)
        await alone.round(1, 60, node)  # warm-up
        solo = await alone.round(1, 60, node)
        await self.stop(*alone.children)
        group = await self.start_clients(
            "b4-c", port, processes=procs, connections=conns, options=opts, ready_timeout=300
        )
        opened = group.opened
        setup_errors = group.setup_errors
        await trio.sleep(0.3)
        rss_idle = lib.group_rss_kib(node.pid)
        peak = rss_idle

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, lib.group_rss_kib(node.pid))
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            burst = await group.round(1, 300, node)
            nursery.cancel_scope.cancel()
        self.say(f"B4: again, request starts spread over {spread_s:.1f} s")
        spread = await group.round(1, 300, node, spread_s=spread_s)
        await self.stop(*group.children, node)

        lat = burst["latencies_ms"]
        lat_spread = spread["latencies_ms"]
        errors = setup_errors + burst["errors"] + spread["errors"] + (sessions - opened)
        per_session_idle = (rss_idle - rss_before) / max(opened, 1)
        per_session_peak = (peak - rss_before) / max(opened, 1)
        p99 = lib.percentile(lat, 99)
        p99_spread = lib.percentile(lat_spread, 99)
        p99_solo = lib.percentile(solo["latencies_ms"], 99)
        offered = sessions * 1000.0 / delay_ms
        offered_spread = sessions * pieces / (spread_s + pieces * delay_ms / 1000)
        gaps = burst["worst_gaps_ms"]
        gaps_spread = spread["worst_gaps_ms"]
        gaps_solo = solo["worst_gaps_ms"]

        def lat_summary(values: list[float]) -> dict[str, float]:
            return {q: lib.percentile(values, float(q[1:])) for q in ("p50", "p90", "p99")} | {
                "max": max(values) if values else float("nan")
            }

        self.details["B4"] = {
            "sessions": sessions,
            "client_processes": procs,
            "opened": opened,
            "setup_errors": setup_errors,
            "setup_error_samples": [
                s for r in group.ready for s in r.get("setup_error_samples", [])
            ],
            "rss_before_kib": rss_before,
            "rss_idle_sessions_kib": rss_idle,
            "rss_peak_streaming_kib": peak,
            "rss_per_session_idle_kib": per_session_idle,
            "rss_per_session_peak_kib": per_session_peak,
            "solo": {"latency_ms": lat_summary(solo["latencies_ms"]), **summary(solo)},
            "node_workers": workers,
            "solo_worst_gap_ms": lat_summary(gaps_solo),
            "all_at_once": {
                "offered_pieces_per_s": offered,
                "latency_ms": lat_summary(lat),
                "worst_gap_ms": lat_summary(gaps),
                "first_frame_ms": lat_summary(burst["first_frame_ms"]),
                **summary(burst),
            },
            "spread": {
                "spread_s": spread_s,
                "offered_pieces_per_s": offered_spread,
                "latency_ms": lat_summary(lat_spread),
                "worst_gap_ms": lat_summary(gaps_spread),
                "first_frame_ms": lat_summary(spread["first_frame_ms"]),
                **summary(spread),
            },
        }
        tag = "quick: fewer sessions" if q and not self.args.sessions else ""
        if workers != 1:
            tag = f"{tag}, --workers {workers}" if tag else f"--workers {workers}"
        self.add(
            Row(
                "B4",
                f"{sessions} sessions: errors",
                errors,
                "",
                goal="0",
                met=errors == 0,
                note=tag,
            )
        )
        self.add(
            Row(
                "B4",
                f"node RSS per session, peak while streaming (idle: {per_session_idle:.1f} KiB)",
                per_session_peak,
                "KiB",
                baseline_label=f"node before: {rss_before / 1024:.0f} MiB",
                goal="<= 64 KiB",
                met=per_session_peak <= 64,
            )
        )
        self.add(
            Row(
                "B4",
                f"p99 chunk latency, all {sessions} at once ({offered:,.0f} pieces/s offered, "
                f"{burst['tokens_per_s']:,.0f} delivered, "
                f"node CPU {burst.get('server_cpu_util', 0):.0%})",
                p99,
                "ms",
                baseline_label="1 session alone",
                baseline=p99_solo,
                goal="<= 50 ms",
                met=p99 <= 50,
            )
        )
        gap_p99 = lib.percentile(gaps, 99)
        self.add(
            Row(
                "B4",
                f"per-stream worst gap between two frames, all {sessions} at once: p99 "
                f"(p50 {lib.percentile(gaps, 50):,.0f} ms, max {max(gaps, default=0):,.0f} ms, "
                f"{sum(1 for g in gaps if g > 1000)} streams over 1 s)",
                gap_p99,
                "ms",
                baseline_label="1 session alone",
                baseline=lib.percentile(gaps_solo, 99),
                goal="<= 1000 ms",
                met=gap_p99 <= 1000 and errors == 0,
            )
        )
        firsts = burst["first_frame_ms"]
        where = ", ".join(f"{n} at a {k}" for k, n in sorted(burst["worst_gap_where"].items()))
        self.details["B4"]["all_at_once"]["worst_gap_where"] = burst["worst_gap_where"]
        self.add(
            Row(
                "B4",
                f"time to a stream's first frame, all {sessions} at once: p99 "
                f"(p50 {lib.percentile(firsts, 50):,.0f} ms; worst gaps ended {where})",
                lib.percentile(firsts, 99),
                "ms",
                baseline_label="1 session alone",
                baseline=lib.percentile(solo["first_frame_ms"], 99),
                note="info",
            )
        )
        self.add(
            Row(
                "B4",
                f"p99 chunk latency, starts spread over {spread_s:.0f} s "
                f"(~{offered_spread:,.0f} pieces/s)",
                p99_spread,
                "ms",
                baseline_label="1 session alone",
                baseline=p99_solo,
                goal="<= 50 ms",
                met=p99_spread <= 50,
                note="info",
            )
        )
        self.add(
            Row(
                "B4",
                f"per-stream worst gap, starts spread over {spread_s:.0f} s: p99 "
                f"(p50 {lib.percentile(gaps_spread, 50):,.0f} ms, "
                f"max {max(gaps_spread, default=0):,.0f} ms)",
                lib.percentile(gaps_spread, 99),
                "ms",
                baseline_label="1 session alone",
                baseline=lib.percentile(gaps_solo, 99),
                note="info",
            )
        )

    # ------------------------------------------------------------------------ B5

    async def b5_model(self) -> None:
        q = self.quick
        max_tokens = 32 if q else 128
        rounds = 1 if q else 8
        pairs = 6 if q else 32
        threads = self.args.model_threads
        self.say(
            f"B5: node (llama, encrypted) vs llama-cpp-python alone, {max_tokens} tokens greedy"
        )
        direct = await lib.Child.start(
            "b5-direct",
            lib.bench_cmd(
                "direct",
                "--prompt-text",
                B5_PROMPT,
                "--max-tokens",
                str(max_tokens),
                "--model-threads",
                str(threads),
            ),
            log_dir=self.tmp,
        )
        self.children.append(direct)
        await direct.event(120)
        # At log level info the node logs each generation's own first-token time (from the
        # model thread's start to the first token, as the direct child times it).
        node, port = await self.start_node(
            "b5-node",
            backend="llama",
            cli=["--n-threads", str(threads), "--log-level", "info"],
            ready_timeout=120,
        )

        def client_options(tokens: int) -> list[str]:
            return [
                "--prompt-text",
                B5_PROMPT,
                "--max-tokens",
                str(tokens),
                "--temperature",
                "0",
                "--request-timeout",
                "300",
            ]

        client = await self.start_clients("b5-client", port, options=client_options(max_tokens))
        # First-token rounds: a second session whose requests stop after a few tokens; its
        # client also reads how long the node's threads waited for a CPU meanwhile.
        short = await self.start_clients(
            "b5-first",
            port,
            options=[
                *client_options(B5_FIRST_TOKEN_MAX_TOKENS),
                "--watch-pid",
                str(node.pid),
            ],
        )

        async def run_direct(tokens: int = max_tokens) -> dict[str, Any]:
            await direct.send(f"go {tokens}")
            return await direct.event(300)

        got: dict[str, list[dict[str, Any]]] = {"node": [], "direct": []}
        await run_direct()  # warm-up
        await client.round(1, 300)
        await short.round(1, 300)
        for i in range(rounds):
            for name in ("direct", "node") if i % 2 == 0 else ("node", "direct"):
                if name == "direct":
                    got["direct"].append(await run_direct())
                else:
                    got["node"].append(await client.round(1, 300))
        # First token, measured apart from decoding: many short requests, each node one
        # next to a direct one (order alternating), so every pair ran under nearly the same
        # load; the figure is the median of the per-pair differences.
        first: dict[str, list[dict[str, Any]]] = {"node": [], "direct": []}
        for i in range(pairs):
            for name in ("direct", "node") if i % 2 == 0 else ("node", "direct"):
                if name == "direct":
                    first["direct"].append(await run_direct(B5_FIRST_TOKEN_MAX_TOKENS))
                else:
                    first["node"].append(await short.round(1, 300))
        await direct.send("quit")
        await self.stop(*client.children, *short.children, node, direct)
        logged = model_thread_first_token_ms(node.log_path.read_text(errors="replace"))
        if len(logged) < pairs:
            raise RuntimeError(f"B5: the node logged {len(logged)} generations, not {pairs}+")
        inside_ms = logged[-pairs:]  # the first-token rounds came last
        # The node's part of a first token without the model: the same client, prompt and
        # encrypted path against an echo node (its reply starts at once), back to back
        # ("hot") and after the node and the client sat idle as long as a model request
        # keeps them waiting ("idle": caches and CPUs gone cold, as before a model's token).
        idle_s = lib.median([r["first_token_s"][0] for r in first["node"] if r["first_token_s"]])
        echo, echo_port = await self.start_node("b5-echo", backend="echo")
        probe = await self.start_clients(
            "b5-echo-client", echo_port, options=client_options(B5_FIRST_TOKEN_MAX_TOKENS)
        )
        await probe.round(1, 30)
        echo_ms: dict[str, list[float]] = {"hot": [], "idle": []}
        for i in range(10 if q else 40):
            kind = "idle" if i % 2 else "hot"
            if kind == "idle":
                await trio.sleep(idle_s)
            r = await probe.round(1, 30)
            echo_ms[kind].extend(1000 * t for t in r["first_token_s"])
            if r["errors"]:
                raise RuntimeError(f"B5: the echo probe failed ({r['errors']} errors)")
        await self.stop(*probe.children, echo)
        node_rate = lib.median([r["decode_tok_s"][0] for r in got["node"] if r["decode_tok_s"]])
        direct_rate = lib.median([r["decode_tok_s"] for r in got["direct"]])
        same = True
        for runs in (got, first):
            node_hashes = {h for r in runs["node"] for h in r["text_sha256"]}
            direct_hashes = {r["text_sha256"] for r in runs["direct"]}
            same = same and node_hashes == direct_hashes and len(node_hashes) == 1
        errors = sum(r["errors"] for r in got["node"] + first["node"])
        diffs_ms = [
            1000 * (n["first_token_s"][0] - d["first_token_s"])
            for n, d in zip(first["node"], first["direct"], strict=True)
            if n["first_token_s"]
        ]
        diff_ms = lib.median(diffs_ms)
        low, high = lib.median_interval(diffs_ms)
        # The same pairs with each side's run-queue wait (time its threads were ready to
        # run but other work held the CPUs) taken out of its first-token time.
        busy_ms = [
            1000
            * (
                (n["first_token_s"][0] - n["first_token_wait_s"][0])
                - (d["first_token_s"] - d["first_token_wait_s"])
            )
            for n, d in zip(first["node"], first["direct"], strict=True)
            if n["first_token_s"] and n["first_token_wait_s"]
        ]
        waits_ms = [1000 * w for r in first["node"] for w in r["first_token_wait_s"]] + [
            1000 * r["first_token_wait_s"] for r in first["direct"]
        ]
        node_first = lib.median(
            [r["first_token_s"][0] for r in first["node"] if r["first_token_s"]]
        )
        direct_first = lib.median([r["first_token_s"] for r in first["direct"]])
        long_first = lib.median(
            [
                1000 * (n["first_token_s"][0] - d["first_token_s"])
                for n, d in zip(got["node"], got["direct"], strict=True)
                if n["first_token_s"]
            ]
        )
        self.details["B5"] = {
            "max_tokens": max_tokens,
            "rounds": rounds,
            "model_threads": threads,
            "node": [summary(r) for r in got["node"]],
            "direct": got["direct"],
            "first_token_pairs": pairs,
            "first_token_max_tokens": B5_FIRST_TOKEN_MAX_TOKENS,
            "first_token_node_s": [r["first_token_s"] for r in first["node"]],
            "first_token_direct_s": [r["first_token_s"] for r in first["direct"]],
            "first_token_diff_ms": [round(d, 3) for d in diffs_ms],
            "first_token_diff_ci95_ms": [low, high],
            "first_token_diff_in_decode_rounds_ms": long_first,
            "first_token_echo_hot_ms": [round(x, 3) for x in echo_ms["hot"]],
            "first_token_echo_idle_ms": [round(x, 3) for x in echo_ms["idle"]],
            "first_token_node_wait_s": [r["first_token_wait_s"] for r in first["node"]],
            "first_token_direct_wait_s": [r["first_token_wait_s"] for r in first["direct"]],
            "first_token_diff_without_wait_ms": [round(d, 3) for d in busy_ms],
            "first_token_diff_without_wait_median_ms": lib.median(busy_ms),
            "first_token_diff_without_wait_ci95_ms": list(lib.median_interval(busy_ms)),
            "first_token_wait_median_ms": lib.median(waits_ms),
            "same_output": same,
        }
        note = "same greedy text" if same else "TEXT DIFFERS"
        self.add(
            Row(
                "B5",
                f"first token: node - direct, median of {len(diffs_ms)} pairs "
                f"({node_first * 1000:.1f} vs {direct_first * 1000:.1f} ms; "
                f"95% CI {low:+.1f} to {high:+.1f}, quartiles "
                f"{lib.percentile(diffs_ms, 25):+.1f} to {lib.percentile(diffs_ms, 75):+.1f})",
                diff_ms,
                "ms",
                goal="<= 5 ms",
                met=diff_ms <= 5 and errors == 0,
                note=note,
            )
        )
        # The node's first token in two parts, per request: outside its model thread
        # (client wall clock less the thread's own time: transport, crypto, scheduling,
        # the hand-offs) and the model thread itself against the direct run of its pair.
        outside_ms = [
            1000 * n["first_token_s"][0] - m
            for n, m in zip(first["node"], inside_ms, strict=True)
            if n["first_token_s"]
        ]
        thread_ms = [
            m - 1000 * d["first_token_s"] for m, d in zip(inside_ms, first["direct"], strict=True)
        ]
        o_low, o_high = lib.median_interval(outside_ms)
        t_low, t_high = lib.median_interval(thread_ms)
        self.details["B5"]["first_token_node_thread_ms"] = inside_ms
        self.add(
            Row(
                "B5",
                f"first token, the node's part outside its model thread: client's first token "
                f"- the node's logged thread time, same requests (95% CI {o_low:.2f} to "
                f"{o_high:.2f}, max {max(outside_ms, default=float('nan')):.2f} ms)",
                lib.median(outside_ms),
                "ms",
                note="info",
            )
        )
        self.add(
            Row(
                "B5",
                f"first token, the node's model thread - direct, same pairs "
                f"(95% CI {t_low:+.1f} to {t_high:+.1f} ms)",
                lib.median(thread_ms),
                "ms",
                note="info",
            )
        )
        w_low, w_high = lib.median_interval(busy_ms)
        self.add(
            Row(
                "B5",
                f"first token: node - direct, each less its run-queue wait, same pairs "
                f"(95% CI {w_low:+.1f} to {w_high:+.1f}; waits p50 "
                f"{lib.median(waits_ms):.1f}, max {max(waits_ms, default=0.0):.1f} ms)",
                lib.median(busy_ms),
                "ms",
                note="info",
            )
        )
        self.add(
            Row(
                "B5",
                f"first token through the node without the model: echo backend, same client "
                f"and prompt, after {idle_s * 1000:.0f} ms idle (median of "
                f"{len(echo_ms['idle'])}; back to back {lib.median(echo_ms['hot']):.2f} ms)",
                lib.median(echo_ms["idle"]),
                "ms",
                note="info",
            )
        )
        pairs_ = list(zip(got["node"], got["direct"], strict=True))
        ratios = [n["decode_tok_s"][0] / d["decode_tok_s"] for n, d in pairs_ if n["decode_tok_s"]]
        ratio = lib.median(ratios)
        self.add(
            Row(
                "B5",
                f"decode tokens/s, node end-to-end (encrypted), median of {len(ratios)} "
                f"alternating rounds' ratios ({min(ratios, default=float('nan')):.2f}x to "
                f"{max(ratios, default=float('nan')):.2f}x)",
                node_rate,
                "tok/s",
                baseline_label="llama-cpp-python alone",
                baseline=direct_rate,
                ratio=ratio,
                goal=">= 0.97x",
                met=ratio >= 0.97 and errors == 0,
            )
        )

    # ------------------------------------------------------------------------ B6

    async def b6_workers(self) -> None:
        q = self.quick
        words = 1000 if q else 2000
        procs, conns = 4, 4
        rounds = 2 if q else 4
        per_round = 1 if q else 2
        self.say(f"B6: --workers 2 vs 1, {procs} client processes x {conns} connections")
        n1, p1 = await self.start_node("b6-w1", cli=["--workers", "1"])
        n2, p2 = await self.start_node("b6-w2", cli=["--workers", "2"])
        opts = ["--prompt-words", str(words)]
        g1 = await self.start_clients("b6-c1", p1, processes=procs, connections=conns, options=opts)
        g2 = await self.start_clients("b6-c2", p2, processes=procs, connections=conns, options=opts)
        got: dict[str, list[dict[str, Any]]] = {"w1": [], "w2": []}
        await g1.round(1, 300)
        await g2.round(1, 300)
        servers = {"w1": n1, "w2": n2}
        for i in range(rounds):
            pairs = [("w1", g1), ("w2", g2)]
            for name, g in pairs if i % 2 == 0 else pairs[::-1]:
                got[name].append(await g.round(per_round, 300, servers[name]))
        await self.stop(*g1.children, *g2.children, n1, n2)
        t1 = lib.median([r["tokens_per_s"] for r in got["w1"]])
        t2 = lib.median([r["tokens_per_s"] for r in got["w2"]])
        errors = sum(r["errors"] for rs in got.values() for r in rs)
        util = {
            name: (
                lib.median([r["server_cpu_util"] for r in rs]),
                lib.median([r["client_cpu_s"] / r["round_s"] for r in rs]),
            )
            for name, rs in got.items()
        }
        self.details["B6"] = {
            "node_cpu_cores": {k: v[0] for k, v in util.items()},
            "client_cpu_cores": {k: v[1] for k, v in util.items()},
            "words": words,
            "client_processes": procs,
            "connections_per_process": conns,
            "w1": [summary(r) for r in got["w1"]],
            "w2": [summary(r) for r in got["w2"]],
        }
        ratio = paired_ratio(got["w2"], got["w1"], "tokens_per_s")
        self.add(
            Row(
                "B6",
                f"--workers 2 tokens/s ({procs}x{conns} connections; node CPU "
                f"{util['w2'][0]:.2f} vs {util['w1'][0]:.2f} cores, clients "
                f"{util['w2'][1]:.2f} vs {util['w1'][1]:.2f}, nproc={os.cpu_count()})",
                t2,
                "tok/s",
                baseline_label="--workers 1",
                baseline=t1,
                ratio=ratio,
                goal=">= 1.7x",
                met=ratio >= 1.7 and errors == 0,
                note=f"{errors} errors" if errors else "",
            )
        )

    # ---------------------------------------------------------------------- run

    async def run(self, only: list[str]) -> None:
        steps: dict[str, Callable[[], Any]] = {
            "B2": self.b2_streaming,
            "B3": self.b3_ceiling,
            "B4": self.b4_scale,
            "B5": self.b5_model,
            "B6": self.b6_workers,
            "B8": self.b8_v2_streaming,
            "P1": self.p1_proxy,
        }
        try:
            for name in only:
                started = time.monotonic()
                busy0, own0 = lib.machine_busy_seconds(), lib.own_cpu_seconds()
                try:
                    if name == "B1":
                        self.b1_init()
                        await self.b1_socket()
                    elif name == "B7":
                        self.b7_v2_handshake()
                    else:
                        await steps[name]()
                except (
                    RuntimeError,
                    OSError,
                    trio.TooSlowError,
                    KeyError,
                    ZeroDivisionError,
                ) as exc:
                    self.say(f"{name} failed: {type(exc).__name__}: {exc}")
                    self.add(
                        Row(
                            name,
                            f"FAILED: {type(exc).__name__}: {str(exc)[:80]}",
                            float("nan"),
                            "",
                            met=False,
                        )
                    )
                    self.details.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
                finally:
                    await self.stop_all()
                elapsed = time.monotonic() - started
                busy = lib.machine_busy_seconds() - busy0
                own = lib.own_cpu_seconds() - own0
                self.details.setdefault("seconds", {})[name] = round(elapsed, 1)
                # CPU that processes other than this benchmark's used meanwhile (noise).
                self.noise[name] = {
                    "other_cores": round(max(0.0, busy - own) / elapsed, 2),
                    "bench_cores": round(own / elapsed, 2),
                    "loadavg_1m_after": round(os.getloadavg()[0], 2),
                }
        finally:
            await self.stop_all()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes: everything in under a minute")
    p.add_argument("--only", default=",".join(ALL), help="comma-separated measures, e.g. B1,B3")
    p.add_argument("--json", dest="json_path", help="where to write the results")
    p.add_argument("--sessions", type=int, default=0, help="B4 sessions (default 2000, quick 300)")
    p.add_argument("--b4-workers", type=int, default=1, help="B4 node --workers (default 1)")
    p.add_argument(
        "--model-threads", type=int, default=1, help="B5 llama.cpp threads, both sides (default 1)"
    )
    # child-process roles (internal)
    p.add_argument(
        "--role",
        choices=["main", "client", "initclient", "bare", "direct", "node"],
        default="main",
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", choices=["encrypted", "plaintext", "v2"], default="encrypted")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--host-pub", default="")
    p.add_argument("--fixed-key", default="")
    p.add_argument("--prompt-words", type=int, default=1000)
    p.add_argument("--prompt-text", default="")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--watch-pid", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--record-latency", action="store_true")
    p.add_argument("--rcvbuf", type=int, default=0)
    p.add_argument("--connect-concurrency", type=int, default=32)
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--config", default="{}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "client":
        trio.run(lib.client_main, args)
        return 0
    if args.role == "initclient":
        trio.run(lib.init_client_main, args)
        return 0
    if args.role == "bare":
        trio.run(lib.bare_main, args)
        return 0
    if args.role == "direct":
        lib.direct_model_main(args)
        return 0
    if args.role == "node":
        return lib.node_main(args)

    only = [m.strip().upper() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in only if m not in ALL]
    if unknown:
        print(
            f"unknown measures: {', '.join(unknown)} (choose from {', '.join(ALL)})",
            file=sys.stderr,
        )
        return 2
    only = [m for m in ALL if m in only]
    lib.raise_fd_limit()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = (
        Path(args.json_path) if args.json_path else REPO / "bench-results" / f"bench-{stamp}.json"
    )
    machine = lib.machine_info()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-node-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            trio.run(bench.run, only)
        finally:
            bench.host_key.wipe()
    elapsed = time.monotonic() - started
    table = render_table(bench.rows)
    mode = "quick" if args.quick else "full"
    print(
        f"\nllm-node benchmarks ({mode}, {elapsed:.0f} s) on {machine['nproc']} x "
        f"{machine['cpu_model']}, Python {machine['python']}, load at start "
        f"{machine['loadavg_at_start']}\n"
    )
    print(table)
    noise = ", ".join(f"{k} {v['other_cores']:.2f}" for k, v in bench.noise.items())
    print(f"\nCPU used by other processes meanwhile (cores, of {machine['nproc']}): {noise}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "timestamp": stamp,
        "mode": mode,
        "elapsed_s": round(elapsed, 1),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "rows": [r.as_dict() for r in bench.rows],
        "details": bench.details,
        "noise": bench.noise,
    }
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
