"""Throughput of `ldmkit serve` with and without dynamic batching: the bundled text-to-image model, N
concurrent requests (one image each, different prompts and seeds, the same settings), loopback HTTP,
one torch thread, the fast preset.

Run by hand from the repository root:
    python benchmarks/bench_serve.py [--requests 16] [--steps 20] [--repeats 3]
It serves with --max-batch 1 and then --max-batch 4 (each a fresh server in this process, interleaved
``--repeats`` times), prints images/s and the median latency of each, and writes
benchmarks/results/serve-batching.json when the machine was quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import announce, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serve_utils import running_server  # noqa: E402


async def burst(base: str, requests: int, steps: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=requests)) as c:
        async def one(i):
            start = time.perf_counter()
            r = await c.post("/v1/images/generations", json={"prompt": f"emoji {i}", "seed": i, "steps": steps,
                                                              "response_format": "b64_json"})
            r.raise_for_status()
            return time.perf_counter() - start
        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - start, list(latencies)


def measure(max_batch: int, requests: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out, running_server(max_batch=max_batch, queue_depth=requests,
                                                              output=out, page=False) as (base, _):
        asyncio.run(burst(base, 2, steps))  # warm-up
        seconds, latencies = asyncio.run(burst(base, requests, steps))
    return {"seconds": seconds, "images_per_s": requests / seconds, "p50_s": statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    busy = announce()
    runs = {1: [], 4: []}
    for _ in range(args.repeats):
        for max_batch in runs:
            runs[max_batch].append(measure(max_batch, args.requests, args.steps))
    best = {b: max(r, key=lambda x: x["images_per_s"]) for b, r in runs.items()}
    for b, r in best.items():
        print(f"max_batch {b}: {r['images_per_s']:.2f} images/s, p50 latency {r['p50_s']:.2f} s "
              f"({args.requests} concurrent requests, {args.steps} steps, 32x32)")
    gain = best[4]["images_per_s"] / best[1]["images_per_s"]
    print(f"dynamic batching gain: {gain:.2f}x")
    write_result("serve-batching", {"requests": args.requests, "steps": args.steps, "runs": runs, "gain": gain},
                 busy)


if __name__ == "__main__":
    main()
