"""``ldmkit txt2img``, ``upscale`` and ``info``: load a pipeline, run it, write PNGs with metadata (and the helpers
``sample`` and ``inpaint`` share)."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open

from .. import __version__
from ..assembly.staged import encode_then_load
from ..errors import LDMKitError
from ..io import atomic_path, parse_json_object
from ..loading.bundled import DEFAULT_SUPERRES, DEFAULT_TEXT2IMG
from ..loading.diffusers_layout import resolve_pipeline_folder
from ..pipelines import DiffusionPipeline
from ..pipelines.presets import apply_preset, pick_device, set_sampler
from ..pipelines.presets import load_pipeline as load_preset_pipeline
from ..utils import make_image_grid
from .preset_options import PRESET_KEYS, add_preset_options, preset_metadata, restore_preset, run_preset, upscale_preset

EXAMPLES = """examples:
  ldmkit txt2img "red apple"                                # the bundled emoji model, offline, --fast preset
  ldmkit txt2img "red apple" --exact --seed 7               # fp32 + the model's scheduler (the reference)
  ldmkit txt2img "grinning face" --n 4 --seed 7 --grid --upscale -o out/   # 128x128 through the bundled 4x model
  ldmkit txt2img "a red apple" --model ./my-pipeline --steps 20 --scheduler dpm++2m-karras
  ldmkit txt2img --from-png out/a-red-apple-7.png          # regenerate an image from its metadata
  ldmkit txt2img --prompts prompts.jsonl --batch-size 8 -o data/   # many prompts; a rerun resumes
  accelerate launch --num_processes 2 -m ldmkit txt2img --prompts prompts.txt -o data/   # split over 2 GPUs
  ldmkit upscale small.png other.jpg -o big/ --model CompVis/ldm-super-resolution-4x-openimages
  ldmkit sample --n 8 --grid                                # the bundled unconditional emoji model
  ldmkit sample --class animal-mammal --n 8 --grid          # class-conditional; ldmkit sample --list-classes
  ldmkit sample --model CompVis/ldm-celebahq-256 --n 4 --steps 200
  ldmkit inpaint face.png --mask mask.png -o out/           # white = repaint; the rest is kept exactly
  ldmkit inpaint face.png --box 8,8,24,24 --n 4 --grid      # a rectangle instead of a mask file
  ldmkit info ldmkit:emoji-text2img
bundled models (offline): ldmkit:emoji-text2img (txt2img default), ldmkit:emoji-superres-4x (upscale default),
  ldmkit:emoji-uncond (sample default), ldmkit:emoji-class (sample --class default),
  ldmkit:emoji-inpaint (inpaint default)
"""

# txt2img --from-png: the options an ldmkit PNG's metadata restores, with the types they must have.
FROM_PNG_KEYS = {"model": (str,), "prompt": (str,), "negative_prompt": (str, type(None)), "seed": (int,),
                 "steps": (int,), "guidance": (int, float), "eta": (int, float), "scheduler": (str, type(None)),
                 "height": (int, type(None)), "width": (int, type(None)), "upscale": (bool,),
                 "upscale_model": (str,), "upscale_steps": (int,), **PRESET_KEYS}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this


# ------------------------------------------------------------------------------------------- helpers
def load_pipeline(model: str | None, device: str, dtype: str | dict, quiet: bool = False) -> DiffusionPipeline:
    """The pipeline loaded onto the chosen device in ``dtype`` (a --dtype name, "auto" decided per network, or
    one per component); ``quiet`` turns off its progress bar (this pipeline's only: the CLI sets no global)."""
    pipe = load_preset_pipeline(resolve_model(model), pick_device(device), dtype)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_model(model: str | None) -> str:
    if model is None:
        raise LDMKitError("no --model given (a pipeline folder, a Hub id or a bundled ldmkit:NAME).")
    return model


set_scheduler = set_sampler  # the CLI's name for it


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def free_path(folder: Path, stem: str, force: bool) -> Path:
    """``folder/stem.png``, or with -1, -2, ... appended so no existing file is overwritten (unless --force)."""
    path = folder / f"{stem}.png"
    n = 1
    while path.exists() and not force:
        path = folder / f"{stem}-{n}.png"
        n += 1
    return path


def save_png(image, path: Path, metadata: dict) -> Path:
    """Write a PNG atomically, with ``metadata`` as JSON in a text chunk named "ldmkit"."""
    info = PngInfo()
    info.add_text("ldmkit", json.dumps(metadata, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str) -> dict:
    try:
        with Image.open(path) as im:
            text = im.text.get("ldmkit")  # type: ignore[attr-defined]
    except (OSError, AttributeError) as e:
        raise LDMKitError(f"cannot read {path} as a PNG ({e}).") from None
    if not text:
        raise LDMKitError(f"{path} has no ldmkit metadata (was it made by `ldmkit txt2img`?).")
    return parse_json_object(text, f"{path}: its ldmkit metadata", "The file was edited or damaged, so it "
                             "cannot be replayed.")


def restore_from_png(args) -> None:
    """Set the options a PNG's metadata records, each checked for its type (the file may have been edited)."""
    meta = read_png_metadata(args.from_png)
    for key, types in FROM_PNG_KEYS.items():
        if key not in meta:
            continue
        value = meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise LDMKitError(f"{args.from_png}: metadata {key}={value!r} should be "
                              f"{' or '.join(t.__name__ for t in types)}; fix or drop it.")
        setattr(args, key, value)
    restore_preset(args, meta)
    args.n = 1


def seeds_from(args) -> list[int]:
    """--seed, --seed + 1, ... (one per image); a random first seed when --seed is not given."""
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    if not 0 <= seed <= MAX_SEED - (args.n - 1):
        raise LDMKitError(f"--seed {seed} is out of range: seeds go from 0 to {MAX_SEED - (args.n - 1)} here.")
    return [seed + i for i in range(args.n)]


def output_folder(path: str) -> Path:
    """The -o folder, created if needed and checked writable before any work is done."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LDMKitError(f"-o {path} is a file, not a folder; give a folder for the images.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LDMKitError(f"-o {path}: cannot create the folder ({e.strerror}); choose another with -o.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LDMKitError(f"-o {path}: the folder is not writable; choose another with -o.")
    return folder


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def image_metadata(args, prompt: str, negative_prompt: str | None, seed: int) -> dict:
    """What a txt2img PNG records: enough for --from-png to replay it, and for --prompts to prove it done."""
    meta = {"model": args.model, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
            "steps": args.steps, "guidance": args.guidance, "eta": args.eta, "scheduler": args.scheduler,
            "height": args.height, "width": args.width, "upscale": bool(args.upscale),
            "preset": getattr(args, "preset", None), "ldmkit_version": __version__}
    if args.upscale:
        meta.update(upscale_model=args.upscale_model, upscale_steps=args.upscale_steps)
    return meta


# ------------------------------------------------------------------------------------------- commands
def cmd_txt2img(args) -> int:
    if args.from_png:
        restore_from_png(args)
    if not args.prompt:
        raise LDMKitError("give a prompt, e.g. ldmkit txt2img \"a red apple\" (or --from-png FILE).")
    out = output_folder(args.output)
    seeds = seeds_from(args)
    preset = run_preset(args, default_steps=50)
    # The text encoder loads, encodes and goes before the UNet loads: the same pixels at a lower peak memory.
    pipe, texts, text_dtypes = encode_then_load(resolve_model(args.model), pick_device(args.device), preset.dtype,
                                                args.prompt, args.negative_prompt, args.guidance,
                                                cache_converted=True)  # as load_pipeline's (presets)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    result = pipe(**texts, guidance_scale=args.guidance, eta=args.eta, height=args.height, width=args.width,
                  num_images_per_prompt=args.n, generator=generators(seeds), **apply_preset(pipe, preset))
    images = result.images
    ran = preset_metadata(pipe, preset, text_dtypes)  # steps, scheduler, dtypes and the fast-path settings as run
    if args.upscale:
        sr_preset = upscale_preset(args, preset)
        sr = load_pipeline(args.upscale_model, args.device, sr_preset.dtype, args.quiet)
        images = sr(images, generator=generators(seeds), **apply_preset(sr, sr_preset)).images
        sr_ran = preset_metadata(sr, sr_preset)
        ran.update(upscale_model=args.upscale_model, upscale_steps=sr_ran["steps"], upscale_dtype=sr_ran["dtype"],
                   upscale_scheduler=sr_ran["scheduler"])
    paths = []
    for s, image in zip(seeds, images):
        meta = {**image_metadata(args, args.prompt, args.negative_prompt, s), **ran}
        paths.append(save_png(image, free_path(out, f"{slug(args.prompt)}-{s}", args.force), meta))
    if args.grid and len(images) > 1:
        paths.append(save_png(make_image_grid(images), free_path(out, f"{slug(args.prompt)}-grid", args.force),
                              {"prompt": args.prompt, "seeds": seeds, "model": args.model}))
    for p in paths:
        print(p)
    return 0


def cmd_upscale(args) -> int:
    resolve_model(args.model)
    out = output_folder(args.output)
    if not 0 <= args.seed <= MAX_SEED:
        raise LDMKitError(f"--seed {args.seed} is out of range: seeds go from 0 to {MAX_SEED}.")
    preset = run_preset(args, default_steps=100)
    pipe = load_pipeline(args.model, args.device, preset.dtype, args.quiet)
    call = apply_preset(pipe, preset)
    for name in args.images:
        try:
            with Image.open(name) as im:
                image = im.copy()
        except FileNotFoundError:
            raise LDMKitError(f"{name} does not exist.") from None
        except (UnidentifiedImageError, OSError) as e:
            raise LDMKitError(f"{name} is not a readable image ({e}).") from None
        big = pipe(image, eta=args.eta, generator=torch.Generator().manual_seed(args.seed),
                   tiling=None if not args.no_tiling else False, **call).images[0]
        meta = {"model": args.model, "source": str(name), "seed": args.seed, "eta": args.eta,
                "ldmkit_version": __version__, **preset_metadata(pipe, preset)}
        print(save_png(big, free_path(out, f"{Path(name).stem}-x{pipe.upscale_factor}", args.force), meta))
    return 0


def cmd_info(args) -> int:
    folder, _ = resolve_pipeline_folder(resolve_model(args.model))
    pipe = DiffusionPipeline.from_pretrained(folder)
    print(f"{type(pipe).__name__}  ({args.model}: {folder})")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            n = sum(p.numel() for p in component.parameters())
            stored, size = stored_weights(folder / name)
            print(f"  {name:10s} {type(component).__name__:24s} {n / 1e6:9.2f} M params  "
                  f"{str(component.dtype).replace('torch.', ''):8s} (stored {stored}, {size / 2**20:.1f} MiB)")
        else:
            print(f"  {name:10s} {type(component).__name__}")
    config = dict(pipe.scheduler.config)
    print("  scheduler: " + ", ".join(f"{k}={config[k]}" for k in sorted(config) if config[k] is not None))
    return 0


def stored_weights(folder: Path) -> tuple[str, int]:
    """The dtypes and total size of a component's weight files (as stored; loading may convert)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    dtypes = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:
                dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
        else:
            dtypes.add("pickle")
    return "/".join(sorted(dtypes)) or "-", sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------- parsers
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    add_preset_options(p)  # --fast / --exact, --dtype, --scheduler
    p.add_argument("-o", "--output", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--force", action="store_true", help="overwrite existing files instead of picking new names")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_generate_parsers(sub) -> None:
    """Register ``txt2img``, ``upscale`` and ``info`` on an argparse sub-parser collection."""
    _add_txt2img_parser(sub)
    p = sub.add_parser("upscale", help="4x super-resolution of image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=DEFAULT_SUPERRES,
                   help=f"super-resolution pipeline folder, Hub id or bundled name (default: {DEFAULT_SUPERRES})")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's; --exact: 100)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tiling", dest="no_tiling", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("info", help="components, parameter counts, dtypes, sizes, scheduler")
    p.add_argument("model", nargs="?", default=DEFAULT_TEXT2IMG,
                   help=f"pipeline folder, Hub id or bundled name (default: {DEFAULT_TEXT2IMG})")
    p.set_defaults(func=cmd_info)


def _add_txt2img_parser(sub) -> None:
    p = sub.add_parser("txt2img", help="images from a text prompt", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?")
    p.add_argument("--model", default=DEFAULT_TEXT2IMG,
                   help=f"pipeline folder, Hub id or bundled name (default: {DEFAULT_TEXT2IMG})")
    p.add_argument("--n", type=int, default=1, help="number of images (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's; --exact: 50)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale (default 3.0: best retrieval for the bundled model)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--upscale", action="store_true", help="then upscale 4x with --upscale-model")
    p.add_argument("--upscale-model", dest="upscale_model", default=DEFAULT_SUPERRES,
                   help=f"super-resolution pipeline for --upscale (default: {DEFAULT_SUPERRES})")
    p.add_argument("--upscale-steps", dest="upscale_steps", type=int,
                   help="steps of the --upscale pass (default: the preset's; --exact: 50)")
    p.add_argument("--grid", action="store_true", help="also save a grid of all images")
    p.add_argument("--from-png", dest="from_png", help="regenerate from the metadata of an ldmkit PNG")
    _common(p)
    p.set_defaults(func=cmd_txt2img)
