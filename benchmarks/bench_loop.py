"""Two ldmkit source trees side by side: is the one denoising loop (issue 11) any slower than the five it replaced?

Run by hand on a quiet machine (about 4 minutes):
    git worktree add /tmp/ldmkit-before <commit>
    python benchmarks/bench_loop.py /tmp/ldmkit-before/src src [--rounds 3] [--repeats 5]
Every pipeline runs in fp32 with one torch thread, in worker processes that alternate between the two trees
(before, after, before, after, ...), so a drift of the machine hits both alike. Each worker times every
workload after a warm-up call; the medians over all rounds and the ratios (before / after, > 1 means the
new tree is faster) are printed and written to benchmarks/results/loop-before-after.json, unless another
process was using the CPU (then nothing is written).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import announce, run_worker, write_result

FIXTURES = Path(os.environ.get("LDMKIT_COMPVIS_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "reference" / "compvis"))


def workloads():
    """name -> a function that runs one call (the pipeline is loaded once, outside the timing)."""
    import torch

    from ldmkit import DiffusionPipeline

    def quiet(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def compvis(family):
        folder = FIXTURES / family
        return quiet(DiffusionPipeline.from_single_file(folder / "model.ckpt", config=folder / "config.yaml"))

    text2img = quiet(DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img"))
    superres = quiet(DiffusionPipeline.from_pretrained("ldmkit:emoji-superres-4x"))
    cin, inpaint, uncond = compvis("cin"), compvis("inpainting"), compvis("uncond")
    low = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    size = inpaint.unet.config.sample_size * 2 ** (len(inpaint.vqvae.config.block_out_channels) - 1)
    image, mask = torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1

    def gen():
        return torch.Generator().manual_seed(0)

    # The loop's own overhead: the same unconditional pipeline with a UNet that costs nothing.
    null = compvis("uncond")
    null.unet.forward = lambda sample, t, *args, **kwargs: type("Out", (), {"sample": sample})()

    return {
        "text2img (emoji, 4 images, 20 steps, guidance 3)":
            lambda: text2img("red apple", num_images_per_prompt=4, num_inference_steps=20, guidance_scale=3.0,
                             generator=gen(), output_type="pt"),
        "superres (emoji, 32 -> 128, 20 steps)":
            lambda: superres(low, num_inference_steps=20, generator=gen(), output_type="pt"),
        "class-conditional (CompVis fixture, 4 labels, 50 steps, guidance 3)":
            lambda: cin([0, 1, 2, 3], num_inference_steps=50, guidance_scale=3.0, generator=gen(), output_type="pt"),
        "inpainting (CompVis fixture, 50 steps)":
            lambda: inpaint(image, mask, num_inference_steps=50, generator=gen(), output_type="pt"),
        "unconditional (CompVis fixture, batch 4, 50 steps)":
            lambda: uncond(batch_size=4, num_inference_steps=50, generator=gen(), output_type="pt"),
        "loop overhead (no-op UNet, 200 DDIM steps, latents out)":
            lambda: null(num_inference_steps=200, generator=gen(), output_type="latent"),
    }


def worker(repeats: int) -> None:
    import torch

    torch.set_num_threads(1)
    timings = {}
    with torch.inference_mode():
        for name, run in workloads().items():
            run()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            timings[name] = times
    print(json.dumps(timings))


def run_tree(src: str, repeats: int) -> dict:
    return run_worker(__file__, ["--repeats", str(repeats)], env={"PYTHONPATH": str(Path(src).resolve())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", nargs="?")
    parser.add_argument("after", nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.repeats)
    busy = announce()
    samples = {"before": {}, "after": {}}
    for _ in range(args.rounds):
        for side, src in (("before", args.before), ("after", args.after)):
            for name, times in run_tree(src, args.repeats).items():
                samples[side].setdefault(name, []).extend(times)
    rows = {}
    for name in samples["before"]:
        before, after = statistics.median(samples["before"][name]), statistics.median(samples["after"][name])
        rows[name] = {"before_s": round(before, 4), "after_s": round(after, 4), "ratio": round(before / after, 3)}
        print(f"{name:70s} before {before:7.3f} s  after {after:7.3f} s  before/after {before / after:5.3f}")
    write_result("loop-before-after", {"rounds": args.rounds, "repeats": args.repeats, "threads": 1, "dtype": "fp32",
                                       "samples_per_side": args.rounds * args.repeats, "medians": rows}, busy)


if __name__ == "__main__":
    main()
