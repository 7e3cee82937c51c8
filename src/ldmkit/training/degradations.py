"""Low-resolution inputs for super-resolution training, made on the fly from the high-resolution crop.

``bicubic``: bicubic downsampling by ``scale`` (the LDM-SR model trained on OpenImages, Rombach et al.
2022, sec. 4.4). ``bsr``: the blind degradations the paper's second SR model used (after Zhang et al.
2021, BSRGAN, sec. 3): Gaussian blur with a random isotropic or anisotropic kernel, downsampling with a
random interpolation, additive Gaussian noise, JPEG compression; each step drawn from the sample's RNG.
"""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import LDMKitError

RESAMPLERS = (PIL.Image.BICUBIC, PIL.Image.BILINEAR, PIL.Image.BOX)


def degrade(image: PIL.Image.Image, scale: int, kind: str, rng: np.random.Generator) -> PIL.Image.Image:
    w, h = image.size
    if w % scale or h % scale:
        raise LDMKitError(f"The training crop ({w}x{h}) is not divisible by data.sr_scale={scale}; pick "
                          f"data.resolution as a multiple of {scale}.")
    size = (w // scale, h // scale)
    if kind == "bicubic":
        return image.resize(size, PIL.Image.BICUBIC)
    if kind == "bsr":
        return bsr_degrade(image, size, rng)
    raise LDMKitError(f"Unknown data.degradation {kind!r}; use 'bicubic' or 'bsr'.")


def bsr_degrade(image: PIL.Image.Image, size: tuple[int, int], rng: np.random.Generator) -> PIL.Image.Image:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if rng.random() < 0.9:
        x = blur(x, gaussian_kernel(rng))
    small = PIL.Image.fromarray(_to_uint8(x)).resize(size, RESAMPLERS[int(rng.integers(len(RESAMPLERS)))])
    y = np.asarray(small, dtype=np.float32) / 255.0
    if rng.random() < 0.9:
        sigma = rng.uniform(1, 25) / 255.0
        y = y + rng.normal(0.0, sigma, y.shape).astype(np.float32)
    small = PIL.Image.fromarray((np.clip(y, 0, 1) * 255).round().astype(np.uint8))
    if rng.random() < 0.9:
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
        small = PIL.Image.open(buffer).convert("RGB")
    return small


def gaussian_kernel(rng: np.random.Generator, size: int = 21) -> torch.Tensor:
    """A normalised 2-D Gaussian with random axis lengths in [0.1, 2.8] px and orientation (BSRGAN eq. 3)."""
    s1, s2 = rng.uniform(0.1, 2.8), rng.uniform(0.1, 2.8)
    if rng.random() < 0.5:  # isotropic
        s2 = s1
    theta = rng.uniform(0, math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv_cov = np.linalg.inv(rot @ np.diag([s1**2, s2**2]) @ rot.T)
    r = np.arange(size) - size // 2
    grid = np.stack(np.meshgrid(r, r, indexing="xy"), -1)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", grid, inv_cov, grid))
    return torch.from_numpy((k / k.sum()).astype(np.float32))


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect" if min(x.shape[1:]) > pad else "replicate")
    return F.conv2d(padded, kernel.expand(3, 1, *kernel.shape), groups=3)[0]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
