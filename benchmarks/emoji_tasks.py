"""The unconditional, class-conditional and inpainting modes of bench_emoji_quality.py (one module each would
be three copies of the same loading code; this keeps bench_emoji_quality.py under 500 lines).

``uncond``: 200 samples (seed i), each one's nearest training image by pixel distance, against the same for
the held-out images: a model that copies its training set gives samples far nearer to it than new emoji are.
``class``: 10 samples per class; a nearest-neighbour classifier over the training split (pixel distance)
names the class of each; accuracy is how often it names the asked one.
``inpaint``: every held-out emoji with the same seeded mask; PSNR inside the hole for the model and for two
baselines (the mean colour of the kept pixels, and OpenCV's Telea inpainting when cv2 is installed, else a
blurred fill; `pip install -e ".[bench]"` installs it). ``--average K`` also scores the pixel mean of K draws
per image (seeds i + j * N), an estimate of the posterior mean that PSNR rewards, reported apart from the one
sample a user gets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from bench_emoji_quality import DOCS, caption_sheet, load, read_split, to_tensor


def _pipe(name: str):
    from ldmkit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _preset_pipe(args):
    """(pipeline, call keywords): the model's own scheduler at --steps in fp32, or with --preset what the CLI
    runs (the preset's dtype, sampler, step count and feature cache)."""
    if args.preset is None:
        return _pipe(args.model), {"num_inference_steps": args.steps, "eta": args.eta}
    from ldmkit.pipelines.presets import apply_preset, get_preset, load_pipeline

    preset = get_preset(args.preset)
    pipe = load_pipeline(args.model, torch.device("cpu"), preset.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"num_inference_steps": args.steps, "eta": args.eta, **apply_preset(pipe, preset)}


def nearest(queries: torch.Tensor, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest gallery image, as root mean squared pixel distance."""
    d = torch.cdist(queries.flatten(1).double(), gallery.flatten(1).double()) / queries[0].numel() ** 0.5
    return d.min(dim=1)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------------ uncond
def bench_uncond(args) -> dict:
    data = Path(args.data)
    train, test = read_split(data / "train"), read_split(data / "test")
    gallery = load([p for p, _ in train], 32)
    held_out = load([p for p, _ in test], 32)
    pipe = _pipe(args.model)
    images, start = [], time.perf_counter()
    for k in range(0, args.n, args.batch):
        seeds = range(args.seed + k, args.seed + min(k + args.batch, args.n))
        images += pipe(batch_size=len(seeds), num_inference_steps=args.steps, eta=args.eta,
                       generator=_generators(seeds)).images
    seconds = time.perf_counter() - start
    d_gen, _ = nearest(to_tensor(images), gallery)
    d_test, _ = nearest(held_out, gallery)
    DOCS.mkdir(exist_ok=True)
    grid = PIL.Image.new("RGB", (16 * 64, 4 * 64), "white")
    for i, im in enumerate(images[:64]):
        grid.paste(im.convert("RGB").resize((64, 64), PIL.Image.NEAREST), ((i % 16) * 64, (i // 16) * 64))
    grid.save(DOCS / "emoji-uncond.png")
    return {"model": args.model, "samples": args.n, "steps": args.steps, "eta": args.eta, "seconds": seconds,
            "nn_rms_samples_median": d_gen.median().item(), "nn_rms_samples_mean": d_gen.mean().item(),
            "nn_rms_heldout_median": d_test.median().item(), "nn_rms_heldout_mean": d_test.mean().item(),
            "samples_nearer_than_heldout_median": (d_gen < d_test.median()).float().mean().item(),
            "near_copies": int((d_gen < 0.02).sum()), "near_copy_threshold_rms": 0.02}


# ------------------------------------------------------------------------------------------------- class
def read_labels(folder: Path) -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if not rows or "label" not in rows[0]:
        raise SystemExit(f"{folder}/metadata.jsonl has no 'label' column: rebuild the data with "
                         "`ldmkit data emoji` (it writes the Unicode classes).")
    return [(folder / r["file_name"], r["label"]) for r in rows]


def bench_class(args) -> dict:
    train = read_labels(Path(args.data) / "train")
    gallery = load([p for p, _ in train], 32)
    gallery_labels = [label for _, label in train]
    pipe = _pipe(args.model)
    names = list(pipe.labels)
    per_class, sheet_rows, start = {}, [], time.perf_counter()
    for c, name in enumerate(names):
        ids = pipe.get_label_ids([name] * args.per_class)
        seeds = [args.seed + c * args.per_class + j for j in range(args.per_class)]
        out = pipe(class_labels=ids, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                   generator=_generators(seeds)).images
        _, index = nearest(to_tensor(out), gallery)
        found = [gallery_labels[i] for i in index.tolist()]
        per_class[name] = sum(f == name for f in found) / len(found)
        if len(sheet_rows) < args.grid:
            sheet_rows.append((name, out[:8]))
    seconds = time.perf_counter() - start
    DOCS.mkdir(exist_ok=True)
    caption_sheet(sheet_rows, cell=48, columns=2).save(DOCS / "emoji-class.png")
    accuracy = float(np.mean(list(per_class.values())))
    # The same classifier on the real held-out emoji: how well pixel distance tells these classes apart at all.
    test = read_labels(Path(args.data) / "test")
    _, index = nearest(load([p for p, _ in test], 32), gallery)
    heldout = float(np.mean([gallery_labels[i] == label for i, (_, label) in zip(index.tolist(), test)]))
    return {"model": args.model, "classes": len(names), "samples_per_class": args.per_class, "steps": args.steps,
            "guidance_scale": args.guidance, "eta": args.eta, "seconds": seconds,
            "nn_classifier_accuracy": accuracy, "nn_classifier_accuracy_on_heldout_real": heldout,
            "chance": 1 / len(names),
            "worst_classes": sorted(per_class.items(), key=lambda kv: kv[1])[:5], "per_class": per_class}


# ----------------------------------------------------------------------------------------------- inpaint
def baseline_fill(image: np.ndarray, hole: np.ndarray) -> dict[str, np.ndarray]:
    """The two baselines, uint8 (H, W, 3): the kept pixels' mean colour, and Telea (cv2) or a blurred fill."""
    mean = image.copy()
    mean[hole] = image[~hole].mean(axis=0).round().astype(np.uint8)
    try:
        import cv2

        other = cv2.inpaint(image, hole.astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA)
        name = "telea"
    except ImportError:
        blurred = np.asarray(PIL.Image.fromarray(mean).filter(PIL.ImageFilter.GaussianBlur(4)))
        other = image.copy()
        other[hole] = blurred[hole]
        name = "blurred"
    return {"mean_colour": mean, name: other}


def hole_psnr(a: np.ndarray, b: np.ndarray, hole: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255)[hole].__pow__(2).mean()
    return float(10 * np.log10(1 / max(mse, 1e-12)))


def bench_inpaint(args) -> dict:
    from ldmkit.training.masks import seeded_masks

    test = read_split(Path(args.data) / "test")
    originals = [np.asarray(PIL.Image.open(p).convert("RGB")) for p, _ in test]
    masks = seeded_masks(args.seed, len(test), 32).numpy() > 0.5  # (N, 1, 32, 32), True = the hole
    pipe, call = _preset_pipe(args)
    draws, start = [], time.perf_counter()
    for j in range(args.average):
        outputs, offset = [], args.seed + j * len(test)
        for k in range(0, len(test), args.batch):
            ims = [PIL.Image.fromarray(o) for o in originals[k:k + args.batch]]
            ms = [PIL.Image.fromarray((m[0] * 255).astype(np.uint8)) for m in masks[k:k + args.batch]]
            outputs += pipe(image=ims, mask_image=ms, generator=_generators(range(offset + k, offset + k + len(ims))),
                            **call).images
        draws.append(np.stack([np.asarray(o.convert("RGB")) for o in outputs]))
        if j == 0:
            seconds, first = time.perf_counter() - start, outputs
    outputs = first
    mean = np.round(np.mean(draws, axis=0)).astype(np.uint8)
    scores: dict[str, list[float]] = {"model": []}
    for i, (original, mask) in enumerate(zip(originals, masks)):
        hole = mask[0]
        scores["model"].append(hole_psnr(draws[0][i], original, hole))
        if args.average > 1:
            scores.setdefault(f"mean_of_{args.average}", []).append(hole_psnr(mean[i], original, hole))
        for name, filled in baseline_fill(original, hole).items():
            scores.setdefault(name, []).append(hole_psnr(filled, original, hole))
    means = {name: float(np.mean(v)) for name, v in scores.items()}
    best_baseline = max(v for k, v in means.items() if k != "model" and not k.startswith("mean_of_"))
    # masked input, the first draw, (the mean of the draws,) the original
    rows = [(test[i][1], [PIL.Image.fromarray(np.where(masks[i][0][..., None], 255, originals[i]).astype(np.uint8)),
                          outputs[i], *([PIL.Image.fromarray(mean[i])] if args.average > 1 else []),
                          PIL.Image.fromarray(originals[i])]) for i in range(min(args.grid, len(test)))]
    DOCS.mkdir(exist_ok=True)
    caption_sheet(rows, cell=64, columns=4).save(DOCS / "emoji-inpaint.png")
    return {"model": args.model, "images": len(test), "preset": args.preset, "steps": call["num_inference_steps"],
            "eta": args.eta, "dtype": str(pipe.unet.dtype), "seconds": seconds, "hole_psnr": means,
            "gain_over_best_baseline_db": means["model"] - best_baseline, "hole_fraction_mean": float(masks.mean()),
            **({"average": args.average, "gain_of_mean_over_best_baseline_db":
                means[f"mean_of_{args.average}"] - best_baseline} if args.average > 1 else {})}


def add_parsers(sub, root: Path) -> None:
    data = str(root / "data" / "emoji-32")
    for task, model, extra in [("uncond", "ldmkit:emoji-uncond", {"n": 200}),
                               ("class", "ldmkit:emoji-class", {"per_class": 10}),
                               ("inpaint", "ldmkit:emoji-inpaint", {})]:
        p = sub.add_parser(task)
        p.add_argument("--model", default=model)
        p.add_argument("--data", default=data)
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--eta", type=float, default=0.0)
        p.add_argument("--batch", type=int, default=25)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--grid", type=int, default=8)
        p.add_argument("--out", default=str(root / "benchmarks" / "results" / f"emoji-{task}.json"))
        if "n" in extra:
            p.add_argument("--n", type=int, default=extra["n"])
        if task == "inpaint":
            p.add_argument("--average", type=int, default=1, help="also score the pixel mean of this many draws "
                           "per image (the posterior-mean estimate); the first draw stays the model's score")
            p.add_argument("--preset", choices=["exact", "fast"], help="the CLI's preset (dtype, sampler, steps, "
                           "cache) instead of the model's scheduler at --steps in fp32")
        if "per_class" in extra:
            p.add_argument("--per-class", dest="per_class", type=int, default=extra["per_class"])
            p.add_argument("--guidance", type=float, default=3.0)


TASKS = {"uncond": bench_uncond, "class": bench_class, "inpaint": bench_inpaint}
