"""``ldmkit inpaint IMAGE (--mask FILE | --box x0,y0,x1,y1)``: CompVis scripts/inpaint.py from a terminal.

White (>= 50 % gray) in the mask is repainted, as in the original script. The result is composited with the
original outside the mask here, in 8 bits: the kept pixels are the input's, exactly, whatever the dtype.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import LDMKitError
from ..io import sha256_file
from ..loading.bundled import DEFAULT_INPAINT
from ..pipelines import LDMInpaintPipeline
from ..pipelines.image_processing import high_bit_to_unit, to_tensor
from ..utils import load_image, make_image_grid
from .generate import free_path, generators, output_folder, save_png, seeds_from, slug
from .sample import add_run_options, check_count, prepare, restore_options, run_metadata, wrong_kind

# inpaint --from-png: the options an image's metadata restores, with the types they must have.
INPAINT_KEYS = {"model": (str,), "image": (str,), "mask": (str, type(None)), "box": (str, type(None)),
                "prompt": (str, type(None)), "seed": (int,), "steps": (int,), "eta": (int, float),
                "scheduler": (str, type(None)), "preset": (str,), "dtype": (str,)}
HOLE_GRAY = 128  # how the grid's first tile shows the part to repaint


def read_rgb(path: str) -> np.ndarray:
    """The image as (H, W, 3) uint8, read as the pipeline reads it (alpha composited onto white)."""
    image = load_image(path, convert_method=lambda im: im)
    return (to_tensor(image, path)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def read_mask(path: str, size: tuple[int, int], image_path: str) -> np.ndarray:
    """The mask file as (H, W) bools (True = repaint): gray >= 0.5, as LDMInpaintPipeline thresholds it."""
    mask = load_image(path, convert_method=lambda im: im)
    if mask.size != size:
        w, h = size
        raise LDMKitError(f"--mask {path} is {mask.width}x{mask.height} but {image_path} is {w}x{h}; the mask must "
                          f"have the image's size: resize it to {w}x{h} (nearest neighbour) or give --box instead.")
    gray = high_bit_to_unit(mask, "--mask")
    gray = gray if gray is not None else np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return gray >= 0.5


def box_mask(box: str, size: tuple[int, int]) -> np.ndarray:
    """--box x0,y0,x1,y1 as a mask: the pixels x0 <= x < x1, y0 <= y < y1 (PIL's box convention)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise LDMKitError(f"--box {box}: give four integer pixel coordinates x0,y0,x1,y1, e.g. --box 8,8,24,24."
                          ) from None
    w, h = size
    if not (x0 < x1 and y0 < y1):
        raise LDMKitError(f"--box {box}: need x0 < x1 and y0 < y1 (x1, y1 are the right and bottom edges).")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise LDMKitError(f"--box {box} reaches outside the {w}x{h} image; x goes from 0 to {w} and y from 0 to "
                          f"{h}.")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def check_coverage(mask: np.ndarray, source: str) -> None:
    if not mask.any():
        raise LDMKitError(f"{source} marks no pixel: nothing to inpaint (white, or gray >= 50 %, is repainted).")
    if mask.all():
        raise LDMKitError(f"{source} covers the whole image, so nothing of it is kept; for a new image use "
                          "`ldmkit sample`.")


def check_sources(args, meta: dict) -> None:
    """A replay needs the same input files: refuse missing or changed ones (the pixels would differ)."""
    for key in ("image", "mask"):
        path, digest = meta.get(key), meta.get(f"{key}_sha256")
        if path is None:
            continue
        if not Path(path).is_file():
            raise LDMKitError(f"{args.from_png} was made from {path}, which is gone; put it back to replay.")
        if digest is not None and sha256_file(path) != digest:
            raise LDMKitError(f"{path} changed since {args.from_png} was made from it; the replay would differ.")


def inputs(args) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit RGB image and its mask (True = repaint), checked."""
    if not args.image:
        raise LDMKitError("give an image: ldmkit inpaint IMAGE --mask FILE (or --box x0,y0,x1,y1).")
    if (args.mask is None) == (args.box is None):
        raise LDMKitError("give --mask FILE (white = repaint) or --box x0,y0,x1,y1, not both and not neither.")
    image = read_rgb(args.image)
    size = (image.shape[1], image.shape[0])
    mask = read_mask(args.mask, size, args.image) if args.mask else box_mask(args.box, size)
    check_coverage(mask, f"--mask {args.mask}" if args.mask else f"--box {args.box}")
    return image, mask


def cmd_inpaint(args) -> int:
    if args.from_png:
        check_sources(args, restore_options(args, "inpaint", INPAINT_KEYS))
    image, mask = inputs(args)
    check_count(args)
    out = output_folder(args.output)
    seeds = seeds_from(args)
    pipe, kwargs = prepare(args)
    if not isinstance(pipe, LDMInpaintPipeline):
        raise wrong_kind(pipe, args.model, "an inpainting pipeline")
    if args.prompt is not None:
        if "prompt" not in inspect.signature(pipe.__call__).parameters:
            raise LDMKitError(f"{args.model} is not text-conditioned ({type(pipe).__name__} takes no prompt); drop "
                              "--prompt.")
        kwargs["prompt"] = args.prompt
    original = PIL.Image.fromarray(image)
    results = pipe([original] * len(seeds), mask.astype(np.uint8) * 255, generator=generators(seeds),
                   output_type="np", **kwargs).images
    # The pipeline composites in floats; doing it again on the 8-bit pixels keeps the input exactly there.
    keep = ~mask[..., None]
    images = [PIL.Image.fromarray(np.where(keep, image, (r * 255).round().clip(0, 255).astype(np.uint8)))
              for r in results]
    sources = {"image": str(Path(args.image).resolve()), "image_sha256": sha256_file(args.image),
               "mask": str(Path(args.mask).resolve()) if args.mask else None,
               "mask_sha256": sha256_file(args.mask) if args.mask else None, "box": args.box, "prompt": args.prompt}
    stem = slug(Path(args.image).stem)
    paths = [save_png(im, free_path(out, f"{stem}-inpaint-{s}", args.force),
                      {**run_metadata(args, "inpaint"), **sources, "seed": s}) for s, im in zip(seeds, images)]
    if args.grid and len(images) > 1:
        hole = PIL.Image.fromarray(np.where(keep, image, np.uint8(HOLE_GRAY)))
        meta = {"command": "inpaint", "model": args.model, "seeds": seeds, **sources}
        paths.append(save_png(make_image_grid([hole, *images]), free_path(out, f"{stem}-inpaint-grid", args.force),
                              meta))
    for p in paths:
        print(p)
    return 0


def add_inpaint_parser(sub) -> None:
    p = sub.add_parser("inpaint", help="repaint the masked part of an image, keep the rest")
    p.add_argument("image", nargs="?", help="the image (its size must suit the model: 32x32 for the bundled one)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--mask", help="mask image of the same size: white (gray >= 50 %%) = repaint, black = keep")
    how.add_argument("--box", metavar="x0,y0,x1,y1", help="repaint this rectangle (pixels x0 <= x < x1, y0 <= y < y1)")
    p.add_argument("--prompt", help="text, for an inpainting model that takes one (the bundled one does not)")
    p.add_argument("--model", default=DEFAULT_INPAINT,
                   help=f"inpainting pipeline folder, Hub id or bundled name (default: {DEFAULT_INPAINT})")
    add_run_options(p)
    p.set_defaults(func=cmd_inpaint)


__all__ = ["add_inpaint_parser", "box_mask", "cmd_inpaint", "read_mask"]
