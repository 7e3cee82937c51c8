"""Argument checks shared by every pipeline: one place per kind of argument, each error naming the fix."""

from __future__ import annotations

import math

import torch

from ..errors import LDMKitError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_positive_int(name: str, value) -> int:
    # bool is an int subclass: True would silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LDMKitError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_non_negative(name: str, value, meaning: str):
    """A finite number >= 0 (NaN or inf would silently give all-NaN images); returned unchanged."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    # A string would pass float() here and fail later in arithmetic ('1' > 1); bool would mean 0 / 1.
    if isinstance(value, bool | str | bytes) or not math.isfinite(number) or number < 0:
        raise LDMKitError(f"{name} must be a finite number >= 0 ({meaning}), got {value!r}.")
    return value


def check_generator(generator) -> None:
    """None, a torch.Generator, or a non-empty list of them (a seed alone is not a generator)."""
    items = generator if isinstance(generator, list | tuple) else [generator]
    if generator is None or (items and all(isinstance(g, torch.Generator) for g in items)):
        return
    seed = f"torch.Generator().manual_seed({generator})" if isinstance(generator, int) else \
        "torch.Generator().manual_seed(SEED)"
    raise LDMKitError(f"generator must be a torch.Generator or a list of them, got {generator!r}; for a seed "
                      f"pass {seed}.")


def check_image_size(name: str, value, factor: int) -> int:
    """A height or width in pixels: a positive integer multiple of the first stage's ``factor``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LDMKitError(f"{name} must be an integer number of pixels, got {value!r} ({type(value).__name__}).")
    if value <= 0 or value % factor:
        raise LDMKitError(f"height and width must be positive multiples of {factor}, got {name}={value}; try "
                          f"{name}={max(factor, round(value / factor) * factor)}.")
    return value


def check_output_type(output_type: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> None:
    if output_type not in allowed:
        raise LDMKitError(f"output_type={output_type!r} is not supported; use one of {', '.join(allowed)}.")


def check_latents(latents, shape: tuple, layout: str, device, dtype) -> torch.Tensor:
    """The caller's ``x_T``: a finite float tensor of exactly ``shape`` (``layout`` names its axes)."""
    if not isinstance(latents, torch.Tensor):
        raise LDMKitError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}.")
    if tuple(latents.shape) != tuple(shape):
        raise LDMKitError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} {layout}.")
    if not latents.dtype.is_floating_point:
        raise LDMKitError(f"latents must be floating point, got {latents.dtype}.")
    if not torch.isfinite(latents).all():
        raise LDMKitError("latents contain NaN or infinite values.")
    return latents.to(device=device, dtype=dtype)  # None: keep it where and as it is
