"""Unconditional LDM (Rombach et al. 2022, Sec. 4.1), e.g. CompVis/ldm-celebahq-256."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import LDMKitError
from .pipeline_utils import (
    DiffusionPipeline,
    ImagePipelineOutput,
    check_output_type,
    check_sampling_args,
    compvis_step,
    convert_images,
    decode_latents,
)


class LDMPipeline(DiffusionPipeline, compvis_family="unconditional"):
    """Samples images from noise: UNet2DModel denoises latents, the VQ (or KL) decoder decodes them.

    Latents are divided by ``vqvae.config.scaling_factor`` before decoding. ldmkit's VQModel defaults it
    to 1.0, the scale every CompVis VQ model was trained with, so the published celebahq config (which
    states none) decodes correctly; diffusers defaults it to 0.18215 and gets garbage (its issue 6725).
    A config that states a factor is obeyed.
    """

    def __init__(self, vqvae, unet, scheduler):
        super().__init__(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        check_output_type(output_type)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LDMKitError(f"batch_size must be a positive integer, got {batch_size!r}.")
        check_sampling_args(num_inference_steps, eta, generator, batch_size)
        device, dtype = self.unet.device, self.unet.dtype
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        latents = self.initial_latents(shape, latents, generator, num_inference_steps, device, dtype)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            noise_pred = self.unet(self.scheduler.scale_model_input(latents, t), t).sample
            latents = compvis_step(self.scheduler, noise_pred, t, latents, eta, generator,
                                   self.draw_noise_every_step).prev_sample
            if callback_on_step_end is not None:
                result = callback_on_step_end(self, i, t, {"latents": latents})
                if result:
                    latents = result.get("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = convert_images(decode_latents(self.vqvae, latents, self.vqvae.config.scaling_factor),
                                    output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
