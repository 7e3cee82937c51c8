"""Turning user images (PIL, numpy, torch; one or a list) into model tensors in [-1, 1]."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import PIL.Image
import torch

from ..errors import LDMKitError

logger = logging.getLogger("ldmkit")


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # what convert("RGB") would clip at 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _convert_warning(name: str, mode: str, how: str) -> None:
    warnings.warn(f"{name} is a PIL {mode!r} image; {how}. Convert it to RGB yourself to choose otherwise.",
                  UserWarning, stacklevel=4)


def high_bit_to_unit(image: PIL.Image.Image, name: str = "image") -> np.ndarray | None:
    """A 16-bit, 32-bit integer or float PIL image as an (H, W) float32 array in [0, 1], or None for the
    8-bit modes. PIL's own ``convert("RGB")`` clips these at 255 (a white image) or truncates ``F`` to 0/1.
    16-bit modes are read as 0-65535; ``I`` and ``F`` by the range their values show (a warning says which)."""
    if image.mode not in HIGH_BIT_MODES:
        return None
    array = np.asarray(image).astype(np.float64)
    if not np.isfinite(array).all():
        raise LDMKitError(f"{name} (PIL mode {image.mode!r}) contains NaN or infinite values.")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale = 1.0
    elif low >= 0 and high <= 255:
        scale = 255.0
    elif low >= 0 and high <= 65535:
        scale = 65535.0
    else:
        raise LDMKitError(f"{name} is a PIL {image.mode!r} image with values in [{low:.6g}, {high:.6g}], which is "
                          "no image range ldmkit can guess (0-1, 0-255 or 0-65535). Scale it to 0-255 and pass "
                          "image.convert('L') or an RGB image.")
    if image.mode != "F" or scale != 1.0:
        _convert_warning(name, image.mode, f"reading its values as 0-{scale:g}")
    return (array / scale).astype(np.float32)


def _pil_to_array(image: PIL.Image.Image, name: str) -> np.ndarray:
    gray = high_bit_to_unit(image, name)
    if gray is not None:
        return np.repeat(gray[..., None], 3, axis=-1)
    # Transparent pixels have arbitrary colours under them: composite onto white, as a viewer shows them.
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba)
    try:
        rgb = image.convert("RGB")
    except ValueError as e:  # modes PIL cannot turn into RGB
        raise LDMKitError(f"{name}: PIL cannot convert mode {image.mode!r} to RGB ({e}); convert the image to "
                          "RGB (or L) yourself first.") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _array_to_nhwc(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        check_unit_range(torch.from_numpy(array), name, "array")
    elif array.dtype == np.uint16:
        raise LDMKitError(f"{name}: a uint16 array is ambiguous here; pass (array / 65535).astype(np.float32) for "
                          "16-bit data, or a uint8 array.")
    else:
        raise LDMKitError(f"{name}: numpy arrays must be uint8 (0-255) or float (0-1), got {array.dtype}; pass "
                          "array.astype(np.uint8) for 0-255 data or array / array.max() as float.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise LDMKitError(f"{name}: expected an array (H, W), (H, W, C) or (N, H, W, C), got shape {array.shape}.")
    return array


def _fix_channels(nchw: torch.Tensor, name: str) -> torch.Tensor:
    c = nchw.shape[1]
    if c == 3:
        return nchw
    if c == 1:  # grayscale
        return nchw.expand(-1, 3, -1, -1)
    if c == 4:  # RGBA in [0, 1]: composite onto white
        rgb, alpha = nchw[:, :3], nchw[:, 3:]
        return rgb * alpha + (1 - alpha)
    raise LDMKitError(f"{name} has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA). "
                      "Convert it to RGB first.")


SIGNED_SLACK = 1e-3  # rounding of an image computed in [-1, 1] may step just past its ends


def check_unit_range(t: torch.Tensor, name: str, kind: str) -> None:
    """A float image read as [0, 1] must not go above 1: one in [0, 255] would be clamped to white."""
    if t.numel() and not torch.isfinite(t).all():
        raise LDMKitError(f"{name} contains NaN or infinite values.")
    high = float(t.max()) if t.numel() else 0.0
    if high > 1 + SIGNED_SLACK:
        raise LDMKitError(f"{name}: float {kind}s are read in [0, 1], but this one goes up to {high:.4g} (0-255 "
                          f"data?). Pass image / 255 for [0, 255], or a uint8 {kind} or a PIL image.")


def _tensor_to_nchw(image: torch.Tensor, name: str, signed: bool) -> torch.Tensor:
    t = image.detach()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise LDMKitError(f"{name}: expected a tensor (C, H, W) or (N, C, H, W), got shape {tuple(t.shape)}.")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.dtype.is_floating_point:
        small = t.numel() and not t.is_complex() and t.dtype != torch.bool and 0 <= int(t.min()) <= int(t.max()) <= 255
        fix = "image.to(torch.uint8)" if small else \
            f"a float tensor in {'[-1, 1]' if signed else '[0, 1]'}"
        raise LDMKitError(f"{name}: integer tensors must be uint8 (0-255) (or use a float tensor), got {t.dtype}; "
                          f"pass {fix}.")
    t = t.float()
    if not torch.isfinite(t).all():
        raise LDMKitError(f"{name} contains NaN or infinite values.")
    if signed:
        low, high = t.aminmax() if t.numel() else (0.0, 0.0)
        if low < -1 - SIGNED_SLACK or high > 1 + SIGNED_SLACK:
            raise LDMKitError(f"{name}: float tensors are read in [-1, 1] (diffusers' convention), but this one "
                              f"spans [{low:.3g}, {high:.3g}]. Pass image * 2 - 1 for an image in [0, 1], "
                              "image / 127.5 - 1 for [0, 255], or a uint8 tensor or a PIL image.")
        return (t + 1) / 2
    if t.numel() and t.min() < 0:
        logger.warning("%s has negative values: taking it as [-1, 1] rather than [0, 1].", name)
        t = (t + 1) / 2
    check_unit_range(t, name, "tensor")
    return t


def to_tensor(image, name: str = "image", signed: bool = False) -> torch.Tensor:
    """One image or batch -> float tensor (N, 3, H, W) in [0, 1].

    PIL images and uint8 arrays or tensors are 0-255; float numpy arrays are [0, 1]. Float tensors are
    (C, H, W) or (N, C, H, W): with ``signed`` (super-resolution, as diffusers' pipeline) in [-1, 1], and an
    error outside it; otherwise in [0, 1], where one with negative values is taken as [-1, 1] with a warning
    (as diffusers' image processor).
    """
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise LDMKitError(f"{name} is empty (0 pixels).")
        t = torch.from_numpy(_pil_to_array(image, name)).permute(2, 0, 1)[None]
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(_array_to_nhwc(image, name)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        t = _tensor_to_nchw(image, name, signed)
    else:
        raise LDMKitError(f"{name} must be a PIL image, a numpy array or a torch tensor "
                          f"(or a list of them), got {type(image).__name__}.")
    if t.shape[0] == 0 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise LDMKitError(f"{name} is empty: shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise LDMKitError(f"{name} contains NaN or infinite values.")
    return _fix_channels(t, name).clamp(0, 1).contiguous()


def to_tensor_groups(images, name: str = "image", signed: bool = False) -> list[tuple[list[int], torch.Tensor]]:
    """One image, a batch, or a list of images -> ``[(indices, batch), ...]`` with one batch per size.

    Images of the same size are batched together; a list of mixed sizes is processed one size at a time,
    and ``indices`` say where each result goes in the input order.
    """
    if not isinstance(images, list | tuple):
        batch = to_tensor(images, name, signed)
        return [(list(range(batch.shape[0])), batch)]
    if not images:
        raise LDMKitError(f"{name} is an empty list: give at least one image.")
    tensors = [to_tensor(im, f"{name}[{i}]", signed) for i, im in enumerate(images)]
    groups: dict[tuple[int, int], list[int]] = {}
    offsets, count = [], 0
    for t in tensors:
        offsets.append(list(range(count, count + t.shape[0])))
        count += t.shape[0]
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    return [([j for i in members for j in offsets[i]], torch.cat([tensors[i] for i in members]))
            for members in groups.values()]
