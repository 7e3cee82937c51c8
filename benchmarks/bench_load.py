"""Loading the full-size text-to-image layout (random weights, float32 safetensors) into bfloat16, warm page
cache, in alternating one-thread processes: diffusers and ldmkit, plus ldmkit's float32 load (a memory map,
no conversion). Each loads the same saved folder with its own ``from_pretrained``, no converted-weights
cache. Per process: the load's seconds, its peak RSS above the process's size before it, and a digest of the
UNet's weights (both libraries round float32 to bfloat16 alike, so the bf16 digests must agree).

Tried and dropped (2026-12-05): a helper thread that allocated and touched the new memory ahead of the
conversion, so that the page faults would run on the second core. In one machine state it took the load from
3.8-6.8 s to 1.8-2.1 s; an hour later, in 8 rotated rounds, it made the load slower (median 5.6 s against
2.6 s, 2.0-7.6 s), the two threads' page faults contending in the kernel. Not kept.

Why alternating processes, a rotating order and many rounds: on this project's virtual machine the first
writes to fresh memory cost the host's page allocation, 1.1-7 s per 3 GiB from one run to the next, and a
load after one that freed much memory finds it cheaper; a single pair of loads measures the host.

Run by hand (after bench_text2img.py has built /tmp/ldmkit-bench/ldm-text2im-large-256):
    python benchmarks/bench_load.py [--rounds 5]          # writes results/load-bf16.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import PeakRSS, announce, run_worker, write_result

FOLDER = "/tmp/ldmkit-bench/ldm-text2im-large-256"
SPECS = ("diffusers", "ldmkit", "ldmkit:fp32")


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def worker(spec: str) -> dict:
    import importlib

    torch.set_num_threads(1)
    lib = importlib.import_module(spec.split(":")[0])
    dtype = torch.float32 if spec.endswith(":fp32") else torch.bfloat16
    with PeakRSS() as mem:
        start = time.perf_counter()
        pipe = lib.DiffusionPipeline.from_pretrained(FOLDER, torch_dtype=dtype)
        seconds = time.perf_counter() - start
    weights = sum(t.nbytes for m in (pipe.unet, pipe.bert, pipe.vqvae) for t in m.state_dict().values())
    return {"load_s": seconds, "load_peak_rss_gib": mem.peak / 2**30, "weights_gib": weights / 2**30,
            "unet_digest": digest(pipe.unet)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", metavar="SPEC")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if not Path(FOLDER).exists():
        sys.exit(f"{FOLDER} is missing: run benchmarks/bench_text2img.py once to build it")
    busy = announce()
    env = {"LDMKIT_CONVERTED_CACHE": "off"}
    rounds = []
    for i in range(args.rounds):
        order = SPECS[i % len(SPECS):] + SPECS[: i % len(SPECS)]  # each spec after each other one in turn
        rounds.append({spec: run_worker(__file__, [spec], env) for spec in order})
        print(json.dumps({s: round(r["load_s"], 2) for s, r in rounds[-1].items()}), flush=True)
    med = {s: {k: statistics.median(r[s][k] for r in rounds) for k in ("load_s", "load_peak_rss_gib")}
           for s in SPECS}
    digests = {s: sorted({r[s]["unet_digest"] for r in rounds}) for s in SPECS}
    result = {
        "rounds": rounds, "median": med, "unet_digests": digests,
        "same_bf16_weights_as_diffusers": digests["ldmkit"] == digests["diffusers"],
        "ratio_diffusers_over_ldmkit": med["diffusers"]["load_s"] / med["ldmkit"]["load_s"],
        "bf16_weights_gib": rounds[0]["ldmkit"]["weights_gib"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    write_result("load-bf16", result, busy)


if __name__ == "__main__":
    main()
