"""Uploaded images decoded under limits (format, truncation, decompression bombs), and results written as PNGs
with their replay metadata, atomically, only inside the server's output folder."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..io import atomic_path
from .errors import bad_request, too_large

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png$")
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_upload(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """An uploaded file as a loaded PIL image. The header's size is checked before any pixel is decoded (a
    decompression bomb is refused without being expanded); a non-image or truncated file is a 400."""
    if not data:
        raise bad_request(f"'{param}' is empty: upload a PNG, JPEG or WebP image.", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise too_large(f"'{param}' is {width}x{height} = {width * height} pixels; this server decodes at "
                                f"most {max_pixels} (--max-upload-pixels). Send a smaller image.", param)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(f"'{param}' declares more pixels than this server decodes (--max-upload-pixels "
                        f"{max_pixels}); send a smaller image.", param) from None
    except UnidentifiedImageError as e:
        raise bad_request(f"'{param}' is not a PNG, JPEG or WebP image this server can read ({type(e).__name__}).",
                          param, "invalid_image") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise bad_request(f"'{param}' could not be decoded ({e}); upload a complete PNG, JPEG or WebP file.",
                          param, "invalid_image") from None
    return image


def png_bytes(image: Image.Image, metadata: dict) -> bytes:
    """The PNG, with ``metadata`` as JSON in a text chunk named "ldmkit" (as ``ldmkit txt2img`` writes it)."""
    info = PngInfo()
    info.add_text("ldmkit", json.dumps({**metadata, "ldmkit_version": __version__}, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(folder: Path, job_id: str, index: int, seed: int, data: bytes) -> str:
    """Write ``data`` atomically as ``<job>-<index>-<seed>.png`` in ``folder``; the file name (for /files)."""
    name = f"{job_id}-{index}-{seed}.png"
    with atomic_path(folder / name) as tmp:
        tmp.write_bytes(data)
    return name


def output_file(folder: Path, name: str) -> Path | None:
    """The file ``name`` of the output folder, or None: only plain names the server writes (no separators,
    no ``..``), resolved and checked to lie directly in the folder (symlinks included)."""
    if not SAFE_NAME.match(name) or ".." in name:
        return None
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        return None
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_job_id() -> str:
    """Unguessable (122 random bits): the id also names the job's files under /files."""
    return "job_" + uuid.uuid4().hex
