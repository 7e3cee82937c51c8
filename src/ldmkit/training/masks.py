"""Random inpainting masks for training: LaMa's "thick" strokes and boxes (Suvorov et al. 2022, sec. 3.4 and
their configs ``random_thick_256``), which the LDM paper uses for its inpainting models (Rombach et al. 2022,
sec. 4.5: "we generate synthetic masks following the protocol in LaMa").

LaMa's mixed generator picks one kind per image (strokes or boxes) and draws 1 to ``max_times`` of them. Its
sizes are pixels at 256 x 256; here they are scaled to the image side (times ``MaskConfig.size``), so a 32 x 32
emoji gets holes of the same share of the picture. A mask is 1 where the image is to be repainted.

Every draw comes from a numpy generator per sample and step (:meth:`StepRandom.generator`), so a resumed or
distributed run draws the masks of an uninterrupted one-process run.
"""

from __future__ import annotations

import numpy as np
import torch

from .recipe import MaskConfig
from .step_random import StepRandom

REFERENCE_SIDE = 256  # LaMa's sizes below are for 256 x 256 images
# random_thick_256: irregular (max_angle 4, max_len 200, max_width 100, 1-5 times), box (margin 10, sizes
# 30-150, 1-3 times); LaMa adds 10 to every stroke length and 5 to every width.
STROKE_MAX_ANGLE = 4
STROKE_MAX_LEN, STROKE_MIN_LEN = 200, 10
STROKE_MAX_WIDTH, STROKE_MIN_WIDTH = 100, 5
BOX_MARGIN, BOX_MIN, BOX_MAX = 10, 30, 150


def _px(value: float, side: int, scale: float) -> int:
    return max(1, int(round(value * side / REFERENCE_SIDE * scale)))


def _segment(mask: np.ndarray, start: tuple[float, float], end: tuple[float, float], width: float) -> None:
    """Paint a thick line (a capsule: every pixel centre within width / 2 of the segment), as cv2.line does."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.zeros_like(xs) if length2 == 0 else np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0.0, 1.0)
    dist2 = (xs - (x0 + t * dx)) ** 2 + (ys - (y0 + t * dy)) ** 2
    mask[dist2 <= (width / 2.0) ** 2] = 1.0


def stroke_mask(rng: np.random.Generator, side: int, scale: float = 1.0, max_times: int = 5) -> np.ndarray:
    """LaMa's ``make_random_irregular_mask``: 1 to ``max_times`` polylines of 1-5 thick segments."""
    mask = np.zeros((side, side), np.float32)
    max_len, max_width = _px(STROKE_MAX_LEN, side, scale), _px(STROKE_MAX_WIDTH, side, scale)
    min_len, min_width = _px(STROKE_MIN_LEN, side, scale), _px(STROKE_MIN_WIDTH, side, scale)
    for i in range(int(rng.integers(1, max_times + 1))):
        x, y = float(rng.integers(side)), float(rng.integers(side))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(STROKE_MAX_ANGLE))
            if i % 2 == 0:
                angle = 2 * np.pi - angle
            length = min_len + int(rng.integers(max_len))
            width = min_width + int(rng.integers(max_width))
            end = (float(np.clip(int(x + length * np.sin(angle)), 0, side)),
                   float(np.clip(int(y + length * np.cos(angle)), 0, side)))
            _segment(mask, (x, y), end, width)
            x, y = end
    return mask


def box_mask(rng: np.random.Generator, side: int, scale: float = 1.0, max_times: int = 3) -> np.ndarray:
    """LaMa's ``make_random_rectangle_mask``: 1 to ``max_times`` axis-aligned boxes inside a margin."""
    mask = np.zeros((side, side), np.float32)
    margin = _px(BOX_MARGIN, side, 1.0)
    low = min(_px(BOX_MIN, side, scale), side - 2 * margin - 1)
    high = max(low + 1, min(_px(BOX_MAX, side, scale), side - 2 * margin))
    for _ in range(int(rng.integers(1, max_times + 1))):
        bw, bh = int(rng.integers(low, high)), int(rng.integers(low, high))
        x0 = int(rng.integers(margin, side - margin - bw + 1))
        y0 = int(rng.integers(margin, side - margin - bh + 1))
        mask[y0:y0 + bh, x0:x0 + bw] = 1.0
    return mask


def random_mask(rng: np.random.Generator, side: int, cfg: MaskConfig) -> np.ndarray:
    """One (side, side) float mask in {0, 1}: boxes with probability ``cfg.box_probability``, else strokes."""
    if rng.random() < cfg.box_probability:
        return box_mask(rng, side, cfg.size, cfg.max_boxes)
    return stroke_mask(rng, side, cfg.size, cfg.max_strokes)


def step_masks(rand: StepRandom, rows: torch.Tensor, side: int, cfg: MaskConfig, device=None,
               stream: str = "masks") -> torch.Tensor:
    """The masks (len(rows), 1, side, side) of one step's samples at global ``rows``."""
    masks = [random_mask(rand.generator(stream, int(r)), side, cfg) for r in rows]
    return torch.from_numpy(np.stack(masks)[:, None]).to(device)


def seeded_masks(seed: int, count: int, side: int, cfg: MaskConfig | None = None) -> torch.Tensor:
    """``count`` fixed masks for a seed (training grids, benchmarks), from a stream training never draws."""
    return step_masks(StepRandom(seed, 0, count), torch.arange(count), side, cfg or MaskConfig(),
                      stream="fixed_masks")


__all__ = ["box_mask", "random_mask", "seeded_masks", "step_masks", "stroke_mask"]
