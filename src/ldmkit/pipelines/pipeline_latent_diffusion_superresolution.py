"""4x super-resolution LDM (Rombach et al. 2022, Sec. 4.4): the low-res image is concatenated to the
noisy latent at every step, and the VQ decoder brings the latent to 4x the input size."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LDMKitError
from ..models import AutoencoderKL, UNet2DModel, VQModel
from .checks import check_output_type, check_positive_int
from .denoising import Sampling, legacy_callback
from .image_processing import to_tensor_groups
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, convert_images
from .tiling import blend_tiles


class LDMSuperResolutionPipeline(DiffusionPipeline, compvis_family="super-resolution"):
    """Upscales images exactly ``2 ** (len(vqvae.config.block_out_channels) - 1)`` times (4x for the
    published model), whatever their size: the input is padded to what the UNet needs and the output
    cropped back, never resized. Large inputs are processed in overlapping tiles (``tile_size``), in
    latent space and in the decoder, so memory stays bounded.
    """

    def __init__(self, vqvae: VQModel | AutoencoderKL, unet: UNet2DModel, scheduler):
        super().__init__(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @property
    def upscale_factor(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def _unet_multiple(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        batch_size: int = 1,
        num_inference_steps: int = 100,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        tiling: bool | None = None,
        tile_size: int = 128,
        tile_overlap: int = 32,
        decode_tile_size: int = 64,
        callback_on_step_end: Callable | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ):
        """Upscale ``image``: PIL, a numpy array (uint8, or float in [0, 1]) or a tensor (uint8, or float in
        [-1, 1] as diffusers' pipeline reads it); one image, a batch, or a list.

        ``batch_size`` samples are drawn per input image. Images of the same size are batched together; a
        list of mixed sizes is processed one size at a time and returned in the input order.
        ``tiling``: None = automatic (above ``tile_size`` input pixels on a side), True = always, False =
        never. Tiles overlap by ``tile_overlap`` pixels and are blended with smooth weights; the decoder
        works on ``decode_tile_size`` latent tiles. Chunks of ``max_batch_size`` (default ``pipe.max_batch_size``).
        """
        check_output_type(output_type)
        legacy = legacy_callback(self.__call__, kwargs)
        if image is None:
            raise LDMKitError("image is required: the low-resolution image to upscale.")
        check_positive_int("batch_size", batch_size)
        self._check_tiles(tile_size, tile_overlap, decode_tile_size)
        groups = to_tensor_groups(image, signed=True)
        total = sum(len(idx) for idx, _ in groups) * batch_size
        Sampling(num_inference_steps, eta, generator).check(total)
        if latents is not None and len(groups) > 1:
            raise LDMKitError("latents can only be given for images of one size.")
        if latents is not None and (not isinstance(latents, torch.Tensor) or latents.ndim != 4
                                    or latents.shape[0] != total):
            raise LDMKitError(f"latents must be a tensor (batch, latent channels, height, width) with batch {total} "
                              f"(images x batch_size), got {getattr(latents, 'shape', type(latents).__name__)}.")

        tiles = _Tiles(tiling, tile_size, tile_overlap, decode_tile_size)
        results: list = [None] * total
        for indices, lowres in groups:
            rows = [i * batch_size + k for i in indices for k in range(batch_size)]
            for part in self.chunks(len(rows), max_batch_size):
                chunk_rows = rows[part.start:part.stop]
                gens = [generator[r] for r in chunk_rows] if isinstance(generator, list | tuple) else generator
                sampling = Sampling(num_inference_steps, eta, gens, callback_on_step_end, legacy_callback=legacy)
                x_t = None if latents is None else latents[part.start:part.stop]
                out = self._upscale(lowres[[j // batch_size for j in part]], sampling, x_t, tiles, output_type)
                # Each chunk goes to the output type as it is done: no float batch outlives its chunk.
                out = out if output_type in ("pt", "latent") else convert_images(out, output_type)
                for row, img in zip(chunk_rows, out):
                    results[row] = img
        images = _collate(results, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _check_tiles(self, tile_size, tile_overlap, decode_tile_size) -> None:
        multiple = self._unet_multiple
        for name, value in (("tile_size", tile_size), ("decode_tile_size", decode_tile_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise LDMKitError(f"{name} must be a positive multiple of {multiple}, got {value!r}.")
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile_size:
            raise LDMKitError(f"tile_overlap must be an integer in [0, tile_size), got {tile_overlap!r}.")

    def _upscale(self, lowres, sampling: Sampling, latents, tiles: _Tiles, output_type: str) -> torch.Tensor:
        """One group of same-size inputs: x_T, the (tiled) predict closure, the loop, the (tiled) decode."""
        device, dtype = self.unet.device, self.unet.dtype
        n, _, h, w = lowres.shape
        multiple = self._unet_multiple
        ph, pw = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
        cond = (lowres * 2 - 1).to(device=device, dtype=dtype)
        if (ph, pw) != (h, w):  # replicate the border so the padding carries no new edges
            cond = F.pad(cond, (0, pw - w, 0, ph - h), mode="replicate")
        latent_channels = self.unet.config.in_channels - cond.shape[1]
        if latent_channels < 1:
            raise LDMKitError(f"The UNet takes {self.unet.config.in_channels} channels, too few for a "
                              "latent plus an RGB image: this is not a super-resolution UNet.")
        tiled = tiles.enabled if tiles.enabled is not None else (ph > tiles.size or pw > tiles.size)
        memory = {"unet_size": (min(ph, tiles.size), min(pw, tiles.size)),
                  "decode_size": (min(ph, tiles.decode_size), min(pw, tiles.decode_size))} if tiled else {}
        latents = self.initial_latents((n, latent_channels, ph, pw), latents, sampling, device, dtype,
                                       hint=", or tiling=True (with a smaller tile_size)", **memory)

        def denoise(x, c, t):
            # Only the noisy latent goes through scale_model_input; the low-res image is a condition.
            return self.unet(torch.cat([self.scheduler.scale_model_input(x, t), c], dim=1), t).sample

        def predict(x, t):
            if not tiled:
                return denoise(x, cond, t)
            return blend_tiles(lambda y, x0, th, tw: denoise(x[:, :, y:y + th, x0:x0 + tw],
                                                             cond[:, :, y:y + th, x0:x0 + tw], t),
                               ph, pw, tiles.size, tiles.overlap)

        latents = self.denoise(latents, predict, sampling)
        if output_type == "latent":
            return latents
        # The published SR autoencoder decodes its latents unscaled (diffusers' pipeline divides by nothing).
        images = self.decode(latents, scale=1.0, decode=self._tiled_decode(tiles) if tiled else None)
        f = self.upscale_factor
        return images[:, :, : h * f, : w * f]

    def _tiled_decode(self, tiles: _Tiles):
        def decode(z):
            # Quantize once over the whole latent (it is per position), then decode tile by tile.
            quantized = self.vqvae.quantize(z)[0]
            return blend_tiles(
                lambda y, x, th, tw: self.vqvae.decode(quantized[:, :, y:y + th, x:x + tw],
                                                       force_not_quantize=True).sample,
                z.shape[-2], z.shape[-1], tiles.decode_size, tiles.overlap // 2, scale=self.upscale_factor)

        return decode


@dataclass
class _Tiles:
    """Tiling of one call: ``enabled`` None = above ``size`` input pixels on a side."""

    enabled: bool | None
    size: int
    overlap: int
    decode_size: int


def _collate(results: list, output_type: str):
    """Stack same-size results; a mixed-size list stays a list (PIL images are always a list)."""
    if output_type == "pil" or not all(r.shape == results[0].shape for r in results):
        return results
    return np.stack(results) if output_type == "np" else torch.stack(results)
