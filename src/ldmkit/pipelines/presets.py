"""Named sampler choices and run presets, shared by the CLI and the server.

A preset is what a user means by "fast" or "exact": the dtype, the sampler, the step count, and the
fast-path switches. ``exact`` is fp32 with the model's own scheduler (the parity contract); ``fast`` is what
the CLI's ``--fast`` and the server use by default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .. import schedulers
from ..errors import LDMKitError
from ..hardware import auto_dtype
from .pipeline_utils import DiffusionPipeline

# sampler names (CLI --scheduler, server "scheduler") -> (class name, config overrides)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm-sde": ("DPMSolverSDEScheduler", {}),  # "dpm++sde" above is DPM-Solver++(2M) SDE
    "dpm-sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    # EDMEulerScheduler is left out: it samples EDM-preconditioned models, which no ldmkit pipeline holds.
}


@dataclass(frozen=True)
class Preset:
    """What a preset sets. ``None`` means "leave it as the model / the command has it"."""

    name: str
    dtype: str | dict                # "auto" (ldmkit.hardware.auto_dtype), "fp32", ...; per component a dict
    sampler: str | None              # a SAMPLERS name, or None for the model's own scheduler
    num_inference_steps: int | None  # None: the command's own default
    cache_interval: int = 1          # feature cache (DeepCache): 1 = off, N = one full UNet step in N
    cache_schedule: str = "uniform"  # "uniform" or "quadratic" (pipelines/feature_cache.py)
    guidance_interval: tuple[float, float] | None = None  # sigma range guided (denoising.Guidance); None: all


PRESETS = {
    "exact": Preset("exact", dtype="fp32", sampler=None, num_inference_steps=None),
    # Chosen by benchmarks/bench_emoji_fastpath.py (results/emoji-fastpath.json, 100 training captions of the
    # bundled emoji model): DPM-Solver++(2M) Karras (Lu et al., 2022) at 12 steps, the feature cache at 2
    # (uniform: the quadratic placement measured worse) and guidance only below sigma 5 (Kynkaenniemi et al.,
    # 2024): top-1 91 % / top-5 97 %, the same as exact 50-step DDIM, at 21 full UNet rows per image against
    # 100; RMS pixel distance to a 250-step reference 0.012 (exact DDIM-50: 0.005; this at 20 steps: 0.009).
    # 10 steps keep the retrieval (top-1 92 / top-5 96) but drift further (RMS 0.017), and save too little to
    # reach the 10x target either: one image, whole process, one core, is 7.9-9.2x diffusers' seed call on the
    # full-size layout depending on the CPU (benchmarks/bench_text2img.py). --steps 20 buys more fidelity.
    "fast": Preset("fast", dtype="auto", sampler="dpm++2m-karras", num_inference_steps=12, cache_interval=2,
                   cache_schedule="uniform", guidance_interval=(0.0, 5.0)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LDMKitError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


def set_sampler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for the named sampler, built from the model's scheduler config."""
    if name is None:
        return
    if name not in SAMPLERS:
        raise LDMKitError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}.")
    class_name, overrides = SAMPLERS[name]
    pipe.scheduler = getattr(schedulers, class_name).from_config(pipe.scheduler.config, **overrides)


def apply_preset(pipe, name: str | Preset) -> dict:
    """Configure ``pipe`` in place for the preset (a name, or a :class:`Preset` with the command's overrides
    applied) and return the ``__call__`` keyword defaults it implies (the caller's own explicit arguments
    should override them). The dtype is the loader's business: :func:`load_pipeline`."""
    preset = get_preset(name) if isinstance(name, str) else name
    set_sampler(pipe, preset.sampler)
    if getattr(pipe, "unet", None) is not None:
        if preset.cache_interval > 1:
            pipe.enable_feature_cache(interval=preset.cache_interval, schedule=preset.cache_schedule)
        else:
            pipe.disable_feature_cache()
    kwargs = {}
    if preset.num_inference_steps is not None:
        kwargs["num_inference_steps"] = preset.num_inference_steps
    if preset.guidance_interval is not None and "guidance_interval" in inspect.signature(pipe.__call__).parameters:
        kwargs["guidance_interval"] = preset.guidance_interval
    return kwargs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LDMKitError("--device cuda, but this PyTorch sees no CUDA GPU; use --device cpu (or auto).")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LDMKitError("--device mps, but MPS is not available here; use --device cpu (or auto).")
    return torch.device(name)


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a name means on ``device``: "auto" is what the hardware runs fast (ldmkit.hardware)."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPE_NAMES:
        raise LDMKitError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[name]


def load_pipeline(name_or_path, device: torch.device, dtype: str | dict) -> DiffusionPipeline:
    """Load straight onto ``device`` in ``dtype`` (a name as the CLI's --dtype, or one per component): "auto"
    is decided per network, so an autoencoder that overflows float16 on a GPU gets bfloat16 or float32.
    Weights converted to another dtype are kept on disk and mapped by the next load
    (``ldmkit.loading.converted``; ``LDMKIT_CONVERTED_CACHE=off`` turns that off)."""
    return DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, device_map=device,
                                             cache_converted=True)


def dtype_names(pipe, others: dict[str, torch.dtype] | None = None) -> str | dict:
    """The dtypes ``pipe``'s networks (and ``others``: networks of the run that ``pipe`` no longer holds, as the
    text encoder of ``staged.encode_then_load``) run in, as names: one when they agree, else one per component
    (what ``load_pipeline`` takes back, to replay a run)."""
    short = {v: k for k, v in DTYPE_NAMES.items()}
    dtypes = {name: c.dtype for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    names = {name: short.get(d, str(d).replace("torch.", "")) for name, d in {**dtypes, **(others or {})}.items()}
    return names.popitem()[1] if len(set(names.values())) == 1 else names
