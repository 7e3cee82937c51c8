"""Unconditional LDM (Rombach et al. 2022, Sec. 4.1), e.g. CompVis/ldm-celebahq-256."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import AutoencoderKL, UNet2DModel, VQModel
from .checks import check_output_type, check_positive_int
from .denoising import Sampling, legacy_callback
from .pipeline_utils import DiffusionPipeline


class LDMPipeline(DiffusionPipeline, compvis_family="unconditional"):
    """Samples images from noise: UNet2DModel denoises latents, the VQ (or KL) decoder decodes them.

    Latents are divided by ``vqvae.config.scaling_factor`` before decoding. ldmkit's VQModel defaults it
    to 1.0, the scale every CompVis VQ model was trained with, so the published celebahq config (which
    states none) decodes correctly; diffusers defaults it to 0.18215 and gets garbage (its issue 6725).
    A config that states a factor is obeyed.
    """

    def __init__(self, vqvae: VQModel | AutoencoderKL, unet: UNet2DModel, scheduler):
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
        **kwargs,
    ):
        check_output_type(output_type)
        check_positive_int("batch_size", batch_size)
        sampling = Sampling(num_inference_steps, eta, generator, callback_on_step_end,
                            legacy_callback=legacy_callback(self.__call__, kwargs))
        sampling.check(batch_size)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        latents = self.initial_latents(shape, latents, sampling, self.unet.device, self.unet.dtype)

        def predict(x, t):
            return self.unet(self.scheduler.scale_model_input(x, t), t).sample

        return self.generate(latents, predict, sampling, output_type, return_dict)
