"""Class-conditional latent diffusion (Rombach et al. 2022, sec. 4.1.1, ImageNet cin256)."""

from __future__ import annotations

import difflib
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

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id, as diffusers' ``DiTPipeline.labels``: from the ``class_names`` the class
        embedder's config stores (ldmkit-trained models; the null class has no name). Empty for a model that
        stores none, such as one converted from a CompVis checkpoint: it takes integer ids only."""
        return {name: i for i, name in enumerate(_class_names(self.class_embedder) or [])}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """The class ids of one class name or a list of them, as ``DiTPipeline.get_label_ids``. A name that
        matches no class exactly may match one ignoring case; otherwise the error lists the closest names."""
        names = [label] if isinstance(label, str) else label
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise LDMKitError(f"get_label_ids takes a class name or a list of them, got {label!r}.")
        labels = self.labels
        if not labels:
            raise LDMKitError(f"This model stores no class names (its class embedder has no class_names, as a "
                              f"converted CompVis model); pass class_labels as integer ids 0 to "
                              f"{self.class_embedder.config.n_classes - 2} instead.")
        folded = {name.casefold(): i for name, i in labels.items()}
        ids = []
        for name in names:
            found = labels.get(name, folded.get(name.casefold()))
            if found is None:
                raise LDMKitError(f"{name!r} is not one of this model's {len(labels)} classes; "
                                  f"{close_class_names(name, list(labels))} pipe.labels lists them all.")
            ids.append(found)
        return ids

    def _labels(self, class_labels) -> torch.Tensor:
        bad = LDMKitError(f"class_labels must be an int, a class name, a non-empty list of them or a 1-D integer "
                          f"tensor, got {class_labels!r}.")
        if isinstance(class_labels, str):
            class_labels = self.get_label_ids(class_labels)
        elif isinstance(class_labels, list | tuple) and any(isinstance(x, str) for x in class_labels):
            class_labels = [self.get_label_ids(x)[0] if isinstance(x, str) else x for x in class_labels]
        if isinstance(class_labels, bool):
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
        class_labels: int | str | list[int | str] | torch.Tensor,
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
        """One image per entry of ``class_labels``: class ids, or class names (see ``labels``).

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


def _class_names(embedder) -> list[str] | None:
    """The embedder's ``class_names`` config (one name per class in id order, the null class left out), checked,
    or None when it stores none."""
    config = getattr(embedder, "config", None) or {}
    names = config.get("class_names")
    if names is None:
        return None
    count = config["n_classes"] - 1
    if (not isinstance(names, list | tuple) or len(names) != count or len(set(names)) != count
            or not all(isinstance(n, str) and n for n in names)):
        raise LDMKitError(f"The class embedder's class_names must be {count} distinct non-empty names (one per "
                          f"class, in id order, the null class left out), got {names!r:.200}; fix or remove "
                          "class_names in class_embedder/config.json.")
    return list(names)


def close_class_names(name: str, names: list[str]) -> str:
    """'did you mean ...?' with up to three names closest to ``name`` (difflib, ignoring case), or a hint."""
    folded = {n.casefold(): n for n in names}
    close = [folded[c] for c in difflib.get_close_matches(name.casefold(), list(folded), n=3, cutoff=0.5)]
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "no class name is close to it."
