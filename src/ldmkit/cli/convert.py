"""``ldmkit convert model.ckpt --config config.yaml -o DIR [--use-ema | --no-ema]``: an original CompVis
checkpoint as a pipeline folder in the diffusers layout (then ``DiffusionPipeline.from_pretrained(DIR)``).

``ldmkit convert PIPELINE_DIR -o DIR --dtype fp16`` re-saves a pipeline folder (a training export, say) in
another dtype: how the bundled models were made from their fp32 training exports."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LDMKitError
from ..io import atomic_folder
from ..pipelines import DiffusionPipeline


def add_convert_parser(subparsers) -> None:
    """Register ``convert`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "convert", help="convert an original CompVis checkpoint (.ckpt + config.yaml) to a pipeline folder",
        description="Write an original CompVis latent-diffusion checkpoint (text-to-image, super-resolution, "
                    "unconditional, class-conditional, inpainting) as a pipeline folder in the diffusers layout.")
    p.add_argument("checkpoint", help="model.ckpt, .safetensors or a bare state-dict pickle; or a pipeline folder "
                                      "to re-save in another --dtype")
    p.add_argument("--config", "-c", help="the checkpoint's config.yaml (not for a pipeline folder)")
    p.add_argument("-o", "--output", required=True, help="the folder to write (must not exist or be empty)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="use the EMA weights (an error if the checkpoint has none). Default: the EMA weights "
                          "when the config enables EMA and the file has them, as the original scripts")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                     help="use the live weights even if EMA weights exist")
    p.add_argument("--tokenizer", help="text-to-image: folder with BERT's vocab.txt (default: bert-base-uncased)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing pipeline folder")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert, writing to a temporary folder beside the output and renaming it at the end, so a failure,
    Ctrl-C or SIGTERM leaves no half-written pipeline (``atomic_folder``)."""
    out = Path(args.output).expanduser()
    _check_output(out, args.force)
    source = Path(args.checkpoint).expanduser()
    if source.is_dir():
        if args.config is not None or args.use_ema is not None or args.tokenizer is not None:
            raise LDMKitError(f"{source} is a pipeline folder: --config, --use-ema/--no-ema and --tokenizer are for "
                              "original .ckpt files. Drop them (a folder is only re-saved, e.g. with --dtype fp16).")
        if source.resolve() == out.resolve():
            raise LDMKitError("the output folder is the input folder; write to a new folder.")
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=args.dtype)
    else:
        if args.config is None:
            raise LDMKitError(f"{source} is a checkpoint file: give its config.yaml with --config (the original "
                              "repository's configs/latent-diffusion/*.yaml or the one beside the checkpoint).")
        pipe = DiffusionPipeline.from_single_file(args.checkpoint, config=args.config, use_ema=args.use_ema,
                                                  torch_dtype=args.dtype, tokenizer=args.tokenizer)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp)
    print(f"{out}  ({type(pipe).__name__}; load with DiffusionPipeline.from_pretrained({str(out)!r}))")
    return 0


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LDMKitError(f"{out} exists and is a file; choose a folder for the converted pipeline.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise LDMKitError(f"{out} exists and is not empty; choose a new folder or pass --force to replace it.")
        if not (out / "model_index.json").is_file():
            raise LDMKitError(f"{out} is not a pipeline folder (no model_index.json); --force only replaces a "
                              "pipeline folder. Choose a new or empty folder.")
