#!/usr/bin/env python3
"""The memory attack of issue 14, finding 2, against a node process.

    .venv/bin/python scripts/bench_session_memory.py [--repo PATH] [--vdb-bytes N] [--json P]

Starts ``python -m node serve --backend echo`` from ``--repo`` (default: this checkout;
pass an older checkout to measure the code before a change), opens ``--connections``
WebSocket connections and sends ``--sessions`` encrypted inits on each, one a second after
the first ten (inside the init rate limit), each with a ``vectorDatabase`` of
``{"x":[{},{},...]}`` of ``--vdb-bytes`` characters, from a fresh client key. Then reads
the node's resident memory (VmRSS) and prints it with the number of sessions accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _nodeproc as nodeproc  # noqa: E402
import trio  # noqa: E402
from coincurve import PrivateKey  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402

from node.crypto.session_init import seal_session_init  # noqa: E402

HOST_PUBLIC = PrivateKey(bytes.fromhex("5a" * 32)).public_key.format(compressed=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def vector_database(size: int) -> dict[str, Any]:
    return {"x": [{}] * max(0, (size - 7) // 3)}


ALL_DONE: trio.Event


async def attack(url: str, index: int, args: argparse.Namespace, out: dict[str, int]) -> None:
    vdb = vector_database(args.vdb_bytes)
    async with open_websocket_url(url, max_message_size=4 << 20) as ws:
        await ws.get_message()  # connected
        for i in range(args.sessions):
            payload = seal_session_init(
                HOST_PUBLIC,
                PrivateKey(),
                os.urandom(32),
                job_id=i + 1,
                model_name="echo",
                vector_database=vdb,
            )
            frame = {
                "type": "encrypted_session_init",
                "session_id": str(i + 1),
                "job_id": str(i + 1),
                "payload": payload,
            }
            await ws.send_message(json.dumps(frame, separators=(",", ":")))
            reply = json.loads(await ws.get_message())
            key = reply["type"] if reply["type"] != "error" else reply["code"]
            out[key] = out.get(key, 0) + 1
            if i >= 9:
                await trio.sleep(1.0)  # one init a second after the burst of ten
        out["done"] = out.get("done", 0) + 1
        if out["done"] == args.connections:
            out["rss_kib_attacked"] = rss_kib(out["pid"])
            ALL_DONE.set()
        await ALL_DONE.wait()  # keep every connection open until the figure is read


async def run(args: argparse.Namespace) -> dict[str, Any]:
    global ALL_DONE
    ALL_DONE = trio.Event()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        proc, port = await nodeproc.start_checkout_node(
            Path(args.repo), Path(tmp), "--max-errors", "1000"
        )
        out: dict[str, int] = {"pid": proc.pid}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nodeproc.drain, proc.stderr)
                await trio.sleep(1.0)
                out["rss_kib_before"] = rss_kib(proc.pid)
                started = time.perf_counter()
                async with trio.open_nursery() as attackers:
                    for i in range(args.connections):
                        attackers.start_soon(attack, f"ws://127.0.0.1:{port}/v1/ws", i, args, out)
                out["seconds"] = round(time.perf_counter() - started)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                proc.terminate()
                await proc.wait()
    return {"repo": str(args.repo), "vdb_bytes": args.vdb_bytes, **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose node to run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--vdb-bytes", type=int, default=400_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = trio.run(run, args)
    results.pop("pid", None)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
