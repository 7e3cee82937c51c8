"""diffusers' everyday image helpers under the same names: ``from ldmkit.utils import load_image, make_image_grid``."""

from __future__ import annotations

import io
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import PIL.Image
import PIL.ImageOps

from .errors import LDMKitError

URL_TIMEOUT_S = 30


def load_image(image: str | os.PathLike | PIL.Image.Image,
               convert_method: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None) -> PIL.Image.Image:
    """A PIL image from a path, an http(s) URL or a PIL image, turned upright by its EXIF orientation (as
    cameras save them) and converted to RGB, or by ``convert_method(image)`` when given."""
    if isinstance(image, PIL.Image.Image):
        opened = image
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        opened = _open(_download(image), image)
    elif isinstance(image, str | os.PathLike) and os.path.isfile(image):
        with open(image, "rb") as f:
            opened = _open(f.read(), str(image))
    else:
        raise LDMKitError(f"load_image: {image!r} is neither an existing file, an http(s) URL nor a PIL image; "
                          "check the path.")
    opened = PIL.ImageOps.exif_transpose(opened)
    return convert_method(opened) if convert_method is not None else opened.convert("RGB")


def _download(url: str) -> bytes:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise LDMKitError(f"load_image: {url} needs the network, but HF_HUB_OFFLINE is set; download the image "
                          "and pass its path.")
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (http(s) only, above)
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise LDMKitError(f"load_image: could not download {url} ({exc}); check the address and the network, "
                          "or pass a local path.") from None


def _open(data: bytes, name: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated file fails here and not later
    except PIL.Image.DecompressionBombError as exc:
        raise LDMKitError(f"load_image: {name} is too large to decode safely ({exc}).") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise LDMKitError(f"load_image: {name} is not a readable image ({exc}).") from None
    return image


def make_image_grid(images: Sequence[PIL.Image.Image], rows: int | None = None, cols: int | None = None,
                    resize: int | None = None) -> PIL.Image.Image:
    """Paste ``images`` row by row into one RGB sheet of ``rows`` x ``cols`` cells (the size of the first
    image, or ``resize`` x ``resize``). As diffusers, ``rows`` and ``cols`` together must hold exactly the
    images; give only one of them (or neither: up to 4 per row) for a last row that may be partial (white)."""
    images = list(images)
    if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
        raise LDMKitError("make_image_grid needs a non-empty list of PIL images.")
    if rows is not None and cols is not None and rows * cols != len(images):
        raise LDMKitError(f"make_image_grid: {rows} rows x {cols} columns hold {rows * cols} images, not "
                          f"{len(images)}; give matching rows and cols, or only one of them.")
    for name, value in (("rows", rows), ("cols", cols), ("resize", resize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LDMKitError(f"make_image_grid: {name} must be a positive integer, got {value!r}.")
    cols = cols or (math.ceil(len(images) / rows) if rows else min(len(images), 4))
    rows = math.ceil(len(images) / cols)
    size = (resize, resize) if resize else images[0].size
    sheet = PIL.Image.new("RGB", (cols * size[0], rows * size[1]), "white")
    for i, image in enumerate(images):
        cell = image.convert("RGB")
        cell = cell if cell.size == size else cell.resize(size)
        sheet.paste(cell, ((i % cols) * size[0], (i // cols) * size[1]))
    return sheet
