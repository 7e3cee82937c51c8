"""DiffusionPipeline: a bundle of components loaded from and saved to diffusers' folder layout."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..errors import LDMKitError
from ..models.modeling_utils import parse_dtype
from ..randomness import randn_tensor
from ..registry import COMPVIS_FAMILIES, PIPELINES, loader


@dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, a numpy array (N, H, W, C) in [0, 1], or a tensor (N, C, H, W)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor

    def __getitem__(self, index):
        return (self.images,)[index]


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(N, H, W, C) floats in [0, 1] -> PIL images (rounded as diffusers does)."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(im[..., 0], mode="L") for im in images]
    return [PIL.Image.fromarray(im) for im in images]


def convert_images(images: torch.Tensor, output_type: str):
    """Convert decoded images (N, C, H, W) in [0, 1] to the requested output type."""
    if output_type == "pt":
        return images
    array = images.float().cpu().permute(0, 2, 3, 1).numpy()
    return numpy_to_pil(array) if output_type == "pil" else array


def check_output_type(output_type: str, allowed=("pil", "np", "pt", "latent")) -> None:
    if output_type not in allowed:
        raise LDMKitError(f"output_type={output_type!r} is not supported; use one of {', '.join(allowed)}.")


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LDMKitError("CUDA was asked for but no CUDA GPU is available here; use device 'cpu'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LDMKitError("MPS was asked for but is not available here; use device 'cpu'.")


# Progress-bar options every new pipeline starts with (the command line's --quiet sets disable=True).
DEFAULT_PROGRESS: dict[str, Any] = {}


class DiffusionPipeline:
    """Base of every pipeline.

    Subclasses list their components in ``__init__``'s signature; those names are the folder names on disk.
    ``draw_noise_every_step`` reproduces the original CompVis samplers' noise stream (a draw at every step,
    even where it is multiplied by 0); pipelines built by ``from_single_file`` turn it on.
    """

    draw_noise_every_step = False

    def __init_subclass__(cls, compvis_family: str | None = None, **kwargs):
        """Every pipeline joins the registry under its class name, which ``save_pretrained`` writes as
        ``_class_name``; ``compvis_family`` names the original CompVis family it runs (``from_single_file``)."""
        super().__init_subclass__(**kwargs)
        PIPELINES.add(cls.__name__, cls)
        if compvis_family is not None:
            COMPVIS_FAMILIES.add(compvis_family, cls)

    def __init__(self, **components):
        for name, component in components.items():
            setattr(self, name, component)
        self._progress_bar_config: dict[str, Any] = dict(DEFAULT_PROGRESS)

    # ----------------------------------------------------------------- components, device, dtype
    @classmethod
    def component_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @property
    def components(self) -> dict[str, Any]:
        """The components by name, to build another pipeline that shares them: ``Other(**pipe.components)``."""
        return {name: getattr(self, name) for name in self.component_names()}

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        for module in self._modules():
            return module.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for module in self._modules():
            return module.dtype
        return torch.float32

    def to(self, device=None, dtype=None):
        """Move every network to ``device`` and/or cast it to ``dtype`` (positional order as diffusers)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            device = torch.device(device)
            check_device(device)
        dtype = parse_dtype(dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise LDMKitError(f"dtype {dtype} is not a floating type; use torch.float32, float16 or bfloat16.")
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def initial_latents(self, shape: tuple, latents: torch.Tensor | None, generator, num_inference_steps: int,
                        device, dtype) -> torch.Tensor:
        """``x_T``: drawn from ``generator`` (or the caller's ``latents``, checked), after ``set_timesteps``, times
        the scheduler's ``init_noise_sigma`` (1 for DDIM/DDPM, sigma_max for the sigma-space samplers)."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = check_latents(latents, shape, device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return latents * self.scheduler.init_noise_sigma

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)

    numpy_to_pil = staticmethod(numpy_to_pil)

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        variant: str | None = None,
        **components,
    ):
        """Load a pipeline folder (diffusers layout) or Hub id; ``model_index.json`` says which pipeline.

        Components passed by keyword are used as they are instead of being loaded (to share them).
        """
        return loader("from_pretrained")(cls, name_or_path, torch_dtype=torch_dtype, revision=revision,
                                         cache_dir=cache_dir, local_files_only=local_files_only, variant=variant,
                                         components=components)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | dict | None = None,
        use_ema: bool | None = None,
        torch_dtype: torch.dtype | str | None = None,
        tokenizer=None,
    ):
        """Load an original CompVis checkpoint (``.ckpt``, ``.safetensors`` or a bare state dict) with the
        ``config.yaml`` it was trained with; the YAML says which pipeline (text-to-image, super-resolution,
        unconditional, class-conditional, inpainting).

        ``use_ema``: None samples with the EMA weights when the YAML enables EMA (its default) and the file
        has them, as the original scripts (``model.ema_scope()``); True requires them; False uses the live
        weights. ``tokenizer`` (text-to-image only): BERT's vocabulary (an LDMTokenizer or a folder); None
        fetches bert-base-uncased's, as the original. The scheduler is the original DDIM sampler.
        """
        return loader("from_single_file")(cls, path, config=config, use_ema=use_ema, torch_dtype=torch_dtype,
                                          tokenizer=tokenizer)

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write the pipeline in the diffusers layout (diffusers' from_pretrained reads it)."""
        loader("save_pretrained")(self, folder, safe_serialization=safe_serialization)


# --------------------------------------------------------------------- helpers shared by the pipelines
def step_kwargs(scheduler, eta: float, generator) -> dict:
    """The extra arguments ``scheduler.step`` takes: eta (DDIM only) and the generator for its noise.

    diffusers' LDM pipelines never pass the generator, so eta > 0 draws from the global RNG and a seed
    does not reproduce; here it always goes through.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def check_sampling_args(num_inference_steps, eta, generator, batch_size: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise LDMKitError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if eta is None or eta < 0:
        raise LDMKitError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta!r}.")
    if isinstance(generator, list | tuple) and len(generator) != batch_size:
        raise LDMKitError(f"Got {len(generator)} generators for {batch_size} images: pass one generator, or a "
                          f"list of exactly {batch_size} (one per image).")


def check_latents(latents: torch.Tensor, shape: tuple, device, dtype) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise LDMKitError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}.")
    if tuple(latents.shape) != tuple(shape):
        raise LDMKitError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} "
                          "(batch, latent channels, height / 8, width / 8).")
    if not latents.dtype.is_floating_point:
        raise LDMKitError(f"latents must be floating point, got {latents.dtype}.")
    if not torch.isfinite(latents).all():
        raise LDMKitError("latents contain NaN or infinite values.")
    return latents.to(device=device, dtype=dtype)


def decode_latents(decoder, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode latents to images in [0, 1]: ``D(z / scale)`` then ``x / 2 + 0.5`` (the models work in [-1, 1]).

    Half-precision decoders can overflow into NaN (black images); then decode again in float32.
    """
    image = decoder.decode(latents.to(decoder.dtype) / scale).sample
    if decoder.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(image).all():
        original = decoder.dtype
        decoder.to(torch.float32)
        try:
            image = decoder.decode(latents.float() / scale).sample
        finally:
            decoder.to(original)
    return (image.float() / 2 + 0.5).clamp(0, 1)


def compvis_step(scheduler, noise_pred: torch.Tensor, t, latents: torch.Tensor, eta: float, generator,
                 draw_noise_every_step: bool):
    """``scheduler.step`` with, optionally, the noise stream of the original CompVis samplers.

    Their DDIM and PLMS steps draw ``torch.randn(x.shape)`` at every step, also when it is multiplied by 0
    (eta = 0, PLMS), so a seed gives the same later draws as the original only if these draws happen too.
    With ``draw_noise_every_step`` the draw is made here from ``generator``: DDIM receives it as its
    ``variance_noise`` (it is the draw it would make itself at eta > 0); schedulers that draw no noise
    (PNDM) drop it. Schedulers that draw their own noise otherwise are left alone.
    """
    from ..randomness import randn_tensor

    kwargs = step_kwargs(scheduler, eta, generator)
    if draw_noise_every_step:
        params = inspect.signature(scheduler.step).parameters
        if "variance_noise" in params or "generator" not in params:
            noise = randn_tensor(noise_pred.shape, generator, noise_pred.device, noise_pred.dtype)
            if "variance_noise" in params:
                kwargs.pop("generator", None)
                kwargs["variance_noise"] = noise
    return scheduler.step(noise_pred, t, latents, **kwargs)


def decode_first_stage(vqvae, latents: torch.Tensor) -> torch.Tensor:
    """``LatentDiffusion.decode_first_stage`` then ``clamp((x + 1) / 2, 0, 1)``, as the CompVis scripts:
    ``z * (1 / scale_factor)`` (a multiplication, which differs from a division in the last bit), then the
    decoder; a VQ decoder quantizes first."""
    z = latents.to(vqvae.dtype) * (1.0 / vqvae.config.scaling_factor)
    image = vqvae.decode(z).sample
    return torch.clamp((image.float() + 1.0) / 2.0, min=0.0, max=1.0)
