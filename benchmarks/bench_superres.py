"""Full-size ldm-super-resolution-4x-openimages (random weights): ldmkit against diffusers.

Run by hand:
    python benchmarks/bench_superres.py compare [--steps 2] [--repeats 2]   # 128 -> 512, both, one process
    python benchmarks/bench_superres.py large [--steps 2] [--preset fast]   # 512 -> 2048, ldmkit tiled
    python benchmarks/bench_superres.py diffusers-large [--steps 2]         # 512 -> 2048, diffusers (fails)
    python benchmarks/bench_superres.py emoji-large                        # the bundled model, 512 -> 2048
``compare`` writes benchmarks/results/superres-compare.json (seconds per UNet step and for the VQ decode,
end-to-end seconds, the peak RSS increase of each run, ratios, max abs image difference).
``large`` writes superres-large.json (seconds, peak RSS). ``diffusers-large`` runs diffusers on the same
input in a child process under a memory and time limit and records how it ends.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, PeakRSS, announce, interleaved, write_result


def build_reference():
    """diffusers' super-resolution pipeline with the published shapes and random weights."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=128, in_channels=6, out_channels=3, block_out_channels=(160, 320, 320, 640),
        layers_per_block=2, down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, attention_head_dim=32)
    vq = diffusers.VQModel(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        num_vq_embeddings=8192)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear",
                                        clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=vq.eval(), unet=unet.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_ldmkit(ref):
    import ldmkit

    unet = ldmkit.UNet2DModel.from_state_dict(dict(ref.unet.config), ref.unet.state_dict())
    vq = ldmkit.VQModel.from_state_dict(dict(ref.vqvae.config), ref.vqvae.state_dict())
    pipe = ldmkit.LDMSuperResolutionPipeline(vqvae=vq, unet=unet,
                                             scheduler=ldmkit.DDIMScheduler.from_config(ref.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def smooth_image(size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(5 * x + rng.random()), np.cos(4 * y), np.sin(3 * (x + y))], -1) * 0.4 + 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


def compare(args):
    ref = build_reference()
    ours = to_ldmkit(ref)
    results = {"threads": torch.get_num_threads(), "steps": args.steps, "input": 128}
    x = torch.randn(1, 6, 128, 128)
    z = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for name, fn_d, fn_o in [
            ("unet_step_128", lambda: ref.unet(x, 500).sample, lambda: ours.unet(x, 500).sample),
            ("vq_decode_128_to_512", lambda: ref.vqvae.decode(z).sample, lambda: ours.vqvae.decode(z).sample),
        ]:
            td, out_d, to, out_o = interleaved(fn_d, fn_o, args.repeats)
            results[name] = {"diffusers_s": td, "ldmkit_s": to, "speedup": td / to,
                             "max_abs_diff": (out_d - out_o).abs().max().item()}
            print(name, json.dumps(results[name]), flush=True)

    image = smooth_image(128)

    def run_diffusers():
        step = ref.scheduler.step
        ref.scheduler.step = functools.partial(step, generator=torch.Generator().manual_seed(1))
        try:
            return ref(image, num_inference_steps=args.steps, eta=1.0, generator=torch.Generator().manual_seed(0),
                       output_type="np").images
        finally:
            ref.scheduler.step = step

    latents = torch.randn((1, 3, 128, 128), generator=torch.Generator().manual_seed(0))

    def run_ldmkit():
        return ours(image, num_inference_steps=args.steps, eta=1.0, latents=latents,
                    generator=torch.Generator().manual_seed(1), output_type="np", tiling=False).images

    e2e = {}
    for name, fn in (("diffusers", run_diffusers), ("ldmkit", run_ldmkit)):
        with PeakRSS() as mem:
            start = time.perf_counter()
            images = fn()
            seconds = time.perf_counter() - start
        e2e[name] = (seconds, mem.peak / 2**30, images)
    results["end_to_end"] = {
        "diffusers_s": e2e["diffusers"][0], "ldmkit_s": e2e["ldmkit"][0],
        "speedup": e2e["diffusers"][0] / e2e["ldmkit"][0],
        "diffusers_peak_rss_increase_gib": e2e["diffusers"][1], "ldmkit_peak_rss_increase_gib": e2e["ldmkit"][1],
        "image_max_abs_diff": float(np.abs(e2e["diffusers"][2] - e2e["ldmkit"][2]).max()),
    }
    print("end_to_end", json.dumps(results["end_to_end"]), flush=True)
    write("superres-compare.json", results)


def large(args):
    """512 -> 2048, tiled. ``--preset fast``: the CLI's fast path (the preset's dtype, sampler, step count,
    feature cache and channels-last), with the torch threads the machine has (as ``ldmkit upscale``)."""
    from ldmkit.pipelines.presets import apply_preset, get_preset, pick_dtype

    ours = to_ldmkit(build_reference())
    kwargs = {"num_inference_steps": args.steps, "eta": 1.0}
    if args.preset == "fast":
        torch.set_num_threads(os.cpu_count())
        ours.to(pick_dtype(get_preset("fast").dtype, torch.device("cpu")))
        kwargs = apply_preset(ours, "fast")
    image = smooth_image(512)
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = ours(image, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
        seconds = time.perf_counter() - start
    results = {"input": 512, "output": list(out.shape[1:3]), "preset": args.preset, "dtype": str(ours.unet.dtype),
               "threads": torch.get_num_threads(), "scheduler": type(ours.scheduler).__name__,
               "steps": kwargs["num_inference_steps"], "seconds": seconds,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "peak_rss_increase_during_run_gib": mem.peak / 2**30, "finite": bool(np.isfinite(out).all())}
    print(json.dumps(results), flush=True)
    write("superres-large.json" if args.preset == "exact" else "superres-large-fast.json", results)


def diffusers_large(args):
    """diffusers on 512 -> 2048, in a child process limited to 20 GiB of address space and --timeout s."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r})\n"
        "import torch, bench_superres as b\n"
        "pipe = b.build_reference()\n"
        f"out = pipe(b.smooth_image(512), num_inference_steps={args.steps}, eta=1.0, output_type='np').images\n"
        "print('finished', out.shape)\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (20 * 2**30, 20 * 2**30))

    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout,
                              preexec_fn=limit, env=dict(os.environ))
        outcome = {"returncode": proc.returncode, "stderr_tail": proc.stderr.strip().splitlines()[-3:],
                   "stdout_tail": proc.stdout.strip().splitlines()[-2:]}
    except subprocess.TimeoutExpired:
        outcome = {"returncode": None, "timed_out_after_s": args.timeout}
    outcome["seconds"] = time.perf_counter() - start
    outcome["memory_limit_gib"] = 20
    print(json.dumps(outcome), flush=True)
    write("superres-diffusers-large.json", outcome)


def emoji_large(args):
    """The bundled emoji super-resolution model on a 512 x 512 mosaic of 256 held-out and training emoji (16 x
    16 cells of 32 px, the size it was trained on) -> 2048 x 2048 with the fast preset, tiled: the image shows
    whether the tiles blend without seams. Writes docs/superres-2048-overview.jpg (the whole output at 1024 px),
    docs/superres-2048-crop.png (a full-resolution 512 px crop across tile boundaries) and the timing."""
    from PIL import Image

    from ldmkit import DiffusionPipeline
    from ldmkit.pipelines.presets import apply_preset, get_preset, pick_dtype

    torch.set_num_threads(os.cpu_count())
    folder = Path(__file__).resolve().parents[1] / "data" / "emoji-32"
    files = sorted((folder / "test").glob("*.png")) + sorted((folder / "train").glob("*.png"))
    if len(files) < 256:
        raise SystemExit(f"{folder}: needs the emoji data; run `ldmkit data emoji --size 32 --out {folder}`")
    mosaic = Image.new("RGB", (512, 512), "white")
    for k, path in enumerate(files[:: max(1, len(files) // 256)][:256]):
        mosaic.paste(Image.open(path).convert("RGB"), ((k % 16) * 32, (k // 16) * 32))
    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-superres-4x",
                                             torch_dtype=pick_dtype(get_preset("fast").dtype, torch.device("cpu")))
    pipe.set_progress_bar_config(disable=True)
    kwargs = apply_preset(pipe, "fast")
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = pipe(mosaic, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        seconds = time.perf_counter() - start
    docs = Path(__file__).resolve().parents[1] / "docs"
    out.resize((1024, 1024), Image.LANCZOS).save(docs / "superres-2048-overview.jpg", quality=90)
    # Output tiles are 512 px, one every 384 px: this crop spans a 128 px blend zone in each direction.
    out.crop((256, 256, 768, 768)).save(docs / "superres-2048-crop.png")
    results = {"model": "ldmkit:emoji-superres-4x", "input": 512, "output": list(out.size), "preset": "fast",
               "dtype": str(pipe.unet.dtype), "threads": torch.get_num_threads(), **kwargs, "seconds": seconds,
               "peak_rss_increase_during_run_gib": mem.peak / 2**30}
    print(json.dumps(results), flush=True)
    write("superres-emoji-2048.json", results)


BUSY = [0.0]  # the CPU's busy share when main started (announce)


def write(name, results):
    write_result(RESULTS / name, results, BUSY[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compare", "large", "diffusers-large", "emoji-large"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--preset", choices=["exact", "fast"], default="exact", help="large: the run's preset")
    args = parser.parse_args()
    BUSY[0] = announce()
    modes = {"compare": compare, "large": large, "diffusers-large": diffusers_large, "emoji-large": emoji_large}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
