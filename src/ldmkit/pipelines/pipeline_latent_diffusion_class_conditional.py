"""Class-conditional latent diffusion (Rombach et al. 2022, sec. 4.1.1, ImageNet cin256)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import LDMKitError
from ..models import AutoencoderKL, ClassEmbedder, UNet2DConditionModel, VQModel
from .checks import check_latents, check_output_type
from .denoising import Guidance, Sampling, legacy_callback
from .pipeline_utils import DiffusionPipeline


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

    def __init__(self, vqvae: VQModel | AutoencoderKL, class_embedder: ClassEmbedder, unet: UNet2DConditionModel,
                 scheduler):
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
        guidance_interval: tuple[float, float] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ):
        """One image per entry of ``class_labels``.

        ``guidance_scale`` s gives ``e = e_u + s (e_c - e_u)``: 1 (the default) is plain conditional
        sampling, the cin256 notebook uses 3.0; ``guidance_interval=(lo, hi)`` guides only
        the steps with noise level ``lo < sigma_t <= hi`` (see ``denoising.Guidance``).
        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` is called after every step; a dict it returns
        replaces the latents. Labels are sampled ``max_batch_size`` at a time (default ``pipe.max_batch_size``),
        each chunk with its rows' generators. ``output_type`` is "pil", "np"
        (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent".
        """
        check_output_type(output_type)
        labels = self._labels(class_labels)
        guidance = Guidance(guidance_scale, guidance_interval)
        sampling = Sampling(num_inference_steps, eta, generator, callback_on_step_end,
                            legacy_callback=legacy_callback(self.__call__, kwargs))
        total = labels.shape[0]
        sampling.check(total)
        device, dtype = self.unet.device, self.unet.dtype
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (total, self.unet.config.out_channels, *size)
        if latents is not None:  # the whole x_T is checked before the first chunk runs
            latents = check_latents(latents, shape, "(batch, latent channels, height, width)", None, None)

        def run(rows: range, chunk: Sampling) -> torch.Tensor:
            part = labels[rows.start:rows.stop].to(self.class_embedder.device)
            null = torch.full_like(part, self.class_embedder.null_class)
            # The unconditional half goes first, as in the original sampler; only the embeddings needed are made.
            uncond = self.class_embedder(null) if guidance.need_uncond else None
            cond = self.class_embedder(part) if guidance.need_cond else None
            context = guidance.context(uncond, cond).to(device=device, dtype=dtype)
            x_t = self.initial_latents((len(rows), *shape[1:]), None if latents is None else
                                       latents[rows.start:rows.stop], chunk, device, dtype,
                                       passes=2 if guidance.both else 1)

            def model(x, t):
                return self.unet(self.scheduler.scale_model_input(x, t), t,
                                 encoder_hidden_states=guidance.select(context)).sample

            return self.sample(x_t, guidance.wrap(model, self.scheduler), chunk, output_type)

        return self.run_chunks(total, max_batch_size, sampling, run, output_type, return_dict)
