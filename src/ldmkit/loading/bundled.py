"""Models shipped inside the package, loadable offline by name: ``ldmkit:emoji-text2img``,
``ldmkit:emoji-superres-4x``, ``ldmkit:emoji-uncond``, ``ldmkit:emoji-class`` and ``ldmkit:emoji-inpaint``.

The ``ldmkit:`` prefix holds a colon, which no Hub id (``owner/name``) and no sensible relative path contains,
so a bundled name can never be sent to the Hub or mistaken for a folder, and a Hub id never lands here.
The folders are ordinary diffusers-layout pipelines (``src/ldmkit/bundled/NAME``), so diffusers loads them
too. How they were trained: recipes/emoji-*.yaml and the README.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LDMKitError

PREFIX = "ldmkit:"
ROOT = Path(__file__).resolve().parent.parent / "bundled"
BUNDLED = {
    "emoji-text2img": "text-to-image LDM trained on the 32x32 Noto emoji and their CLDR names",
    "emoji-superres-4x": "4x super-resolution LDM trained on the Noto emoji (32x32 -> 128x128)",
    "emoji-uncond": "unconditional LDM trained on the 32x32 Noto emoji",
    "emoji-class": "class-conditional LDM trained on the 32x32 Noto emoji, one class per Unicode emoji subgroup "
                   "(ldmkit sample --list-classes)",
    "emoji-inpaint": "inpainting LDM trained on the 32x32 Noto emoji with random strokes and boxes as masks",
}
DEFAULT_TEXT2IMG = PREFIX + "emoji-text2img"
DEFAULT_SUPERRES = PREFIX + "emoji-superres-4x"
DEFAULT_UNCOND = PREFIX + "emoji-uncond"
DEFAULT_CLASS = PREFIX + "emoji-class"
DEFAULT_INPAINT = PREFIX + "emoji-inpaint"


def is_bundled_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def bundled_folder(name: str) -> Path:
    """The folder of the bundled model ``ldmkit:NAME``; a clear error for an unknown or missing one."""
    key = name[len(PREFIX):]
    if key not in BUNDLED:
        known = ", ".join(PREFIX + k for k in BUNDLED)
        raise LDMKitError(f"{name!r} is not a bundled model; the bundled models are {known}.")
    folder = ROOT / key
    if not (folder / "model_index.json").is_file():
        raise LDMKitError(f"The bundled model {name} is missing from this installation ({folder}). Reinstall "
                          "ldmkit from a source tree that has src/ldmkit/bundled/.")
    return folder


def local_name(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A bundled name becomes its folder; anything else passes through unchanged."""
    return bundled_folder(name_or_path) if is_bundled_name(name_or_path) else name_or_path


__all__ = ["BUNDLED", "DEFAULT_CLASS", "DEFAULT_INPAINT", "DEFAULT_SUPERRES", "DEFAULT_TEXT2IMG", "DEFAULT_UNCOND",
           "bundled_folder", "is_bundled_name", "local_name"]
