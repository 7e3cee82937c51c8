"""Class-conditional latent diffusion (Rombach et al. 2022, sec. 4.1.1, ImageNet cin256)."""

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
    decode_first_stage,
)


class LDMClassConditionalPipeline(DiffusionPipeline, compvis_family="class-conditional"):
    """Images of given classes: the class embedder gives a one-token context that the UNet cross-attends to,
    the VQ (or KL) decoder decodes the latents.

    Components: ``vqvae``, ``class_embedder`` (:class:`~ldmkit.models.ClassEmbedder`), ``unet``
    (UNet2DConditionModel), ``scheduler``. Classifier-free guidance (Ho & Salimans 2021) uses the
    embedder's last class as the unconditional one (class 1000 of cin256's 1001), as the original notebook.
    Like the original samplers, a noise draw is made at every step (also at eta = 0), so a seed continues
    as in the CompVis code; set ``draw_noise_every_step = False`` to skip it.
    """

    draw_noise_every_step = True

    def __init__(self, vqvae, class_embedder, unet, scheduler):
        super().__init__(vqvae=vqvae, class_embedder=class_embedder, unet=unet, scheduler=scheduler)

    def _labels(self, class_labels) -> torch.Tensor:
        bad = LDMKitError(f"class_labels must be an int, a non-empty list of ints or a 1-D integer tensor, got "
                          f"{class_labels!r}.")
        if isinstance(class_labels, bool | str):
            raise bad
        try:
            labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        except (TypeError, ValueError, RuntimeError):
            raise bad from None
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise bad
        n = self.class_embedder.config.n_classes
        if labels.min() < 0 or labels.max() >= n:
            raise LDMKitError(f"class_labels must be in [0, {n - 1}] ({n - 1} is the unconditional class), got "
                              f"{labels.tolist()}.")
        return labels.long()

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ):
        """One image per entry of ``class_labels``.

        ``guidance_scale`` s gives ``e = e_u + s (e_c - e_u)``: 1 (the default) is plain conditional
        sampling, the cin256 notebook uses 3.0. ``callback_on_step_end(pipe, i, t, {"latents": ...})`` is
        called after every step; a dict it returns replaces the latents. ``output_type`` is "pil", "np"
        (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent".
        """
        check_output_type(output_type)
        labels = self._labels(class_labels)
        if guidance_scale is None or guidance_scale < 0:
            raise LDMKitError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale!r}.")
        batch = labels.shape[0]
        check_sampling_args(num_inference_steps, eta, generator, batch)
        need_cond, need_uncond = guidance_scale != 0, guidance_scale != 1
        device, dtype = self.unet.device, self.unet.dtype
        labels = labels.to(self.class_embedder.device)
        contexts = []
        if need_uncond:  # the unconditional half goes first, as in the original sampler
            contexts.append(self.class_embedder(torch.full_like(labels, self.class_embedder.null_class)))
        if need_cond:
            contexts.append(self.class_embedder(labels))
        context = torch.cat(contexts).to(device=device, dtype=dtype)

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch, self.unet.config.out_channels, *size)
        latents = self.initial_latents(shape, latents, generator, num_inference_steps, device, dtype)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * len(contexts))
            noise_pred = self.unet(self.scheduler.scale_model_input(model_input, t), t,
                                   encoder_hidden_states=context).sample
            if need_cond and need_uncond:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = compvis_step(self.scheduler, noise_pred, t, latents, eta, generator,
                                   self.draw_noise_every_step).prev_sample
            if callback_on_step_end is not None:
                result = callback_on_step_end(self, i, t, {"latents": latents})
                if result:
                    latents = result.get("latents", latents)

        images = latents if output_type == "latent" else convert_images(decode_first_stage(self.vqvae, latents),
                                                                        output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
