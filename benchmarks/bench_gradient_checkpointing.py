"""The memory gradient checkpointing saves, and what it costs in time, for each network that supports it.

Each case builds a network of a bundled model's shape (random weights: memory and time do not depend on
them) and runs training steps (forward, a mean-square loss, backward) with and without
``enable_gradient_checkpointing()``, in a fresh process per case and mode. After two warm-up steps (the
first allocates the gradients and torch's one-time buffers), one step is measured: the memory the forward
pass keeps for backward (the activations) and the peak the whole step adds (forward, backward and its
temporaries). On the CPU that is the resident set size, its peak reset before the step (``/proc/self/
clear_refs``), with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves
the resident set at once; with ``--device cuda`` it is torch's allocated CUDA memory. Time is the fastest of
the next steps (on a shared CPU the fastest is the least disturbed). Results go to
benchmarks/results/gradient_checkpointing.json.

    python benchmarks/bench_gradient_checkpointing.py                # every case (~3 min on 2 cores)
    python benchmarks/bench_gradient_checkpointing.py --only unet    # cases whose name starts so
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldmkit import AutoencoderKL, LDMBertModel, UNet2DConditionModel, UNet2DModel, VQModel

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "ldmkit" / "bundled"
RESULTS = ROOT / "benchmarks" / "results" / "gradient_checkpointing.json"

# name: (class, bundled component folder, batch size, input shape). The shapes are the ones the bundled
# models train on (8x8 text latents, 32x32 super-resolution inputs, 128x128 whole emoji for the VQ
# autoencoder, 77 tokens), with batches large enough for activations to dominate.
CASES = {
    "unet2dcondition-emoji-text2img": (UNet2DConditionModel, "emoji-text2img/unet", 64, (4, 8, 8)),
    "unet2d-emoji-superres": (UNet2DModel, "emoji-superres-4x/unet", 16, (6, 32, 32)),
    "autoencoderkl-emoji-text2img": (AutoencoderKL, "emoji-text2img/vqvae", 16, (3, 64, 64)),
    "vqmodel-emoji-superres": (VQModel, "emoji-superres-4x/vqvae", 8, (3, 128, 128)),
    "ldmbert-emoji-text2img": (LDMBertModel, "emoji-text2img/bert", 64, (77,)),
}


def build(name: str):
    cls, folder, batch, shape = CASES[name]
    torch.manual_seed(0)
    model = cls.from_config(cls.load_config(BUNDLED / folder)).train()
    gen = torch.Generator().manual_seed(1)
    if cls is LDMBertModel:
        inputs = (torch.randint(0, model.config.vocab_size, (batch, *shape), generator=gen),)
    else:
        inputs = (torch.randn(batch, *shape, generator=gen),)
    if cls in (UNet2DConditionModel, UNet2DModel):
        inputs += (torch.randint(0, 1000, (batch,), generator=gen),)
    if cls is UNet2DConditionModel:
        inputs += (torch.randn(batch, 77, model.config.cross_attention_dim, generator=gen),)
    return model, inputs


def step(model, inputs) -> None:
    model(*inputs)[0].square().mean().backward()


class Memory:
    """Bytes in use now and the peak since :meth:`reset`: the process's resident set (CPU) or torch's
    allocated CUDA memory."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def child(name: str, checkpointing: bool, device: str, steps: int) -> dict:
    """One case in one mode, in this (fresh) process."""
    model, inputs = build(name)
    model.to(device)
    inputs = tuple(x.to(device) for x in inputs)
    if checkpointing:
        model.enable_gradient_checkpointing()
    for _ in range(2):
        step(model, inputs)
    grad_sum = sum(p.grad.double().abs().sum().item() for p in model.parameters() if p.grad is not None)
    memory = Memory(device)
    model.zero_grad(set_to_none=False)
    memory.reset()
    before = memory.now()
    loss = model(*inputs)[0].square().mean()
    kept = memory.now() - before
    loss.backward()
    peak = memory.peak() - before
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        step(model, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    mib = 2**20
    return {"kept_for_backward_mib": round(kept / mib, 1), "peak_step_memory_mib": round(peak / mib, 1),
            "step_s": round(min(times), 4) if times else None, "grad_abs_sum": grad_sum,
            "parameters": model.num_parameters()}


def run_case(name: str, checkpointing: bool, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--steps", str(args.steps)]
    cmd += ["--checkpointing"] if checkpointing else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="case names (prefix match)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the measured one")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.checkpointing, args.device, args.steps)))
        return
    results = []
    for name in CASES:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        plain, checkpointed = run_case(name, False, args), run_case(name, True, args)
        _, _, batch, shape = CASES[name]
        row = {"case": name, "batch_size": batch, "input_shape": list(shape), "parameters": plain["parameters"]}
        for key in ("kept_for_backward_mib", "peak_step_memory_mib", "step_s"):
            row[key], row[key + "_checkpointed"] = plain[key], checkpointed[key]
        row["peak_memory_saved_fraction"] = round(1 - checkpointed["peak_step_memory_mib"]
                                                  / plain["peak_step_memory_mib"], 3)
        row["time_cost_fraction"] = round(checkpointed["step_s"] / plain["step_s"] - 1, 3)
        # Two warm-up steps' gradients, summed: the same in both modes.
        row["grad_relative_difference"] = abs(checkpointed["grad_abs_sum"] - plain["grad_abs_sum"]) \
            / plain["grad_abs_sum"]
        print(f"{name:32s} kept {plain['kept_for_backward_mib']:7.1f} -> {checkpointed['kept_for_backward_mib']:7.1f}"
              f" MiB, peak {plain['peak_step_memory_mib']:7.1f} -> {checkpointed['peak_step_memory_mib']:7.1f} MiB"
              f" ({100 * row['peak_memory_saved_fraction']:.0f}% less), step {plain['step_s']:.3f} -> "
              f"{checkpointed['step_s']:.3f} s", flush=True)
        results.append(row)
    report = {"machine": platform.processor() or platform.machine(), "device": args.device,
              "threads": args.threads, "torch": torch.__version__,
              "measure": "after 2 warm-up steps, one step: memory the forward keeps for backward, and the peak "
                         "the step adds (CPU: resident set size, CUDA: allocated); step time: the fastest of the "
                         "following steps",
              "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
