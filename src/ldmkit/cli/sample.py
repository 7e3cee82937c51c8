"""``ldmkit sample``: unconditional and class-conditional samples (CompVis scripts/sample_diffusion.py and the
cin256 notebook, from a terminal), and the run options ``sample`` and ``inpaint`` share: --n, --seed, --steps,
--eta, --grid, --fast / --exact and ``--from-png`` replay."""

from __future__ import annotations

import argparse
import re

import torch

from .. import __version__
from ..errors import LDMKitError
from ..loading.bundled import DEFAULT_CLASS, DEFAULT_UNCOND
from ..pipelines import LDMClassConditionalPipeline, LDMPipeline
from ..pipelines.pipeline_latent_diffusion_class_conditional import close_class_names
from ..pipelines.presets import apply_preset, get_preset, set_sampler
from ..utils import make_image_grid
from .generate import (
    _common,
    free_path,
    generators,
    load_pipeline,
    output_folder,
    read_png_metadata,
    save_png,
    seeds_from,
    slug,
)

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.0  # the cin256 notebook's scale
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The command a pipeline class is used with, for the "wrong kind of model" errors.
COMMAND_OF = {"LDMTextToImagePipeline": "txt2img", "LDMSuperResolutionPipeline": "upscale",
              "LDMInpaintPipeline": "inpaint", "LDMPipeline": "sample", "LDMClassConditionalPipeline": "sample"}
# sample --from-png: the options an image's metadata restores, with the types they must have.
SAMPLE_KEYS = {"model": (str,), "seed": (int,), "steps": (int,), "eta": (int, float), "scheduler": (str, type(None)),
               "preset": (str,), "dtype": (str,), "guidance": (int, float, type(None)), "class_id": (int, type(None))}


# ------------------------------------------------------------------------------- shared with inpaint
def add_run_options(p: argparse.ArgumentParser) -> None:
    """--n, --seed, --steps, --eta, --grid, --from-png, --fast / --exact, and the common options."""
    p.add_argument("--n", type=int, default=1, help="images to make (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help=f"sampling steps (default {DEFAULT_STEPS}; --fast: the preset's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic DDIM, 1: DDPM-like)")
    p.add_argument("--grid", action="store_true", help="also save a grid of all images")
    p.add_argument("--from-png", dest="from_png", help="make an image again from the metadata of one made here")
    _common(p)  # with --fast (the default) / --exact, --dtype and --scheduler


def check_count(args) -> None:
    if args.n < 1:
        raise LDMKitError(f"--n {args.n}: give at least one image (--n 1 or more).")


def prepare(args) -> tuple:
    """``(pipe, call keywords)``: the pipeline on its device in the preset's dtype (unless --dtype says),
    with the preset and --scheduler applied, and ``args.steps`` / ``args.dtype`` resolved for the metadata."""
    dtype = args.dtype or get_preset(args.preset).dtype
    pipe = load_pipeline(args.model, args.device, dtype, args.quiet)
    kwargs = apply_preset(pipe, args.preset)
    set_sampler(pipe, args.scheduler)  # an explicit --scheduler wins over the preset's
    args.steps = args.steps if args.steps is not None else kwargs.pop("num_inference_steps", DEFAULT_STEPS)
    kwargs.pop("num_inference_steps", None)
    args.dtype = DTYPE_NAMES.get(pipe.unet.dtype, str(pipe.unet.dtype))
    return pipe, {**kwargs, "num_inference_steps": args.steps, "eta": args.eta}


def run_metadata(args, command: str) -> dict:
    """What every image of ``command`` records for --from-png (and the version that made it)."""
    return {"command": command, "model": args.model, "steps": args.steps, "eta": args.eta,
            "scheduler": args.scheduler, "preset": args.preset, "dtype": args.dtype, "ldmkit_version": __version__}


def restore_options(args, command: str, keys: dict) -> dict:
    """Set the options the metadata of ``args.from_png`` records, each checked for its type (the file may have
    been edited); return the metadata. Refuses grids and images another command made."""
    path = args.from_png
    meta = read_png_metadata(path)
    made_by = meta.get("command", "txt2img" if "prompt" in meta else None)
    if made_by != command:
        fix = f"replay it with `ldmkit {made_by} --from-png {path}`" if made_by else "it cannot be replayed here"
        raise LDMKitError(f"{path} was not made by `ldmkit {command}`; {fix}.")
    if "seed" not in meta:
        raise LDMKitError(f"{path} is a grid (it has no single seed); replay one of the images in it instead.")
    for key, types in keys.items():
        value = meta.get(key)
        if key not in meta:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise LDMKitError(f"{path}: metadata {key}={value!r} should be "
                              f"{' or '.join(t.__name__ for t in types)}; fix or drop it.")
        setattr(args, key, value)
    args.n = 1
    return meta


def wrong_kind(pipe, model: str, wanted: str) -> LDMKitError:
    """The error for a model of the wrong kind, naming the command it is for."""
    name = type(pipe).__name__
    command = COMMAND_OF.get(name)
    fix = f"use `ldmkit {command}` with it" if command else "give another --model"
    return LDMKitError(f"{model} is a {name}, not {wanted}; {fix}.")


# ------------------------------------------------------------------------------------------- sample
def class_ids(pipe: LDMClassConditionalPipeline, specs: list[str], model: str) -> list[int]:
    """The ids of --class values: integer ids, or class names (ignoring case) when the model stores them."""
    n = pipe.class_embedder.config.n_classes
    labels = pipe.labels
    ids = []
    for spec in specs:
        if re.fullmatch(r"[+-]?\d+", spec.strip()):
            if not 0 <= int(spec) < n:
                raise LDMKitError(f"--class {spec}: the class ids of {model} go from 0 to {n - 1} ({n - 1} is the "
                                  "unconditional class); `ldmkit sample --list-classes` lists them.")
            ids.append(int(spec))
        elif not labels:
            raise LDMKitError(f"--class {spec!r}: {model} stores no class names (a converted CompVis model?); "
                              f"give a class id from 0 to {n - 2}.")
        else:
            try:
                ids.extend(pipe.get_label_ids(spec))
            except LDMKitError:
                raise LDMKitError(f"--class {spec!r} is not a class of {model}; {close_class_names(spec, list(labels))}"
                                  f" `ldmkit sample --list-classes` lists all {len(labels)}.") from None
    return ids


def list_classes(args) -> int:
    pipe = load_pipeline(args.model, "cpu", "fp32", quiet=True)
    if not isinstance(pipe, LDMClassConditionalPipeline):
        raise wrong_kind(pipe, args.model, "a class-conditional pipeline: it has no classes")
    n = pipe.class_embedder.config.n_classes
    if not pipe.labels:
        raise LDMKitError(f"{args.model} stores no class names (a converted CompVis model?); its classes are the ids "
                          f"0 to {n - 2}: give --class ID.")
    for name, i in sorted(pipe.labels.items(), key=lambda item: item[1]):
        print(f"{i} {name}")
    return 0


def check_kind(pipe, args) -> None:
    """--class and --guidance only for a class-conditional model, which needs --class."""
    if isinstance(pipe, LDMClassConditionalPipeline):
        if not args.classes:
            raise LDMKitError(f"{args.model} is class-conditional: give --class NAME or ID (repeatable); "
                              f"`ldmkit sample --list-classes --model {args.model}` lists them.")
    elif isinstance(pipe, LDMPipeline):
        if args.classes:
            raise LDMKitError(f"--class needs a class-conditional model, and {args.model} is unconditional; drop "
                              f"--class, or give --model {DEFAULT_CLASS} (the default with --class).")
        if args.guidance is not None:
            raise LDMKitError(f"--guidance needs a class-conditional model, and {args.model} is unconditional; "
                              "drop --guidance.")
    else:
        raise wrong_kind(pipe, args.model, "an unconditional or class-conditional pipeline")


def cmd_sample(args) -> int:
    if args.from_png:
        meta = restore_options(args, "sample", SAMPLE_KEYS)
        args.classes = None if meta.get("class_id") is None else [str(meta["class_id"])]
    args.model = args.model or (DEFAULT_CLASS if args.classes or args.list_classes else DEFAULT_UNCOND)
    if args.list_classes:
        return list_classes(args)
    check_count(args)
    out = output_folder(args.output)
    seeds = seeds_from(argparse.Namespace(seed=args.seed, n=args.n * len(args.classes or [None])))
    pipe, kwargs = prepare(args)
    check_kind(pipe, args)
    ids = class_ids(pipe, args.classes, args.model) if args.classes else [None]
    if ids[0] is None:
        images = pipe(batch_size=len(seeds), generator=generators(seeds), **kwargs).images
    else:
        args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
        labels = [i for i in ids for _ in range(args.n)]  # --n images of each class, class by class
        images = pipe(labels, guidance_scale=args.guidance, generator=generators(seeds), **kwargs).images
    names = {i: name for name, i in pipe.labels.items()} if ids[0] is not None else {}
    paths = []
    for k, (seed, image) in enumerate(zip(seeds, images)):
        class_id = ids[k // args.n]
        stem = "sample" if class_id is None else slug(names.get(class_id, f"class-{class_id}"))
        meta = {**run_metadata(args, "sample"), "seed": seed, "guidance": args.guidance, "class_id": class_id,
                "class_name": names.get(class_id)}
        paths.append(save_png(image, free_path(out, f"{stem}-{seed}", args.force), meta))
    if args.grid and len(images) > 1:
        grid = make_image_grid(images, rows=len(ids)) if len(ids) > 1 else make_image_grid(images)
        stem = "sample" if ids[0] is None else ("classes" if len(ids) > 1 else slug(names.get(ids[0], "class")))
        meta = {"command": "sample", "model": args.model, "seeds": seeds, "class_ids": ids}
        paths.append(save_png(grid, free_path(out, f"{stem}-grid", args.force), meta))
    for p in paths:
        print(p)
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="unconditional or class-conditional samples")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME|ID",
                   help=f"a class name or id (repeatable: --n images of each); uses --model {DEFAULT_CLASS} "
                        "unless --model says")
    p.add_argument("--list-classes", dest="list_classes", action="store_true",
                   help="print the model's class ids and names, one per line")
    p.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance scale for --class (default {DEFAULT_GUIDANCE}, as the cin256 "
                        "notebook; 1 = none)")
    p.add_argument("--model", help=f"pipeline folder, Hub id or bundled name (default: {DEFAULT_UNCOND}, or "
                                   f"{DEFAULT_CLASS} with --class)")
    add_run_options(p)
    p.set_defaults(func=cmd_sample)


__all__ = ["add_run_options", "add_sample_parser", "cmd_sample", "prepare", "restore_options", "run_metadata"]
