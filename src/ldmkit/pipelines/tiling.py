"""Overlapping tiles blended with smooth weights, for images larger than memory allows in one piece.

A tile's contribution is weighted by a raised-cosine ramp over the overlap on every side that has a
neighbour (and flat on the image border); the sum is divided by the sum of the weights. Neighbouring
tiles therefore cross-fade smoothly, which hides seams (as the CompVis super-resolution notebook's
weighted latent patches do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with at least ``overlap`` overlap."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    # Spread the tiles evenly so the last one ends exactly at the border.
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def ramp(length: int, overlap: int, rise: bool, fall: bool, device=None) -> torch.Tensor:
    """1-D weights: a half-cosine rise over ``overlap`` samples at the start and/or end, 1 elsewhere."""
    w = torch.ones(length, device=device)
    n = min(overlap, length // 2)
    if n > 0:
        edge = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, device=device) + 0.5) / n)
        if rise:
            w[:n] = edge
        if fall:
            w[length - n:] = edge.flip(0)
    return w


def tiles(height: int, width: int, tile: int, overlap: int) -> Iterator[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of each tile, row by row."""
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            yield top, left, min(tile, height), min(tile, width)


def tile_weight(top, left, th, tw, height, width, overlap, device=None) -> torch.Tensor:
    rows = ramp(th, overlap, rise=top > 0, fall=top + th < height, device=device)
    cols = ramp(tw, overlap, rise=left > 0, fall=left + tw < width, device=device)
    return rows[:, None] * cols[None, :]


def blend_tiles(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int, tile: int,
                overlap: int, scale: int = 1) -> torch.Tensor:
    """Run ``fn(top, left, th, tw)`` on every tile of an ``height x width`` input and blend the outputs.

    ``fn`` returns a (N, C, th * scale, tw * scale) tensor; the result is (N, C, height * scale,
    width * scale). Only one tile's output is alive at a time besides the accumulators.
    """
    out = weights = None
    for top, left, th, tw in tiles(height, width, tile, overlap):
        piece = fn(top, left, th, tw)
        w = tile_weight(top * scale, left * scale, th * scale, tw * scale, height * scale, width * scale,
                        overlap * scale, device=piece.device).to(piece.dtype)
        if out is None:
            out = piece.new_zeros((*piece.shape[:2], height * scale, width * scale))
            weights = piece.new_zeros((height * scale, width * scale))
        ys, xs = slice(top * scale, (top + th) * scale), slice(left * scale, (left + tw) * scale)
        out[:, :, ys, xs] += piece * w
        weights[ys, xs] += w
    return out / weights
