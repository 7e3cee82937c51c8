"""Inpainting latent diffusion (Rombach et al. 2022, sec. 4.5 and appendix; CompVis inpainting_big)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import LDMKitError
from ..models import AutoencoderKL, UNet2DModel, VQModel
from .checks import check_latents, check_output_type
from .denoising import Sampling, legacy_callback
from .image_processing import high_bit_to_unit, to_tensor
from .pipeline_utils import DiffusionPipeline


def _mask_to_tensor(mask) -> torch.Tensor:
    """A mask (PIL, numpy or tensor; one or a list) as (N, 1, H, W) floats in [0, 1] (1 = repaint)."""
    if isinstance(mask, list | tuple):
        if not mask:
            raise LDMKitError("mask_image is an empty list.")
        return torch.cat([_mask_to_tensor(m) for m in mask])
    if isinstance(mask, PIL.Image.Image):
        # scripts/inpaint.py: Image.convert("L"), then / 255 (16-bit and float masks: read at their depth).
        gray = high_bit_to_unit(mask, "mask_image")
        mask = gray if gray is not None else np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 and not np.issubdtype(mask.dtype, np.floating):
            raise LDMKitError(f"mask_image: numpy masks must be uint8 (0-255) or float (0-1), got {mask.dtype}.")
        mask = torch.from_numpy(mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else
                                mask.astype(np.float32))
        if mask.ndim == 4 and mask.shape[-1] == 1:  # (N, H, W, 1)
            mask = mask[..., 0]
    if not isinstance(mask, torch.Tensor):
        raise LDMKitError(f"mask_image must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}.")
    mask = mask.detach()
    mask = mask.float() / 255.0 if mask.dtype == torch.uint8 else mask.float()
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise LDMKitError(f"mask_image must be one channel: (H, W), (N, H, W) or (N, 1, H, W), got shape "
                          f"{tuple(mask.shape)}.")
    if not torch.isfinite(mask).all():
        raise LDMKitError("mask_image contains NaN or infinite values.")
    return mask.cpu()


def _image_to_tensor(image) -> torch.Tensor:
    if isinstance(image, list | tuple):
        if not image:
            raise LDMKitError("image is an empty list.")
        parts = [to_tensor(im, f"image[{i}]") for i, im in enumerate(image)]
        if any(p.shape[-2:] != parts[0].shape[-2:] for p in parts):
            raise LDMKitError("All images of one call must have the same size.")
        return torch.cat(parts)
    return to_tensor(image)


class LDMInpaintPipeline(DiffusionPipeline, compvis_family="inpainting"):
    """Fills the masked part of an image, keeping the rest.

    The UNet (UNet2DModel) sees ``[z_t, E(masked image), mask]``: the first-stage latent of the image with
    the masked pixels set to 0 and the mask at latent size, both in [-1, 1] as scripts/inpaint.py makes
    them. The decoded sample is composited with the input, so the known pixels are kept exactly.
    Components: ``vqvae`` (VQModel, also the encoder of the conditioning), ``unet``, ``scheduler``. Like the
    original samplers a noise draw is made at every step (also at eta = 0); set
    ``draw_noise_every_step = False`` to skip it.
    """

    draw_noise_every_step = True

    def __init__(self, vqvae: VQModel | AutoencoderKL, unet: UNet2DModel, scheduler):
        super().__init__(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @torch.no_grad()
    def prepare_inputs(self, image, mask_image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image, mask, condition)``: image and mask in [-1, 1] (the mask is +-1 after thresholding at
        0.5), and the UNet's concat condition ``[E(masked image), mask resized to the latent]``."""
        return self._condition(*self._checked_inputs(image, mask_image))

    def _checked_inputs(self, image, mask_image) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (N, 3, H, W) and mask (N, 1, H, W) in [0, 1] on the CPU, of one count and size."""
        image, mask = _image_to_tensor(image), _mask_to_tensor(mask_image)
        if image.shape[0] != mask.shape[0] and 1 in (image.shape[0], mask.shape[0]):
            n = max(image.shape[0], mask.shape[0])
            image, mask = image.expand(n, -1, -1, -1), mask.expand(n, -1, -1, -1)
        if image.shape[0] != mask.shape[0] or image.shape[-2:] != mask.shape[-2:]:
            raise LDMKitError(f"image {tuple(image.shape)} and mask_image {tuple(mask.shape)} must have the same "
                              "size and count (or one of them a single one).")
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        height, width = image.shape[-2:]
        if height % multiple or width % multiple:
            raise LDMKitError(f"Inpainting needs height and width that are multiples of {multiple}, got "
                              f"{height}x{width}; crop or pad the image and mask.")
        return image, mask

    def _condition(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = (mask >= 0.5).float()
        masked = (1 - mask) * image
        device, dtype = self.vqvae.device, self.vqvae.dtype
        image, mask, masked = (x.to(device=device, dtype=dtype) * 2.0 - 1.0 for x in (image, mask, masked))
        encoded = self.vqvae.encode(masked)
        # A VQ first stage conditions on its latent before quantization; a KL one on the posterior's mode.
        latent = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
        condition = torch.cat([latent, F.interpolate(mask, size=latent.shape[-2:])], dim=1)
        return image, mask, condition

    @torch.no_grad()
    def __call__(
        self,
        image,
        mask_image,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ):
        """Inpaint ``image`` where ``mask_image`` is 1 (white).

        ``image``: PIL, numpy or tensor (C, H, W) / (N, C, H, W) in [0, 1], or a list; ``mask_image``:
        PIL (converted to grayscale), numpy or tensor in [0, 1], thresholded at 0.5. One mask can serve
        several images and the reverse. ``output_type`` "pil", "np", "pt" (N, C, H, W in [0, 1]) give the
        composite; "latent" the final latents. The images are read (as float tensors on the CPU) up front,
        then encoded, inpainted and decoded ``max_batch_size`` at a time (default ``pipe.max_batch_size``).
        """
        check_output_type(output_type)
        if image is None or mask_image is None:
            raise LDMKitError("Inpainting needs image and mask_image (white = the part to repaint).")
        images, masks = self._checked_inputs(image, mask_image)
        sampling = Sampling(num_inference_steps, eta, generator, callback_on_step_end,
                            legacy_callback=legacy_callback(self.__call__, kwargs))
        total = images.shape[0]
        sampling.check(total)
        factor = self.vae_scale_factor
        shape = (total, self.unet.config.out_channels, images.shape[-2] // factor, images.shape[-1] // factor)
        if latents is not None:  # the whole x_T is checked before the first chunk runs
            latents = check_latents(latents, shape, "(batch, latent channels, height, width)", None, None)

        def run(rows: range, chunk: Sampling) -> torch.Tensor:
            self.check_memory((len(rows), *shape[1:]))  # before the first stage encodes the chunk
            return self._inpaint(images[rows.start:rows.stop], masks[rows.start:rows.stop], chunk,
                                 None if latents is None else latents[rows.start:rows.stop], output_type)

        return self.run_chunks(total, max_batch_size, sampling, run, output_type, return_dict)

    def _inpaint(self, image, mask, sampling: Sampling, latents, output_type: str) -> torch.Tensor:
        """One chunk: the condition, x_T, the loop, the decode composited with the known pixels."""
        image, mask, condition = self._condition(image, mask)
        device, dtype = self.unet.device, self.unet.dtype
        condition = condition.to(device=device, dtype=dtype)
        shape = (image.shape[0], self.unet.config.out_channels, *condition.shape[-2:])
        if self.unet.config.in_channels != shape[1] + condition.shape[1]:
            raise LDMKitError(f"The UNet takes {self.unet.config.in_channels} channels, not a latent plus the "
                              f"{condition.shape[1]}-channel inpainting condition: this is not an inpainting UNet.")
        latents = self.initial_latents(shape, latents, sampling, device, dtype)

        def predict(x, t):
            # Only the noisy latent goes through scale_model_input; the masked image and mask are conditions.
            return self.unet(torch.cat([self.scheduler.scale_model_input(x, t), condition], dim=1), t).sample

        def composite(final_latents):
            # scripts/inpaint.py: (1 - m) * image + m * prediction, everything back in [0, 1].
            predicted = self.decode(final_latents)
            keep = torch.clamp((mask.float() + 1.0) / 2.0, min=0.0, max=1.0)
            original = torch.clamp((image.float() + 1.0) / 2.0, min=0.0, max=1.0)
            return (1 - keep) * original + keep * predicted.to(original.device)

        return self.sample(latents, predict, sampling, output_type, postprocess=composite)
