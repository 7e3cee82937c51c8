"""Quality at speed on the bundled emoji text-to-image model: every fast-path setting against exact.

Run by hand (after ``ldmkit data emoji --size 32 --out data/emoji-32``; a few minutes on one core):
    python benchmarks/bench_emoji_fastpath.py [--n 100] [--quick]

The measure is bench_emoji_quality.py's: one image per training caption (100 captions drawn with a fixed seed,
image i from seed i, guidance 3), ranked among all 3,789 emoji by pixel distance; top-1 / top-5 of the
caption's own emoji. Also the mean per-image RMS pixel distance (in [0, 1]) to a 250-step fp32 DDIM
reference from the same seeds. Speed: the wall time of the 100 images (one thread, machine shared with
other processes: read it as a rough guide) and the UNet work in full-UNet batch-row evaluations, counted.
Writes benchmarks/results/emoji-fastpath.json and docs/emoji-fastpath.png (speed against top-1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from bench_emoji_quality import DOCS, RESULTS, ROOT, load, read_split, to_tensor
from common import announce, write_result

SOLVERS = ("dpm++2m-karras", "unipc", "ddim", "deis")


def settings(quick: bool) -> list[dict]:
    """Every measured setting: a name, the sampler (None: the model's DDIM), steps, dtype, cache, interval."""
    rows = [{"name": "exact (DDIM 50, fp32)", "steps": 50},
            {"name": "bf16 (DDIM 50)", "steps": 50, "dtype": "bf16"}]
    for solver in SOLVERS[:1] if quick else SOLVERS:
        for steps in (10, 15, 20, 25):
            rows.append({"name": f"{solver} {steps}", "sampler": solver, "steps": steps})
    for schedule in ("uniform", "quadratic"):
        for interval in (2, 3, 4, 5):
            rows.append({"name": f"DDIM 50 + cache {interval} {schedule}", "steps": 50,
                         "cache": (interval, schedule)})
            rows.append({"name": f"dpm++2m-karras 20 + cache {interval} {schedule}", "sampler": "dpm++2m-karras",
                         "steps": 20, "cache": (interval, schedule)})
    rows.append({"name": "dpm++2m-karras 20 + cache 2 + guidance (0, 5)", "sampler": "dpm++2m-karras",
                 "steps": 20, "cache": (2, "uniform"), "interval": (0.0, 5.0)})
    for lo, hi in ((0.0, 5.0), (0.3, 1e9), (0.3, 5.0), (1.0, 1e9)):
        rows.append({"name": f"DDIM 50 + guidance ({lo}, {hi:g})", "steps": 50, "interval": (lo, hi)})
        rows.append({"name": f"dpm++2m-karras 20 + guidance ({lo}, {hi:g})", "sampler": "dpm++2m-karras",
                     "steps": 20, "interval": (lo, hi)})
    # Candidates for the fast preset: fewer solver steps with the cache and the guidance interval together.
    for steps in (8, 10, 12, 15):
        for interval in (2, 3):
            rows.append({"name": f"dpm++2m-karras {steps} + cache {interval} + guidance (0, 5)",
                         "sampler": "dpm++2m-karras", "steps": steps, "cache": (interval, "uniform"),
                         "interval": (0.0, 5.0)})
    rows.append({"name": "fast preset (fp32)", "preset": "fast"})
    rows.append({"name": "fast preset (bf16)", "preset": "fast", "dtype": "bf16"})
    return rows


def run(setting: dict, prompts, seeds, batch: int, model: str):
    from ldmkit import DiffusionPipeline
    from ldmkit.pipelines.presets import apply_preset, set_sampler

    dtype = torch.bfloat16 if setting.get("dtype") == "bf16" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": setting.get("steps", 50), "guidance_scale": 3.0}
    if "preset" in setting:
        kwargs.update(apply_preset(pipe, setting["preset"]))
    set_sampler(pipe, setting.get("sampler"))
    if "cache" in setting:
        pipe.enable_feature_cache(interval=setting["cache"][0], schedule=setting["cache"][1])
    if "interval" in setting:
        kwargs["guidance_interval"] = setting["interval"]
    calls = []  # (batch rows, shallow?) per UNet call
    original = pipe.unet.forward

    def counting_forward(sample, *args, **kw):
        cache = pipe.unet._feature_cache
        before = cache.calls["shallow"] if cache is not None else 0
        out = original(sample, *args, **kw)
        calls.append((sample.shape[0], cache is not None and cache.calls["shallow"] > before))
        return out

    pipe.unet.forward = counting_forward
    images, start = [], time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(prompts), batch):
            out = pipe(prompts[k:k + batch], generator=[torch.Generator().manual_seed(s) for s in seeds[k:k + batch]],
                       output_type="pt", **kwargs)
            images.append(out.images.float())
    seconds = time.perf_counter() - start
    full = sum(b for b, shallow in calls if not shallow)
    shallow = sum(b for b, s in calls if s)
    return torch.cat(images), seconds, {"full_rows": full, "shallow_rows": shallow,
                                        "steps": kwargs["num_inference_steps"],
                                        "scheduler": type(pipe.scheduler).__name__}


def main(argv=None) -> int:
    from ldmkit.training.metrics import retrieval_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ldmkit:emoji-text2img")
    parser.add_argument("--data", default=str(ROOT / "data" / "emoji-32"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer solvers (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "emoji-fastpath.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/emoji-fastpath.png from --out")
    parser.add_argument("--rows", nargs="+", metavar="NAME",
                        help="run only these settings and replace their rows in --out (the rest kept)")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text())["results"], DOCS / "emoji-fastpath.png")
        return 0
    busy = announce()
    torch.set_num_threads(1)
    data = Path(args.data)
    train, test = read_split(data / "train"), read_split(data / "test")
    gallery = load([p for p, _ in train + test], 32)
    chosen = sorted(np.random.default_rng(args.seed).choice(len(train), args.n, replace=False).tolist())
    prompts, seeds = [train[i][1] for i in chosen], [args.seed + k for k in range(args.n)]
    reference, _, _ = run({"steps": 250}, prompts, seeds, args.batch, args.model)
    results = []
    chosen_settings = [r for r in settings(args.quick) if not args.rows or r["name"] in args.rows]
    if args.rows and len(chosen_settings) != len(args.rows):
        raise SystemExit(f"--rows: unknown names; known: {[r['name'] for r in settings(args.quick)]}")
    for setting in chosen_settings:
        images, seconds, work = run(setting, prompts, seeds, args.batch, args.model)
        images8 = to_tensor([PIL.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                             for im in images])
        ranks = retrieval_ranks(images8, gallery, torch.tensor(chosen))
        rms = (images - reference).pow(2).mean(dim=(1, 2, 3)).sqrt().mean().item()
        row = {**{k: v for k, v in setting.items()}, **work, "seconds": round(seconds, 3),
               "top1": (ranks <= 1).float().mean().item(), "top5": (ranks <= 5).float().mean().item(),
               "rms_to_ref250": rms}
        results.append(row)
        print(f"{row['name']:45s} top1 {row['top1']:.2f} top5 {row['top5']:.2f} rms {rms:.4f} "
              f"{seconds:6.2f}s full {work['full_rows']} shallow {work['shallow_rows']}", flush=True)
    if args.rows:  # the other rows as they were measured before
        fresh = {r["name"]: r for r in results}
        results = [fresh.pop(r["name"], r) for r in json.loads(Path(args.out).read_text())["results"]]
        results += list(fresh.values())
    out = {"model": args.model, "captions": args.n, "guidance_scale": 3.0, "reference": "DDIM 250 fp32",
           "torch_threads": 1, "load": "shared machine (other helpers' jobs on 2 cores): times are rough",
           "results": results}
    write_result(Path(args.out), out, busy, timing_keys=("seconds",))
    plot(results, DOCS / "emoji-fastpath.png")
    return 0


def plot(results: list[dict], path: Path) -> None:
    """Quality against work, drawn with PIL (no plotting dependency): the RMS pixel distance to the 250-step
    reference (top-1 is 89-92 % in every row, so it cannot tell the settings apart) against the full UNet
    evaluations the 100 images took (counted, so the plot does not depend on the machine's load; a cached
    step's shallow pass is cheaper and is not counted)."""
    width, height, margin = 900, 560, 70
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(image)
    xmax = max(r["full_rows"] for r in results) * 1.05
    ymax = max(r["rms_to_ref250"] for r in results) * 1.1

    def xy(r):
        return (margin + (width - 2 * margin) * r["full_rows"] / xmax,
                height - margin - (height - 2 * margin) * r["rms_to_ref250"] / ymax)

    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    draw.text((width // 2 - 200, height - margin + 30),
              "full UNet evaluations for 100 images (shallow cached passes not counted)", fill="black")
    draw.text((5, margin - 30), "RMS pixel distance to 250-step DDIM (lower is better); top-1 89-92 % everywhere",
              fill="black")
    for k in range(5):
        y = height - margin - (height - 2 * margin) * k / 4
        draw.text((10, y - 5), f"{ymax * k / 4:.3f}", fill="black")
        draw.text((margin + (width - 2 * margin) * k / 4 - 10, height - margin + 8), f"{xmax * k / 4:.0f}",
                  fill="black")
    colors = {"fast": "purple", "exact": "red", "bf16": "orange", "cache": "blue", "guidance": "green"}
    for n, r in enumerate(results):
        kind = next((k for k in colors if k in r["name"]), None)
        color = colors.get(kind, "gray")
        x, y = xy(r)
        size = 7 if kind in ("exact", "fast", "bf16") else 4
        draw.ellipse([x - size, y - size, x + size, y + size], fill=color)
        if kind in ("exact", "fast", "bf16"):
            draw.text((x + 9, y - 14 + 12 * (n % 2)), r["name"], fill=color)
    legend = [("gray", "solvers 10-25 steps"), ("blue", "+ feature cache"), ("green", "+ guidance interval")]
    for k, (color, label) in enumerate(legend):
        draw.ellipse([width - 250, margin + 20 * k, width - 242, margin + 8 + 20 * k], fill=color)
        draw.text((width - 235, margin - 2 + 20 * k), label, fill="black")
    path.parent.mkdir(exist_ok=True)
    image.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
