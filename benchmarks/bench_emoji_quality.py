"""Quality of the bundled emoji models, against their references in the same run.

Run by hand (after ``ldmkit data emoji --size 32 --out data/emoji-32`` and ``--size 128 --out data/emoji-128``):
    python benchmarks/bench_emoji_quality.py text2img [--model ldmkit:emoji-text2img] [--n 100]
    python benchmarks/bench_emoji_quality.py superres [--model ldmkit:emoji-superres-4x]
    python benchmarks/bench_emoji_quality.py text2img --split test      # the 163 held-out captions
    python benchmarks/bench_emoji_quality.py uncond | class | inpaint   # see benchmarks/emoji_tasks.py

``text2img``: one image per training caption (100 captions drawn with a fixed seed, image i from seed i), every
one of the 3,789 emoji ranked by pixel distance to it at the model's resolution; top-1 / top-5 accuracy of the
caption's own emoji (chance: 1 / 3,789). The reference beside it: diffusers' LDMTextToImagePipeline on the
same folder and seeds for the first prompts (same images expected). Writes
benchmarks/results/emoji-text2img.json and docs/emoji-text2img.png (prompt, generated image, its emoji).

``superres``: every held-out emoji at 128x128, downsampled 4x with bicubic (as in training), upscaled by the
model and, as the reference, by bicubic; PSNR against the original (8-bit images, as saved), plus the VQ
autoencoder's own reconstruction PSNR (the ceiling), and the first inputs through diffusers'
LDMSuperResolutionPipeline on the same folder and seeds (same images expected). Writes
benchmarks/results/emoji-superres.json and docs/emoji-superres.png (low-res, bicubic, model, original).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from common import announce, write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def read_split(folder: Path) -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [(folder / r["file_name"], r["text"]) for r in rows]


def load(paths, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1] from 8-bit image files of that size."""
    images = []
    for p in paths:
        with PIL.Image.open(p) as im:
            if im.size != (size, size):
                raise SystemExit(f"{p} is {im.size}, expected {size}x{size}: rebuild the data at that size.")
            images.append(im.convert("RGB"))
    return to_tensor(images)


def to_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] from PIL images."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])
                            ).permute(0, 3, 1, 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


def caption_sheet(rows: list[tuple[str, list[PIL.Image.Image]]], cell: int = 96, columns: int = 4):
    """A grid of (caption, images side by side) cells, images scaled up with nearest-neighbour."""
    width = cell * len(rows[0][1]) + 8
    height = cell + 30
    sheet = PIL.Image.new("RGB", (columns * width, ((len(rows) + columns - 1) // columns) * height), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for i, (caption, images) in enumerate(rows):
        x0, y0 = (i % columns) * width, (i // columns) * height
        for j, im in enumerate(images):
            sheet.paste(im.convert("RGB").resize((cell, cell), PIL.Image.NEAREST), (x0 + j * cell, y0))
        # PIL's built-in font is ASCII only: "são tomé" is drawn as "sao tome".
        ascii_caption = unicodedata.normalize("NFKD", caption).encode("ascii", "ignore").decode()
        draw.text((x0 + 2, y0 + cell + 4), ascii_caption[: width // 6], fill="black")
    return sheet


# --------------------------------------------------------------------------------------------- text2img
TONE = re.compile(r"\s*(light|medium-light|medium|medium-dark|dark) skin tone,?")
PEOPLE = re.compile(r"\b(man|woman|person|men|women|people|boy|girl)\b")


def base_name(caption: str) -> str:
    """A caption without skin tones, with man / woman / person (and the like) made one word: held-out
    captions whose base name is also a training caption's are compositions of seen parts."""
    return re.sub(r"\s+", " ", PEOPLE.sub("X", TONE.sub("", caption))).strip()


def split_scores(prompts: list[str], ranks: torch.Tensor, train_captions: list[str]) -> dict:
    """top-1 / top-5 for held-out captions that compose seen parts, and for those that name an emoji
    with no seen relative (a taco, a flag, a volcano: its pixels cannot be known from the training set)."""
    seen = {base_name(c) for c in train_captions}
    out = {}
    for name, keep in [("composable", True), ("novel", False)]:
        r = torch.stack([x for p, x in zip(prompts, ranks) if (base_name(p) in seen) == keep])
        out[name] = {"captions": len(r), "top1": (r <= 1).float().mean().item(),
                     "top5": (r <= 5).float().mean().item()}
    return out


def bench_text2img(args) -> dict:
    from ldmkit import DiffusionPipeline
    from ldmkit.training.metrics import retrieval_ranks

    data = Path(args.data)
    train, test = read_split(data / "train"), read_split(data / "test")
    everything = train + test
    size = args.size
    gallery = load([p for p, _ in everything], size)
    if args.split == "test":  # every held-out caption; the gallery holds their emoji after the training ones
        chosen = [len(train) + i for i in range(min(args.n, len(test)))]
    else:
        chosen = sorted(np.random.default_rng(args.seed).choice(len(train), args.n, replace=False).tolist())
    prompts = [everything[i][1] for i in chosen]
    seeds = [args.seed + k for k in range(len(chosen))]

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    images, start = [], time.perf_counter()
    for k in range(0, len(prompts), args.batch):
        out = pipe(prompts[k:k + args.batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   eta=args.eta, generator=[torch.Generator().manual_seed(s) for s in seeds[k:k + args.batch]])
        images += out.images
    seconds = time.perf_counter() - start
    generated = to_tensor(images)
    ranks = retrieval_ranks(generated, gallery, torch.tensor(chosen))
    result = {
        "model": args.model, "split": args.split, "captions": len(prompts), "gallery": len(everything),
        "steps": args.steps,
        "guidance_scale": args.guidance, "eta": args.eta, "scheduler": type(pipe.scheduler).__name__,
        "top1": (ranks <= 1).float().mean().item(), "top5": (ranks <= 5).float().mean().item(),
        "median_rank": ranks.median().item(), "chance_top1": 1 / len(everything), "seconds": seconds,
        "per_caption": [{"caption": p, "seed": s, "rank": int(r)} for p, s, r in zip(prompts, seeds, ranks)],
    }
    if args.split == "test":
        result["by_kind"] = split_scores(prompts, ranks, [c for _, c in train])
    if args.diffusers:
        result["diffusers"] = diffusers_text2img(args, prompts[: args.diffusers], seeds[: args.diffusers],
                                                 generated[: args.diffusers])
    rows = [(f"#{int(r)} {p}", [im, PIL.Image.open(everything[i][0])])
            for p, r, im, i in list(zip(prompts, ranks, images, chosen))[: args.grid]]
    DOCS.mkdir(exist_ok=True)
    caption_sheet(rows).save(DOCS / ("emoji-text2img-heldout.png" if args.split == "test" else "emoji-text2img.png"))
    return result


def diffusers_text2img(args, prompts, seeds, ours: torch.Tensor) -> dict:
    """The same prompts and seeds through diffusers' pipeline on the same folder.

    diffusers 0.42.1 sizes its latents as height // 8 whatever the autoencoder's factor, so for this f=4 model
    it is asked for twice the height and width: that gives the 8x8 latents (and 32x32 images) ldmkit makes.
    """
    import diffusers

    from ldmkit.loading.bundled import local_name

    ref = diffusers.LDMTextToImagePipeline.from_pretrained(str(local_name(args.model)), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    factor = 2 ** (len(ref.vqvae.config.block_out_channels) - 1)
    side = ref.unet.config.sample_size * 8
    images = []
    for p, s in zip(prompts, seeds):
        out = ref([p], num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                  height=side, width=side, generator=torch.Generator().manual_seed(s), output_type="np")
        images.append(torch.from_numpy(out.images[0]).permute(2, 0, 1))
    theirs = torch.stack(images)
    # Ours were rounded to 8 bits as PIL images; compare at that precision.
    theirs8 = (theirs * 255).round() / 255
    return {"prompts": len(prompts), "vae_factor": factor,
            "max_abs_diff_8bit": (theirs8 - ours).abs().max().item()}


# --------------------------------------------------------------------------------------------- superres
def bench_superres(args) -> dict:
    from ldmkit import DiffusionPipeline
    from ldmkit.training.degradations import degrade

    test = read_split(Path(args.data) / "test")
    hr_images = [PIL.Image.open(p).convert("RGB") for p, _ in test]
    rng = np.random.default_rng(0)  # bicubic degradation draws nothing, but the function takes a generator
    lr_images = [degrade(im, 4, "bicubic", rng) for im in hr_images]
    bicubic = [im.resize(hr.size, PIL.Image.BICUBIC) for im, hr in zip(lr_images, hr_images)]

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    ours, start = [], time.perf_counter()
    for k in range(0, len(lr_images), args.batch):
        batch = lr_images[k:k + args.batch]
        ours += pipe(batch, num_inference_steps=args.steps, eta=args.eta,
                     generator=[torch.Generator().manual_seed(args.seed + k + j) for j in range(len(batch))]).images
    seconds = time.perf_counter() - start
    hr = to_tensor(hr_images)
    with torch.no_grad():
        vq = pipe.vqvae
        recon = torch.cat([vq(hr[k:k + args.batch] * 2 - 1).sample for k in range(0, len(hr), args.batch)])
    recon8 = ((recon.clamp(-1, 1) + 1) / 2 * 255).round() / 255
    p_ours, p_bicubic, p_ae = psnr(to_tensor(ours), hr), psnr(to_tensor(bicubic), hr), psnr(recon8, hr)
    result = {
        "model": args.model, "images": len(test), "steps": args.steps, "eta": args.eta,
        "scheduler": type(pipe.scheduler).__name__,
        "psnr_model": p_ours.mean().item(), "psnr_bicubic": p_bicubic.mean().item(),
        "psnr_gain_db": (p_ours - p_bicubic).mean().item(), "psnr_autoencoder_ceiling": p_ae.mean().item(),
        "model_better_than_bicubic": (p_ours > p_bicubic).float().mean().item(), "seconds": seconds,
    }
    if args.diffusers:
        n = args.diffusers
        result["diffusers"] = diffusers_superres(args, lr_images[:n], to_tensor(ours[:n]))
    rows = [(test[i][1], [lr_images[i], bicubic[i], ours[i], hr_images[i]]) for i in range(min(args.grid, len(test)))]
    DOCS.mkdir(exist_ok=True)
    caption_sheet(rows, cell=128, columns=2).save(DOCS / "emoji-superres.png")
    return result


def diffusers_superres(args, lr_images, ours: torch.Tensor) -> dict:
    """The first low-res inputs through diffusers' pipeline on the same folder, with the same seeds."""
    import diffusers

    from ldmkit.loading.bundled import local_name

    folder = str(local_name(args.model))
    ref = diffusers.LDMSuperResolutionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    images = [ref(im, num_inference_steps=args.steps, eta=args.eta, output_type="np",
                  generator=torch.Generator().manual_seed(args.seed + k)).images[0] for k, im in enumerate(lr_images)]
    theirs = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 255).round() / 255
    return {"images": len(lr_images), "max_abs_diff_8bit": (theirs - ours).abs().max().item()}


def main(argv=None) -> int:
    import emoji_tasks  # imports this module's helpers, so not at the top

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("text2img")
    p.add_argument("--model", default="ldmkit:emoji-text2img")
    p.add_argument("--data", default=str(ROOT / "data" / "emoji-32"))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="captions of the training split (n drawn) or every held-out one (test)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--diffusers", type=int, default=8, help="prompts to rerun through diffusers (0: none)")
    p.add_argument("--out", help="default: benchmarks/results/emoji-text2img.json (-heldout.json for --split test)")
    p = sub.add_parser("superres")
    p.add_argument("--model", default="ldmkit:emoji-superres-4x")
    p.add_argument("--data", default=str(ROOT / "data" / "emoji-128"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--diffusers", type=int, default=8, help="inputs to rerun through diffusers (0: none)")
    p.add_argument("--out", default=str(RESULTS / "emoji-superres.json"))
    emoji_tasks.add_parsers(sub, ROOT)
    args = parser.parse_args(argv)
    busy = announce()
    torch.manual_seed(0)
    if args.task == "text2img" and args.out is None:
        args.out = str(RESULTS / ("emoji-text2img-heldout.json" if args.split == "test" else "emoji-text2img.json"))
    tasks = {"text2img": bench_text2img, "superres": bench_superres, **emoji_tasks.TASKS}
    result = tasks[args.task](args)
    result["torch_threads"] = torch.get_num_threads()
    write_result(Path(args.out), result, busy, timing_keys=("seconds",))
    print(json.dumps({k: v for k, v in result.items() if k != "per_caption"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
