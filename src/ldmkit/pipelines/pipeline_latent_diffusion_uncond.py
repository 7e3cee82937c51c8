"""Unconditional LDM (Rombach et al. 2022, Sec. 4.1), e.g. CompVis/ldm-celebahq-256."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import AutoencoderKL, UNet2DModel, VQModel
from .checks import check_latents, check_output_type, check_positive_int
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
        max_batch_size: int | None = None,
        **kwargs,
    ):
        """``batch_size`` samples, made ``max_batch_size`` at a time (default ``pipe.max_batch_size``), each
        chunk with its rows' generators and converted to ``output_type`` as it is done."""
        check_output_type(output_type)
        check_positive_int("batch_size", batch_size)
        sampling = Sampling(num_inference_steps, eta, generator, callback_on_step_end,
                            legacy_callback=legacy_callback(self.__call__, kwargs))
        sampling.check(batch_size)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is not None:  # the whole x_T is checked before the first chunk runs
            latents = check_latents(latents, shape, "(batch, latent channels, height, width)", None, None)

        def predict(x, t):
            return self.unet(self.scheduler.scale_model_input(x, t), t).sample

        def run(rows: range, chunk: Sampling) -> torch.Tensor:
            x_t = self.initial_latents((len(rows), *shape[1:]), None if latents is None else
                                       latents[rows.start:rows.stop], chunk, self.unet.device, self.unet.dtype)
            return self.sample(x_t, predict, chunk, output_type)

        return self.run_chunks(batch_size, max_batch_size, sampling, run, output_type, return_dict)
