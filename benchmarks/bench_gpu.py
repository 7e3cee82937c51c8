"""GPU speed: ldmkit against eager diffusers in float16 on the full-size ldm-text2im-large-256 layout.

Run on a CUDA machine (benchmarks/gpu_check.sh runs it after the CUDA tests; about 4 minutes on one H100):
    python benchmarks/bench_gpu.py [--steps 20] [--repeats 20] [--no-compile]
The folder (published shapes, random weights) is bench_text2img.py's, built once with diffusers' classes.
Each library loads it with its own ``from_pretrained(folder, torch_dtype=torch.float16)`` onto the GPU.
Measured, each after a warm-up, with ``torch.cuda.synchronize`` around the clock:

- the UNet's iterations per second at batch 2 (a guided step), 32x32 latents;
- a pipeline call (``--steps`` DDIM steps, guidance 6) as steps per second and seconds per image;
- ldmkit's UNet under ``torch.compile`` (inductor) and under ``mode="reduce-overhead"`` (CUDA graphs), with
  the seconds the first call (the compilation) took;
- ldmkit's fast preset (dtype "auto", DPM-Solver++ 2M Karras, the feature cache, the guidance interval) as
  seconds per image.

Ratios are ldmkit / diffusers in iterations per second (> 1: ldmkit is faster). Results:
benchmarks/results/gpu.json. Without a CUDA GPU it exits at once with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ldmkit.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
FOLDER = Path("/tmp/ldmkit-bench/ldm-text2im-large-256")
PROMPT = ["w1 w2 w3 w4"]


def cuda_timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` on the GPU (one warm-up call first, then ``repeats`` calls)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def unet_inputs(pipe):
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    ids = torch.randint(0, 30522, (2, 77), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        context = pipe.bert(ids)[0]
    return x, torch.tensor(500, device="cuda"), context


def unet_its(unet, inputs, repeats: int) -> float:
    x, t, context = inputs
    with torch.no_grad():
        return 1.0 / cuda_timed(lambda: unet(x, t, encoder_hidden_states=context).sample, repeats)


def call_seconds(pipe, steps: int, repeats: int, **kwargs) -> float:
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda", pipe.unet.dtype)
    kw = {"num_inference_steps": steps, "guidance_scale": 6.0, "output_type": "pt", **kwargs}
    with torch.no_grad():
        return cuda_timed(lambda: pipe(PROMPT, latents=latents, **kw), repeats)


def load(lib, folder: Path, **kwargs):
    start = time.perf_counter()
    pipe = lib.DiffusionPipeline.from_pretrained(folder, **kwargs).to("cuda")
    torch.cuda.synchronize()
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - start


def compiled(unet, inputs, mode: str | None, repeats: int) -> dict:
    """it/s of ``torch.compile(unet, mode=mode)`` and the seconds its first call (the compilation) took."""
    fn = torch.compile(unet, mode=mode)
    x, t, context = inputs
    start = time.perf_counter()
    with torch.no_grad():
        fn(x, t, encoder_hidden_states=context)
    torch.cuda.synchronize()
    return {"compile_s": time.perf_counter() - start, "unet_its": unet_its(fn, inputs, repeats)}


def measure(args) -> dict:
    import diffusers
    from bench_text2img import build_folder

    import ldmkit
    from ldmkit.pipelines.presets import apply_preset

    folder = build_folder(args.folder, "full")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "steps": args.steps}
    ref, result["diffusers_load_s"] = load(diffusers, folder, torch_dtype=torch.float16)
    inputs = unet_inputs(ref)
    result["diffusers_fp16"] = {"unet_its": unet_its(ref.unet, inputs, args.repeats),
                                "call_s": call_seconds(ref, args.steps, 3)}
    del ref
    torch.cuda.empty_cache()
    pipe, result["ldmkit_load_s"] = load(ldmkit, folder, torch_dtype=torch.float16)
    result["ldmkit_fp16"] = {"unet_its": unet_its(pipe.unet, inputs, args.repeats),
                             "call_s": call_seconds(pipe, args.steps, 3)}
    if not args.no_compile:
        result["ldmkit_fp16_compile"] = compiled(pipe.unet, inputs, None, args.repeats)
        result["ldmkit_fp16_cuda_graphs"] = compiled(pipe.unet, inputs, "reduce-overhead", args.repeats)
    del pipe
    torch.cuda.empty_cache()
    fast, _ = load(ldmkit, folder, torch_dtype="auto", device_map="cuda")  # "auto" is chosen for the GPU
    kwargs = apply_preset(fast, "fast")
    result["ldmkit_fast_preset"] = {"call_s": call_seconds(fast, kwargs.pop("num_inference_steps"), 3, **kwargs),
                                    "dtypes": {n: str(m.dtype) for n, m in fast.components.items()
                                               if isinstance(m, torch.nn.Module)}}
    base = result["diffusers_fp16"]
    ratios = {}
    for name, value in result.items():
        if name.startswith("ldmkit_") and isinstance(value, dict):
            ratios[name] = {"unet": value["unet_its"] / base["unet_its"] if "unet_its" in value else None,
                            "call": base["call_s"] / value["call_s"] if "call_s" in value else None}
    result["ratios_vs_diffusers_fp16"] = ratios
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=FOLDER)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", dest="no_compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and torch sees none: run it on a GPU machine "
              "(benchmarks/gpu_check.sh).", file=sys.stderr)
        return 2
    result = measure(args)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "gpu.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
