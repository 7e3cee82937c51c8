"""What class-conditional and inpainting LDM training add to ldm.py: the inputs of the two conditionings and
their sample grids.

Class conditioning (Rombach et al. 2022, sec. 4.1.1, cin256): ``tau(y)`` is a learned vector per class, a
one-token cross-attention context; the last class is the "null" class, trained in place of the label with
probability ``classes.class_dropout`` for classifier-free guidance (Ho & Salimans 2022).

Inpainting (sec. 4.5, CompVis inpainting_big): the UNet sees ``[z_t, E(masked image), mask]``, built exactly
as :class:`~ldmkit.pipelines.LDMInpaintPipeline` builds them at sampling time (scripts/inpaint.py): the image
in [0, 1] with the masked pixels set to 0, then both it and the mask mapped to [-1, 1]; the masked image
encoded by the frozen first stage (a VQ encoder's latent before quantization, a KL posterior's mode), unscaled;
the mask resized to the latent by nearest neighbour.
"""

from __future__ import annotations

import difflib

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import LDMKitError
from ..models import AutoencoderKL
from .data import crop_and_flip, load_rgb
from .masks import seeded_masks

# Grey fill for the hole in the inpainting grid's "input" row (what the model does not see).
HOLE_GREY = 0.5


def class_ids(names: list[str], class_names: list[str], count: int) -> list[int]:
    """The ids of ``names`` (``sampling.classes``), or of the first ``count`` classes when none are given."""
    if not names:
        return list(range(min(count, len(class_names))))
    ids = []
    for name in names:
        if name not in class_names:
            close = difflib.get_close_matches(name, class_names, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise LDMKitError(f"sampling.classes: {name!r} is not a class of the training data.{hint} "
                              f"The classes are: {', '.join(class_names)}.")
        ids.append(class_names.index(name))
    return ids


def drop_labels(labels: torch.Tensor, drop: torch.Tensor, null_class: int) -> torch.Tensor:
    """Replace the labels where ``drop`` by the null class (the pipeline's unconditional input)."""
    labels = labels.clone()
    labels[drop.to(labels.device)] = null_class
    return labels


def inpaint_condition(ae, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[E(masked image), mask at latent size]`` for images in [-1, 1] and masks in {0, 1} (1 = repaint)."""
    masks = masks.to(device=images.device, dtype=images.dtype)
    masked = (1 - masks) * (images + 1) / 2 * 2 - 1  # scripts/inpaint.py: masked pixels 0 in [0, 1]
    with torch.no_grad():
        encoded = ae.encode(masked)
        latent = encoded.latent_dist.mode() if isinstance(ae, AutoencoderKL) else encoded.latents
    return torch.cat([latent.float(), F.interpolate(masks.float() * 2 - 1, size=latent.shape[-2:])], dim=1)


def first_images(records, resolution: int, count: int) -> list[PIL.Image.Image]:
    """The first ``count`` readable training images, centre-cropped (a corrupt one must not stop the run)."""
    images = []
    for rec in records:
        try:
            images.append(crop_and_flip(load_rgb(rec.path), resolution, False, False, None))
        except Exception:  # noqa: BLE001
            continue
        if len(images) == count:
            break
    return images


def inpaint_grid(pipe, records, recipe, common: dict) -> tuple[list, int]:
    """Rows: the input with its hole grey, the inpainted output, the original; one column per image."""
    originals = first_images(records, recipe.data.resolution, recipe.sampling.num_images)
    masks = seeded_masks(recipe.seed, len(originals), recipe.data.resolution, recipe.masks)
    outputs = pipe(image=originals, mask_image=masks, **common).images
    holes = []
    for image, mask in zip(originals, masks):
        keep = (1 - mask[0].numpy())[..., None]
        pixels = np.asarray(image, dtype=np.float32) / 255.0 * keep + HOLE_GREY * (1 - keep)
        holes.append(PIL.Image.fromarray(np.round(pixels * 255).astype(np.uint8)))
    return holes + list(outputs) + originals, len(originals)


__all__ = ["class_ids", "drop_labels", "first_images", "inpaint_condition", "inpaint_grid"]
