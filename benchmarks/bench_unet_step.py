"""One fp32 UNet step (batch 2, the full-size text-to-image layout, random weights) in alternating one-thread
processes: diffusers, ldmkit (its default convolutions) and ldmkit with ``set_conv_algorithm("direct")``
(F.conv2d everywhere, as diffusers); with ``--specs diffusers ldmkit:bf16`` ldmkit loaded with
``torch_dtype=torch.bfloat16`` against diffusers fp32 (the issue's "bf16 per step" ratio). Each library loads the
UNet from the same saved folder with its own ``from_pretrained``.

Run by hand (after bench_text2img.py has built /tmp/ldmkit-bench/ldm-text2im-large-256):
    python benchmarks/bench_unet_step.py [--rounds 3] [--repeats 5]   # writes results/unet-step-fp32.json
    python benchmarks/bench_unet_step.py --specs diffusers ldmkit:bf16    # writes results/unet-step-bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import announce, own_peak_rss, run_worker, write_result

FOLDER = "/tmp/ldmkit-bench/ldm-text2im-large-256"
SPECS = ("diffusers", "ldmkit", "ldmkit:direct", "ldmkit:bf16")


def worker(spec: str, repeats: int, out: str) -> dict:
    import importlib

    torch.set_num_threads(1)
    lib = importlib.import_module(spec.split(":")[0])
    dtype = torch.bfloat16 if spec.endswith(":bf16") else torch.float32
    unet = lib.UNet2DConditionModel.from_pretrained(FOLDER, subfolder="unet", torch_dtype=dtype)
    if spec.endswith(":direct"):
        unet.set_conv_algorithm("direct")
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    context = torch.randn(2, 77, 1280, generator=torch.Generator().manual_seed(1)).to(dtype)
    times = []
    with torch.inference_mode():
        sample = unet(x, torch.tensor(500), encoder_hidden_states=context).sample  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, torch.tensor(500), encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
    torch.save(sample.float(), out)
    return {"step_s": statistics.median(times), "peak_rss_gib": own_peak_rss() / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--specs", nargs="+", choices=SPECS, default=list(SPECS[:3]),
                        help="what to time, diffusers (fp32) first; each ratio is diffusers over the spec")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "REPEATS", "OUT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.worker[2])))
        return
    if not Path(FOLDER).exists():
        sys.exit(f"{FOLDER} is missing: run benchmarks/bench_text2img.py once to build it")
    busy = announce()
    specs, rounds = args.specs, []
    if specs[0] != "diffusers":
        sys.exit("--specs must start with diffusers: every ratio is against it")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            rounds.append({spec: run_worker(__file__, [spec, str(args.repeats), f"{tmp}/{spec}.pt"])
                           for spec in specs})
            print(json.dumps(rounds[-1]), flush=True)
        outs = {spec: torch.load(f"{tmp}/{spec}.pt") for spec in specs}
    medians = {spec: statistics.median(r[spec]["step_s"] for r in rounds) for spec in specs}
    result = {
        "rounds": rounds, "median_step_s": medians,
        "per_round_ratio_diffusers_over": {s: [r["diffusers"]["step_s"] / r[s]["step_s"] for r in rounds]
                                           for s in specs[1:]},
        "ratio_diffusers_over": {s: medians["diffusers"] / medians[s] for s in specs[1:]},
        "max_abs_diff_vs_diffusers": {s: (outs[s] - outs["diffusers"]).abs().max().item() for s in specs[1:]},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    write_result("unet-step-bf16" if "ldmkit:bf16" in specs else "unet-step-fp32", result, busy)


if __name__ == "__main__":
    main()
