"""The memory gradient checkpointing saves, and what it costs in time, for each network that supports it.

Each case builds a network of a bundled model's shape (random weights: memory and time do not depend on
them) and runs training steps (forward, a mean-square loss, backward) with and without
``enable_gradient_checkpointing()``, in a fresh process per case and mode. After two warm-up steps (the
first allocates the gradients and torch's one-time buffers), one step is measured: the memory the forward
pass keeps for backward (the activations) and the peak the whole step adds (forward, backward and its
temporaries). On the CPU that is the resident set size, its peak reset before the step (``/proc/self/
clear_refs``), with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves
the resident set at once; with ``--device cuda`` it is torch's allocated CUDA memory. Time is the fastest of
a few steps per mode, the modes alternating in one process (on a shared CPU the fastest is the least
disturbed). Results go to benchmarks/results/gradient_checkpointing.json.

    python benchmarks/bench_gradient_checkpointing.py                # every case (~6 min on 2 shared cores)
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
from common import announce, write_result

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


def child(name: str, checkpointing: bool, device: str) -> dict:
    """The memory of one case in one mode, in this (fresh) process."""
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
    return {"kept_for_backward_mib": round(kept / 2**20, 1), "peak_step_memory_mib": round(peak / 2**20, 1),
            "grad_abs_sum": grad_sum, "parameters": model.num_parameters()}


def step_times(name: str, device: str, rounds: int) -> tuple[float, float]:
    """The fastest step without and with checkpointing, the two modes alternating in one process (on a
    shared machine the fastest of a few is the least disturbed, and alternating spreads the disturbance)."""
    model, inputs = build(name)
    model.to(device)
    inputs = tuple(x.to(device) for x in inputs)
    step(model, inputs)
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for mode in (0, 1):
            (model.enable_gradient_checkpointing if mode else model.disable_gradient_checkpointing)()
            model.zero_grad(set_to_none=False)
            start = time.perf_counter()
            step(model, inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            best[mode] = min(best[mode], time.perf_counter() - start)
    return best[0], best[1]


def run_child(name: str, checkpointing: bool, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--checkpointing"] if checkpointing else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, args) -> dict:
    plain, checkpointed = run_child(name, False, args), run_child(name, True, args)
    _, _, batch, shape = CASES[name]
    row = {"case": name, "batch_size": batch, "input_shape": list(shape), "parameters": plain["parameters"]}
    for key in ("kept_for_backward_mib", "peak_step_memory_mib"):
        row[key], row[key + "_checkpointed"] = plain[key], checkpointed[key]
    row["peak_memory_saved_fraction"] = round(1 - checkpointed["peak_step_memory_mib"]
                                              / plain["peak_step_memory_mib"], 3)
    row["step_s"], row["step_s_checkpointed"] = (round(t, 4) for t in step_times(name, args.device, args.rounds))
    row["time_cost_fraction"] = round(row["step_s_checkpointed"] / row["step_s"] - 1, 3)
    # Two warm-up steps' gradients, summed: the same in both modes.
    row["grad_relative_difference"] = abs(checkpointed["grad_abs_sum"] - plain["grad_abs_sum"]) / plain["grad_abs_sum"]
    print(f"{name:32s} kept {row['kept_for_backward_mib']:7.1f} -> {row['kept_for_backward_mib_checkpointed']:7.1f}"
          f" MiB, peak {row['peak_step_memory_mib']:7.1f} -> {row['peak_step_memory_mib_checkpointed']:7.1f} MiB"
          f" ({100 * row['peak_memory_saved_fraction']:.0f}% less), step {row['step_s']:.3f} -> "
          f"{row['step_s_checkpointed']:.3f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="case names (prefix match)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.checkpointing, args.device)))
        return
    busy = announce()
    results = [compare(name, args) for name in CASES
               if not args.only or any(name.startswith(o) for o in args.only)]
    report = {"machine": platform.processor() or platform.machine(), "device": args.device,
              "threads": args.threads, "torch": torch.__version__,
              "measure": "memory (a fresh process per mode, after 2 warm-up steps): what one step's forward keeps "
                         "for backward, and the peak the step adds (CPU: resident set size, CUDA: allocated); "
                         "time: the fastest of --rounds steps per mode, the modes alternating in one process",
              "note": "on a CPU shared with other jobs the step times are noisy (a quiet run of the text UNet "
                      "measured 0.45 -> 0.62 s a step); the memory is the same from run to run",
              "results": results}
    write_result(RESULTS, report, busy)


if __name__ == "__main__":
    main()
