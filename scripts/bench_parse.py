#!/usr/bin/env python3
"""How long adversarial input holds a node up (issue 14, finding 1).

    .venv/bin/python scripts/bench_parse.py [--repo PATH] [--json PATH]

Starts ``python -m node serve --backend echo`` from ``--repo`` (default: this checkout;
pass an older checkout to measure the code before a change) and, for each shape of
``tests/security/_adversarial.py`` chosen with ``--shapes``, measures:

* **ws**: one WebSocket text frame of ``--frame-kib`` KiB in that shape, from sending it
  to the node's error reply; and a ``GET /health`` sent right after the frame, from
  sending it to its answer (what every other client waits meanwhile);
* **challenge**: ``POST /v1/auth/challenge`` with a ``--body-kib`` KiB body in that shape,
  to its 400 answer, with the same ``/health`` probe.

Then, in this process with this checkout's code, the time ``loads_bounded`` takes on each
shape at 1 MiB next to ``json.loads`` on a valid 1 MiB frame nested 61 deep.
Prints a table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _nodeproc as nodeproc  # noqa: E402
import httpx  # noqa: E402
import trio  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402

from tests.security._adversarial import SHAPES  # noqa: E402

DEFAULT_SHAPES = "reviewer-open-quote-backslash,escaped-quotes,deep-arrays,nests-at-the-limit"


async def health_after(base: str, started: trio.Event, out: dict[str, float]) -> None:
    await started.wait()
    async with httpx.AsyncClient(base_url=base, timeout=3600) as http:
        t0 = time.perf_counter()
        await http.get("/health")
        out["health_s"] = time.perf_counter() - t0


async def ws_case(base: str, text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with open_websocket_url(base.replace("http", "ws") + "/v1/ws") as ws:
        await ws.get_message()  # connected
        started = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(health_after, base, started, out)
            t0 = time.perf_counter()
            await ws.send_message(text)
            started.set()
            reply = json.loads(await ws.get_message())
            out["reply_s"] = time.perf_counter() - t0
        out["code"] = reply.get("code")
    return out


async def challenge_case(base: str, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health_after, base, started, out)
        async with httpx.AsyncClient(base_url=base, timeout=3600) as http:
            t0 = time.perf_counter()
            request = http.post("/v1/auth/challenge", content=text.encode("utf-8"))
            started.set()
            response = await request
            out["reply_s"] = time.perf_counter() - t0
            out["status"] = response.status_code
    return out


def in_process() -> dict[str, float]:
    from node.crypto.encoding import loads_bounded

    figures: dict[str, float] = {}
    for name, make in SHAPES.items():
        text = make(1 << 20)
        t0 = time.perf_counter()
        with contextlib.suppress(ValueError):
            loads_bounded(text)
        figures[name] = time.perf_counter() - t0
    valid = '{"type":"ping","x":' + "[" * 60 + "1," * 524_000 + "1" + "]" * 60 + "}"
    for label, parse in (
        ("valid-1MiB-depth-61 loads_bounded", loads_bounded),
        ("valid-1MiB-depth-61 json.loads", json.loads),
    ):
        t0 = time.perf_counter()
        parse(valid)
        figures[label] = time.perf_counter() - t0
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"repo": str(args.repo), "ws": {}, "challenge": {}}
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        proc, port = await nodeproc.start_checkout_node(
            Path(args.repo), Path(tmp), "--log-level", "info"
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nodeproc.drain, proc.stderr)
                for name in args.shapes.split(","):
                    make = SHAPES[name]
                    results["ws"][name] = await ws_case(base, make(args.frame_kib * 1024))
                    results["challenge"][name] = await challenge_case(
                        base, make(args.body_kib * 1024)
                    )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                proc.terminate()
                await proc.wait()
    if not args.no_in_process:
        results["in_process_1MiB_s"] = in_process()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"node from {results['repo']}",
        f"{'shape':34} {'ws ' + str(args.frame_kib) + ' KiB':>12} {'/health':>9} "
        f"{'challenge ' + str(args.body_kib) + ' KB':>16} {'/health':>9}",
    ]
    for name, ws in results["ws"].items():
        ch = results["challenge"][name]
        lines.append(
            f"{name:34} {ws['reply_s']:11.3f}s {ws['health_s']:8.3f}s "
            f"{ch['reply_s']:15.3f}s {ch['health_s']:8.3f}s"
        )
    for name, seconds in results.get("in_process_1MiB_s", {}).items():
        lines.append(f"in process, 1 MiB, {name:40} {seconds * 1000:9.1f} ms")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose node to run")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated shape names")
    parser.add_argument("--frame-kib", type=int, default=64)
    parser.add_argument("--body-kib", type=int, default=48)
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = trio.run(run, args)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
