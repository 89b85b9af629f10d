#!/usr/bin/env python3
"""Microbenchmark of the crypto core against the raw library calls it wraps.

For each operation: timeit with an auto-sized loop, repeated, median (and min) of the
per-call time in microseconds. Our calls are set next to the library calls they are built
on, measured in the same run, with the ratio between them.

    .venv/bin/python scripts/bench_crypto.py [--repeat 15] [--json PATH]

Goals: open_session_init (steps 2-5) <= 250 us median, 64-byte chunk seal <= 15 us.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nacl  # noqa: E402
import nacl.bindings  # noqa: E402
from coincurve import PrivateKey, PublicKey  # noqa: E402
from coincurve import __version__ as coincurve_version  # noqa: E402

from node.crypto import HostKey, SecretBytes, aead  # noqa: E402
from node.crypto.session_init import (  # noqa: E402
    open_session_init,
    parse_init_payload,
    seal_session_init,
)

SDK_VECTORS = REPO / "tests" / "vectors" / "sdk" / "session_init_dev.json"
GOALS_US = {"open_session_init": 250.0, "aead.seal 64 B": 15.0}


def measure(fn: Callable[[], object], repeat: int, target_s: float) -> dict[str, float]:
    """Median and min microseconds per call over ``repeat`` timed loops of ~target_s."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # loops that take >= 0.2 s
    number = max(1, int(number * target_s / 0.2))
    per_call = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)]
    return {
        "median_us": statistics.median(per_call),
        "min_us": min(per_call),
        "loops": number,
        "repeat": repeat,
    }


def sdk_frame() -> tuple[HostKey, dict[str, Any], str]:
    """A recorded SDK session-init frame and its host key, or a freshly sealed one."""
    if SDK_VECTORS.exists():
        case = json.loads(SDK_VECTORS.read_text(encoding="utf-8"))["cases"][0]
        host = HostKey.parse(case["host_private_key_hex"])
        return host, case["message"]["payload"], f"SDK vector {case['id']}"
    host = HostKey.generate()
    payload = seal_session_init(
        host.public_key,
        PrivateKey(),
        os.urandom(32),
        job_id=42,
        model_name="bench-model",
        price_per_token=1000,
    )
    return host, payload, "freshly sealed frame (SDK vectors not found)"


def run(repeat: int, target_s: float) -> dict[str, Any]:
    host, payload, source = sdk_frame()
    init = parse_init_payload(payload)

    # Inputs for the raw library baselines, shaped like what open_session_init does.
    data = open_session_init(host, init)
    eph_point = PublicKey(init.ephemeral_public)
    scalar = bytes.fromhex(host.private_key_hex()[2:])
    digest = hashlib.sha256(b"bench").digest()
    compact_sig = PrivateKey(os.urandom(32)).sign_recoverable(digest, hasher=None)
    data.session_key.wipe()

    key = SecretBytes(os.urandom(32))
    raw_key = key.reveal()
    nonce = os.urandom(24)
    chunk = os.urandom(64)
    aad = b"chunk_0"
    wire = aead.seal(key, nonce, chunk, aad)
    assert aead.open(key, nonce, wire, aad) == chunk

    def full_open() -> None:
        opened = open_session_init(host, parse_init_payload(payload))
        opened.session_key.wipe()

    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, fn: Callable[[], object], baseline: list[str] | None = None) -> None:
        rows[name] = measure(fn, repeat, target_s)
        rows[name]["baseline"] = baseline or []

    add("raw: PublicKey.multiply", lambda: eph_point.multiply(scalar))
    add(
        "raw: PublicKey.from_signature_and_message",
        lambda: PublicKey.from_signature_and_message(compact_sig, digest, hasher=None),
    )
    add(
        "raw: xchacha20poly1305_ietf_encrypt 64 B",
        lambda: nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            chunk, aad, nonce, raw_key
        ),
    )
    add(
        "raw: xchacha20poly1305_ietf_decrypt 64 B",
        lambda: nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(wire, aad, nonce, raw_key),
    )
    add("parse_init_payload", lambda: parse_init_payload(payload))
    add(
        "open_session_init",
        full_open,
        ["raw: PublicKey.multiply", "raw: PublicKey.from_signature_and_message"],
    )
    add(
        "aead.seal 64 B",
        lambda: aead.seal(key, nonce, chunk, aad),
        ["raw: xchacha20poly1305_ietf_encrypt 64 B"],
    )
    add(
        "aead.open 64 B",
        lambda: aead.open(key, nonce, wire, aad),
        ["raw: xchacha20poly1305_ietf_decrypt 64 B"],
    )

    for row in rows.values():
        if row["baseline"]:
            base = sum(rows[b]["median_us"] for b in row["baseline"])
            row["baseline_median_us"] = base
            row["ratio"] = row["median_us"] / base
    for name, goal in GOALS_US.items():
        rows[name]["goal_us"] = goal
        rows[name]["meets_goal"] = rows[name]["median_us"] <= goal

    return {
        "source": source,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "coincurve": coincurve_version,
        "pynacl": nacl.__version__,
        "results": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"crypto microbenchmark ({report['source']}; Python {report['python']}, "
        f"coincurve {report['coincurve']}, PyNaCl {report['pynacl']})"
    )
    header = f"{'operation':44} {'median us':>10} {'min us':>9} {'raw us':>9} {'ratio':>6}  goal"
    print(header)
    print("-" * len(header))
    for name, row in report["results"].items():
        raw = f"{row['baseline_median_us']:9.2f}" if "baseline_median_us" in row else " " * 9
        ratio = f"{row['ratio']:6.2f}" if "ratio" in row else " " * 6
        goal = ""
        if "goal_us" in row:
            goal = f"<= {row['goal_us']:.0f} us " + ("ok" if row["meets_goal"] else "MISSED")
        print(f"{name:44} {row['median_us']:10.2f} {row['min_us']:9.2f} {raw} {ratio}  {goal}")
    print("raw us = sum of the raw library calls in that row's baseline; ratio = ours / raw")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=15, help="timed loops per operation")
    parser.add_argument(
        "--target", type=float, default=0.05, help="seconds per timed loop (default 0.05)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    report = run(args.repeat, args.target)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
