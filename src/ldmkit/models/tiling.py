"""Overlapping tiles blended with smooth weights, for images larger than memory allows in one piece.

A tile's contribution is weighted by a raised-cosine ramp over the overlap on every side that has a
neighbour (and flat on the image border); the sum is divided by the sum of the weights. Neighbouring
tiles therefore cross-fade smoothly, which hides seams (as the CompVis super-resolution notebook's
weighted latent patches do).

The autoencoders' ``enable_tiling`` (diffusers' switch) and the super-resolution pipeline's tiles both use
:func:`blend_tiles`; :class:`AutoencoderTilingMixin` holds the autoencoders' switches and tile sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..errors import LDMKitError


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


class AutoencoderTilingMixin:
    """diffusers' autoencoder memory switches, for a model with ``config.sample_size`` and
    ``config.block_out_channels``.

    ``enable_tiling()``: images wider or taller than ``tile_sample_min_size`` pixels are encoded, and latents
    larger than ``tile_latent_min_size`` are decoded, in tiles that overlap by ``tile_overlap_factor`` of a
    tile and are cross-faded with :func:`blend_tiles`: memory follows the tile, not the image. The result is
    close to the untiled one, not equal: a tile does not see past its border (and a mid-block attention
    only attends within its tile). diffusers blends linearly and crops; the numbers differ from its tiles.
    ``enable_slicing()``: a batch is encoded and decoded one sample at a time (exact).
    """

    use_tiling = False
    use_slicing = False
    tile_overlap_factor = 0.25

    def enable_tiling(self, use_tiling: bool = True) -> None:
        self.use_tiling = bool(use_tiling)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode / decode one sample at a time: lower peak memory for large batches, same numbers."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @property
    def _tiling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def tile_sample_min_size(self) -> int:
        """Side of an encoder tile in pixels; default the config's ``sample_size`` (as diffusers)."""
        size = getattr(self, "_tile_sample_size", None) or self.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @tile_sample_min_size.setter
    def tile_sample_min_size(self, value: int) -> None:
        if not isinstance(value, int) or value < self._tiling_factor or value % self._tiling_factor:
            raise LDMKitError(f"tile_sample_min_size must be a positive multiple of the downsampling factor "
                              f"{self._tiling_factor}, got {value!r}.")
        self._tile_sample_size = value

    @property
    def tile_latent_min_size(self) -> int:
        """Side of a decoder tile in latent pixels; default ``tile_sample_min_size`` / the factor."""
        return getattr(self, "_tile_latent_size", None) or self.tile_sample_min_size // self._tiling_factor

    @tile_latent_min_size.setter
    def tile_latent_min_size(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise LDMKitError(f"tile_latent_min_size must be a positive int, got {value!r}.")
        self._tile_latent_size = value

    def _over_tiles(self, inputs: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int,
                    in_scale: int, out_scale: int) -> torch.Tensor:
        """``fn`` on the whole input, or (tiling on and the input larger than ``tile`` latent pixels on a
        side) on overlapping tiles of the latent grid, blended. A latent pixel is ``in_scale`` input pixels
        and ``out_scale`` output pixels (encode: f and 1; decode: 1 and f)."""
        height, width = inputs.shape[-2] // in_scale, inputs.shape[-1] // in_scale
        if not self.use_tiling or (height <= tile and width <= tile):
            return fn(inputs)
        if not 0 <= self.tile_overlap_factor < 1:
            raise LDMKitError(f"tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor!r}.")
        overlap = int(tile * self.tile_overlap_factor)

        def run(top: int, left: int, th: int, tw: int) -> torch.Tensor:
            rows = slice(top * in_scale, (top + th) * in_scale)
            return fn(inputs[:, :, rows, left * in_scale:(left + tw) * in_scale])

        return blend_tiles(run, height, width, tile, overlap, scale=out_scale)

    def _encode_tiled(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self._over_tiles(images, fn, self.tile_sample_min_size // self._tiling_factor,
                                self._tiling_factor, 1)

    def _decode_tiled(self, latents: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self._over_tiles(latents, fn, self.tile_latent_min_size, 1, self._tiling_factor)


def per_sample(inputs: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], enabled: bool) -> torch.Tensor:
    """``fn(inputs)``, or (``enabled`` and a batch of more than one) ``fn`` on one sample at a time."""
    if enabled and inputs.shape[0] > 1:
        return torch.cat([fn(part) for part in inputs.split(1)])
    return fn(inputs)
