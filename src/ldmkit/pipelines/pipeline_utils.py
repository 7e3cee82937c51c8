"""DiffusionPipeline: a bundle of components loaded from and saved to diffusers' folder layout."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..configuration import FrozenDict
from ..errors import LDMKitError
from ..loading.hub_upload import push_saved, upload_after_save
from ..loading.options import check_device_available, resolve_dtype
from ..models.modeling_utils import parse_dtype
from ..outputs import BaseOutput
from ..randomness import randn_tensor
from ..registry import COMPVIS_FAMILIES, PIPELINES, loader
from . import feature_cache, limits, speed
from .checks import check_latents, check_positive_int
from .denoising import Predict, Sampling, decode_first_stage, make_step
from .memory import MemoryMixin
from .reuse import build_from_pipe, component_entry


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a numpy array (N, H, W, C) in [0, 1], or a tensor (N, C, H, W).
    Read it as diffusers' outputs: ``out.images``, ``out["images"]``, ``out[0]``, ``out.to_tuple()``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


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


class _Output:
    """The images of a call, filled chunk by chunk: PIL images in a list, arrays and tensors in one
    preallocated batch (so that no chunk's float images outlive it and nothing is concatenated at the end)."""

    def __init__(self, total: int, output_type: str):
        self.total, self.output_type, self.images = total, output_type, None

    def add(self, rows: range, images: torch.Tensor) -> None:
        if self.output_type not in ("pt", "latent"):
            images = convert_images(images, self.output_type)
        if self.output_type == "pil":
            self.images = self.images or []
            self.images.extend(images)
            return
        if self.images is None:
            shape = (self.total, *images.shape[1:])
            self.images = np.empty(shape, images.dtype) if isinstance(images, np.ndarray) else \
                images.new_empty(shape)
        self.images[rows.start:rows.stop] = images


class DiffusionPipeline(MemoryMixin):
    """Base of every pipeline.

    Subclasses list their components in ``__init__``'s signature; those names are the folder names on disk.
    ``draw_noise_every_step`` reproduces the original CompVis samplers' noise stream (a draw at every step,
    even where it is multiplied by 0); pipelines built by ``from_single_file`` turn it on.
    """

    draw_noise_every_step = False
    # Images per chunk of a call (every pipeline's ``max_batch_size=`` overrides it for one call): a call for
    # more images runs chunk after chunk, each converted to the output as it finishes (bounded memory).
    max_batch_size = 16
    # What from_pretrained / from_single_file loaded the pipeline from (``name_or_path``); None when built.
    _name_or_path: str | os.PathLike | None = None

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
        self._progress_bar_config: dict[str, Any] = {}
        # Hooks of the denoising loop, for features that apply to every pipeline (feature caching, ...):
        # ``wrapper(predict, timesteps) -> predict`` is applied once per call around the pipeline's model call;
        # ``callback(pipe, step_index, t, tensors)`` runs after every step, before the user's callback.
        self.predict_wrappers: list[Callable[[Predict, torch.Tensor], Predict]] = []
        self.step_callbacks: list[Callable] = []

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
        """Move every network to ``device`` and/or cast it to ``dtype`` (positional order as diffusers; a lone
        dtype may come first, ``pipe.to(torch.float16)`` or ``pipe.to("auto")``). ``dtype="auto"`` picks, per
        network, what the target device runs fast (``ldmkit.hardware.auto_dtype``)."""
        if isinstance(device, torch.dtype) or (isinstance(device, str) and device == "auto" and dtype is None):
            device, dtype = None, device
        if device is not None:
            device = torch.device(device)
            check_device_available(device, "device")
        auto = isinstance(dtype, str) and dtype == "auto"
        dtype = None if auto else parse_dtype(dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise LDMKitError(f"dtype {dtype} is not a floating type; use torch.float32, float16 or bfloat16.")
        for module in self._modules():
            target = parse_dtype("auto", device or module.device, getattr(module, "config", None)) if auto else dtype
            module.to(device=device, dtype=target)
        speed.use_channels_last(self)  # bf16 on a CPU: the layout its convolutions run fastest in
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def initial_latents(self, shape: tuple, latents: torch.Tensor | None, sampling: Sampling, device, dtype,
                        layout: str = "(batch, latent channels, height, width)", passes: int = 1,
                        **tiles) -> torch.Tensor:
        """``x_T``: drawn from the generator (or the caller's ``latents``, checked), after ``set_timesteps``,
        times the scheduler's ``init_noise_sigma`` (1 for DDIM/DDPM, sigma_max for the sigma-space samplers).
        First the request is checked to fit in memory (:meth:`check_memory`; ``passes`` UNet passes per step,
        ``tiles``: its ``unet_size`` / ``decode_size`` / ``hint``), before anything of its size is allocated."""
        self.check_memory(shape, passes, **tiles)
        if latents is None:
            latents = randn_tensor(shape, generator=sampling.generator, device=device, dtype=dtype)
        else:
            latents = check_latents(latents, shape, layout, device, dtype)
        self.scheduler.set_timesteps(sampling.num_inference_steps, device=device)
        return latents * self.scheduler.init_noise_sigma

    def check_memory(self, shape: tuple, passes: int = 1, unet_size: tuple[int, int] | None = None,
                     decode_size: tuple[int, int] | None = None, hint: str | None = None) -> None:
        """Refuse latents of ``shape`` whose activations would not fit in the memory available where the
        networks run (the estimate and the limit: ``pipelines/limits.py``; ``LDMKIT_MAX_MEMORY`` overrides)."""
        unet, vae = getattr(self, "unet", None), getattr(self, "vqvae", None)
        if not isinstance(unet, torch.nn.Module):
            return
        vae_config = vae.config if isinstance(vae, torch.nn.Module) else None
        if decode_size is None and getattr(vae, "use_tiling", False):
            tile = vae.tile_latent_min_size
            decode_size = (min(tile, shape[-2]), min(tile, shape[-1]))
        if hint is None:
            hint = ", or decode in tiles (pipe.vqvae.enable_tiling())" if hasattr(vae, "enable_tiling") else ""
        sizes = (unet.dtype.itemsize, vae.dtype.itemsize if vae_config is not None else 4)
        parts = limits.estimate(unet.config, vae_config, shape, passes, sizes, unet_size, decode_size)
        device = self._offload.device if self._offload is not None else unet.device  # where the UNet computes
        limits.check_fits(parts, torch.device(device), hint)

    def chunks(self, total: int, max_batch_size: int | None = None) -> list[range]:
        """The rows of each chunk of a call for ``total`` images: ``max_batch_size`` (default: the pipeline's
        attribute) at a time."""
        size = self.max_batch_size if max_batch_size is None else max_batch_size
        check_positive_int("max_batch_size", size)
        return [range(start, min(start + size, total)) for start in range(0, total, size)]

    def run_chunks(self, total: int, max_batch_size: int | None, sampling: Sampling,
                   run: Callable[[range, Sampling], torch.Tensor], output_type: str, return_dict: bool):
        """``run(rows, sampling) -> images`` (N, C, H, W in [0, 1], or latents) for each chunk of rows, each
        chunk with its own rows' generators (a single generator goes on from chunk to chunk: the same as
        calling the pipeline once per chunk), each result converted to ``output_type`` as it is done."""
        output = _Output(total, output_type)
        for rows in self.chunks(total, max_batch_size):
            output.add(rows, run(rows, sampling.for_rows(rows)))
        return ImagePipelineOutput(images=output.images) if return_dict else (output.images,)

    # ----------------------------------------------------------------- the one denoising loop
    def denoise(self, latents: torch.Tensor, predict: Predict, sampling: Sampling) -> torch.Tensor:
        """Run the reverse process from ``x_T`` (Rombach et al. 2022, eq. (2) in latent space): at every
        timestep ``model_output = predict(z_t, t)`` and ``z_{t-1} = scheduler.step(...)``, then the hooks and
        the user's callback. ``predict`` is the pipeline's model call, guidance included."""
        timesteps = self.scheduler.timesteps
        step = make_step(self.scheduler, sampling.eta, sampling.generator, self.draw_noise_every_step)
        for wrapper in self.predict_wrappers:
            predict = wrapper(predict, timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_output = predict(latents, t)
            latents = step(model_output, t, latents)
            latents = self._end_step(sampling, i, t, latents, model_output)
        return latents

    def enable_feature_cache(self, interval: int = 3, branch: int = 1, schedule: str = "uniform"):
        """Reuse the UNet's deep features between steps (DeepCache, Ma et al. CVPR 2024): every full step
        (``ceil(steps / interval)`` of them, placed by ``schedule``: "uniform" or "quadratic") runs the
        whole UNet; the others run only the ``branch`` shallowest levels. See pipelines/feature_cache.py.
        Returns the cache (its ``calls`` count full and shallow UNet runs)."""
        if getattr(self, "unet", None) is None:
            raise LDMKitError(f"{type(self).__name__} has no UNet: the feature cache applies to UNet pipelines.")
        return feature_cache.enable(self, interval, branch, schedule)

    def compile(self, components: tuple[str, ...] | None = None, **compile_kwargs) -> list[str]:
        """``torch.compile`` the UNet and the autoencoder (or the named ``components``) in place, with inductor's
        freezing: faster steps in fp32 and bf16 after a first call that compiles (about a minute for the
        full-size UNet on one core). Outputs stay within float rounding of eager (4e-6 measured in fp32).
        Inference only; compile after loading the weights. See pipelines/speed.py for the measurements;
        :meth:`uncompile` undoes it. Returns the names compiled."""
        return speed.compile_pipeline(self, components, **compile_kwargs)

    def uncompile(self) -> None:
        """Back to the eager networks (undoes :meth:`compile`)."""
        speed.uncompile_pipeline(self)

    def disable_feature_cache(self) -> None:
        """Back to running the whole UNet at every step (bit-identical to a pipeline never cached)."""
        feature_cache.disable(self)

    def _end_step(self, sampling: Sampling, i: int, t, latents: torch.Tensor, model_output: torch.Tensor):
        tensors = {"latents": latents, "noise_pred": model_output}
        for callback in self.step_callbacks:
            callback(self, i, t, tensors)
        if sampling.legacy_callback is not None:
            sampling.legacy_callback(self, i, t, tensors)
        if sampling.callback is None:
            return latents
        result = sampling.callback(self, i, t, {k: tensors[k] for k in sampling.callback_inputs})
        return result.get("latents", latents) if result else latents

    def decode(self, latents: torch.Tensor, scale: float | None = None, decode: Callable | None = None):
        """First-stage decode to images in [0, 1] (``scale`` defaults to the autoencoder's scaling factor),
        with the float32 fall-back for half-precision overflow."""
        scale = self.vqvae.config.scaling_factor if scale is None else scale
        return decode_first_stage(self.vqvae, latents, scale, decode)

    def sample(self, latents: torch.Tensor, predict: Predict, sampling: Sampling, output_type: str,
               postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Denoise, then decode (``postprocess(latents) -> images in [0, 1]``, default :meth:`decode`) unless
        ``output_type`` is "latent": the end of every pipeline's work on one chunk."""
        latents = self.denoise(latents, predict, sampling)
        return latents if output_type == "latent" else (postprocess or self.decode)(latents)

    def generate(self, latents: torch.Tensor, predict: Predict, sampling: Sampling, output_type: str,
                 return_dict: bool, postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """:meth:`sample` converted to ``output_type`` and wrapped as a pipeline output (one chunk)."""
        images = self.sample(latents, predict, sampling, output_type, postprocess)
        images = images if output_type == "latent" else convert_images(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the pipeline's options, over ``iterable`` or for ``total`` manual updates (as
        diffusers' custom sampling loops use it)."""
        if iterable is None and total is None:
            raise LDMKitError("progress_bar needs an iterable or a total: progress_bar(timesteps) or "
                              "progress_bar(total=num_steps).")
        if iterable is not None:
            return tqdm(iterable, **self._progress_bar_config)
        return tqdm(total=total, **self._progress_bar_config)

    numpy_to_pil = staticmethod(numpy_to_pil)

    # ----------------------------------------------------------------- diffusers' pipeline config
    @property
    def config(self) -> FrozenDict:
        """diffusers' pipeline config: each component's ``(library, class name)``, the entries
        ``model_index.json`` holds, and ``_name_or_path`` for a loaded pipeline. Read when asked, so that it
        follows a swapped component (``pipe.scheduler = ...``)."""
        entries: dict[str, Any] = {name: component_entry(c) for name, c in self.components.items()}
        if self._name_or_path is not None:
            entries["_name_or_path"] = self._name_or_path
        return FrozenDict(entries)

    @property
    def name_or_path(self) -> str | os.PathLike | None:
        """What the pipeline was loaded from, as given to ``from_pretrained`` / ``from_single_file``."""
        return self._name_or_path

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DiffusionPipeline:
        """A ``cls`` that shares ``pipeline``'s components (no copy), as diffusers: a component passed by
        keyword replaces the shared one, and the new pipeline is cast to ``dtype`` (``torch_dtype``), float32
        by default, which casts the shared models of ``pipeline`` too. A component ``cls`` needs that
        ``pipeline`` lacks, or whose class does not fit ``cls`` (a text-to-image UNet for LDMPipeline), is an
        error that names it; pass a fitting one by keyword."""
        if cls is DiffusionPipeline:
            raise LDMKitError("from_pipe builds the pipeline class it is called on; call it on one, e.g. "
                              "LDMTextToImagePipeline.from_pipe(pipe).")
        if not isinstance(pipeline, DiffusionPipeline):
            raise LDMKitError(f"from_pipe takes a pipeline to share components with, got {type(pipeline).__name__}.")
        return build_from_pipe(cls, pipeline, kwargs)

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | str | dict | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        variant: str | None = None,
        **kwargs,
    ):
        """Load a pipeline folder (diffusers layout) or Hub id; ``model_index.json`` says which pipeline.

        Takes diffusers' loading keywords with their meaning (``ldmkit.loading.options``): ``dtype`` (or
        ``torch_dtype``): a dtype, or per component ``{"unet": torch.bfloat16, "default": torch.float32}``;
        ``variant`` (loaded by the components that have it, as diffusers), ``use_safetensors``,
        ``device_map`` ("cpu", "cuda", or "balanced": the accelerator if there is one), ``low_cpu_mem_usage``,
        ``disable_mmap``, and the Hub's ``force_download``, ``token``, ``proxies``; and ldmkit's
        ``cache_converted=True``: weights converted to another dtype are kept on disk and mapped by the next
        load instead of converted again (``ldmkit.loading.converted``). Other keywords are
        components, used as they are instead of being loaded (to share them).
        """
        return loader("from_pretrained")(cls, name_or_path, {
            "torch_dtype": torch_dtype, "revision": revision, "cache_dir": cache_dir,
            "local_files_only": local_files_only, "variant": variant, **kwargs})

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | dict | None = None,
        use_ema: bool | None = None,
        torch_dtype: torch.dtype | str | None = None,
        tokenizer=None,
        dtype: torch.dtype | str | None = None,
        original_config: str | os.PathLike | dict | None = None,
    ):
        """Load an original CompVis checkpoint (``.ckpt``, ``.safetensors`` or a bare state dict) with the
        ``config.yaml`` it was trained with (``config``, or diffusers' name for it, ``original_config``); the
        YAML says which pipeline (text-to-image, super-resolution, unconditional, class-conditional,
        inpainting).

        ``use_ema``: None samples with the EMA weights when the YAML enables EMA (its default) and the file
        has them, as the original scripts (``model.ema_scope()``); True requires them; False uses the live
        weights. ``dtype`` (or ``torch_dtype``) as in from_pretrained. ``tokenizer`` (text-to-image only):
        BERT's vocabulary (an LDMTokenizer or a folder); None fetches bert-base-uncased's, as the original.
        The scheduler is the original DDIM sampler.
        """
        if config is not None and original_config is not None:
            raise LDMKitError("from_single_file got both config= and original_config= (the same YAML); pass one.")
        return loader("from_single_file")(
            cls, path, config=original_config if config is None else config, use_ema=use_ema,
            torch_dtype=resolve_dtype(dtype, torch_dtype, f"{cls.__name__}.from_single_file"), tokenizer=tokenizer)

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str | None = None, push_to_hub: bool = False, **push_options) -> None:
        """Write the pipeline in the diffusers layout (diffusers' from_pretrained reads it): models as diffusers
        names their files, ``variant`` in the names (``diffusion_pytorch_model.fp16.safetensors``) and
        shards past ``max_shard_size``. ``push_to_hub=True`` then uploads the folder (``repo_id``, default
        the folder's name, ``commit_message``, ``private``, ``token``, ``create_pr``, as diffusers)."""
        upload = upload_after_save(folder, push_to_hub, push_options, type(self).__name__)
        loader("save_pretrained")(self, folder, safe_serialization=safe_serialization, variant=variant,
                                  max_shard_size=max_shard_size)
        if upload is not None:
            upload(Path(folder))

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None):
        """Upload the pipeline to the Hub as diffusers does: :meth:`save_pretrained` into a temporary folder,
        then huggingface_hub's ``create_repo`` and one ``upload_folder`` commit (every file or none). Offline
        (HF_HUB_OFFLINE) it refuses before saving anything. Returns huggingface_hub's CommitInfo (its URL)."""
        return push_saved(lambda d: self.save_pretrained(d, safe_serialization=safe_serialization, variant=variant),
                          repo_id, what=type(self).__name__, commit_message=commit_message, private=private,
                          token=token, create_pr=create_pr, subfolder=subfolder)
