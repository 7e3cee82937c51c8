"""What every scheduler shares: the noise schedule, loading and saving, noise drawing, small maths.

The training noise schedule is the variance-preserving one of DDPM (Ho et al. 2020):
``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)`` with
``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (their eq. 4). Everything here is a pure function of tensors
except :class:`SchedulerMixin`, which keeps the per-object state (``betas``, ``alphas_cumprod``,
``timesteps``) and the config.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..configuration import DIFFUSERS_LAYOUT_VERSION, ConfigMixin, FrozenDict
from ..errors import LDMKitError
from ..loading.hub import resolve_folder
from ..randomness import randn_tensor as randn  # noqa: F401  (the one noise-drawing function; used by the steps)
from ..registry import COMPONENTS
from .predictions import PREDICTION_TYPES, bad_prediction_type

logger = logging.getLogger("ldmkit")

# The names diffusers lists as interchangeable (KarrasDiffusionSchedulers). The ones ldmkit has are
# returned by ``compatibles``; the others are accepted in ``_class_name`` without complaint.
KARRAS_DIFFUSION_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)

# Filled by SchedulerMixin.__init_subclass__: class name -> class, for ``compatibles`` and quiet from_config.
_REGISTRY: dict[str, type] = {}


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (the next, less noisy sample) and, where the scheduler
    forms one, ``pred_original_sample`` (the model's current estimate of x_0).

    Like diffusers' outputs it also unpacks as a tuple of its non-None fields (``out[0]``).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, index):
        if isinstance(index, str):
            return getattr(self, index)
        return self.to_tuple()[index]

    def __iter__(self):
        return iter(self.to_tuple())


# Diffusers' per-scheduler output class names, for code that imports them by name.
DDIMSchedulerOutput = DDPMSchedulerOutput = SchedulerOutput


# ---------------------------------------------------------------------------------------------------------
# Noise schedules (betas)
# ---------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> torch.Tensor:
    """Betas that discretise a continuous ``alpha_bar(t)``, ``t`` in [0, 1]:
    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``.

    ``cosine`` is the schedule of Nichol & Dhariwal 2021 (Improved DDPM, eq. 17, s = 0.008).
    """
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise LDMKitError(f"Unknown alpha_transform_type {alpha_transform_type!r}; "
                          "use cosine, laplace or exp.")
    T = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "exp", "sigmoid")


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> torch.Tensor:
    """The training betas (float32), as diffusers builds them.

    * ``linear``: DDPM (Ho et al. 2020, sec. 4), betas evenly spaced from beta_start to beta_end.
    * ``scaled_linear``: the schedule of the CompVis latent diffusion / Stable Diffusion code: square roots
      evenly spaced, then squared.
    * ``squaredcos_cap_v2``: the cosine schedule of Improved DDPM.
    * ``trained_betas``: an explicit list, overriding the rest.
    """
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule in ("laplace", "exp"):
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type=beta_schedule)
    if beta_schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps))
        return ramp * (beta_end - beta_start) + beta_start
    raise LDMKitError(f"Unknown beta_schedule {beta_schedule!r}; use one of {', '.join(BETA_SCHEDULES)} "
                      "or pass trained_betas.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale ``sqrt(alpha_bar)`` so that the last step has zero SNR (pure noise) while the first
    keeps its value (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1).
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------------------
# Inference timesteps
# ---------------------------------------------------------------------------------------------------------

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    """Validate a step count: an int in [1, num_train_timesteps]."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise LDMKitError(f"num_inference_steps must be an int, got {num_inference_steps!r} "
                          f"({type(num_inference_steps).__name__}). Pass e.g. num_inference_steps=50.")
    n = int(num_inference_steps)
    if n < 1:
        raise LDMKitError(f"num_inference_steps must be at least 1, got {n}. Pass a positive step count.")
    if n > num_train_timesteps:
        raise LDMKitError(f"num_inference_steps={n} exceeds num_train_timesteps={num_train_timesteps}: the "
                          f"model was trained on {num_train_timesteps} noise levels. "
                          f"Use at most {num_train_timesteps} steps.")
    return n


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0,
                     dtype=np.int64) -> np.ndarray:
    """The descending inference timesteps for a spacing rule (Lin et al. 2024, Table 2).

    * ``leading``: ``0, k, 2k, ...`` with ``k = T // n``, plus ``steps_offset`` (DDIM/LDM code used offset 1).
    * ``trailing``: ``T-1, T-1-k, ...`` with ``k = T / n`` (reaches the last, noisiest training step).
    * ``linspace``: ``n`` evenly spaced points from 0 to T-1, rounded.

    ``dtype=np.float32`` gives the float timesteps of the sigma-based (Karras-style) schedulers, which
    diffusers computes without rounding for ``linspace`` (``np.float64`` those of DPM-Solver SDE).
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        if dtype == np.int64:
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, n, dtype=dtype)[::-1].copy()
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(dtype)
        timesteps += steps_offset
        return timesteps
    if spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(dtype)
        timesteps -= 1
        return timesteps
    raise LDMKitError(f"Unknown timestep_spacing {spacing!r}; use one of {', '.join(TIMESTEP_SPACINGS)}.")


# ---------------------------------------------------------------------------------------------------------
# Thresholding and forward diffusion (model output conversions: predictions.py)
# ---------------------------------------------------------------------------------------------------------

def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, ``s`` is the ``ratio``
    quantile of ``|x0|`` clamped to [1, max_value]; ``x0`` is clipped to [-s, s] and divided by ``s``."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()  # quantile needs float; clamp has no CPU half kernel
    flat = x0.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-batch values shaped to broadcast against ``like`` ([B] -> [B, 1, 1, ...])."""
    values = values.flatten()
    while values.ndim < like.ndim:
        values = values.unsqueeze(-1)
    return values


def q_sample(alphas_cumprod: torch.Tensor, original: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``
    (Ho et al. 2020, eq. 4)."""
    a = alphas_cumprod.to(device=original.device, dtype=original.dtype)
    timesteps = timesteps.to(original.device)
    return broadcast_to(a[timesteps] ** 0.5, original) * original + broadcast_to((1 - a[timesteps]) ** 0.5,
                                                                                 original) * noise


def velocity(alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0``
    (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
    a = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    timesteps = timesteps.to(sample.device)
    return broadcast_to(a[timesteps] ** 0.5, sample) * noise - broadcast_to((1 - a[timesteps]) ** 0.5,
                                                                            sample) * sample


# ---------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------


class SchedulerMixin(ConfigMixin):
    """Base of all schedulers: config, loading/saving, the training noise schedule, forward diffusion.

    Subclasses set ``betas``/``alphas``/``alphas_cumprod`` with :meth:`_init_noise_schedule`, and provide
    ``set_timesteps`` and ``step``. ``order`` is the number of model evaluations per step (2 for Heun),
    ``init_noise_sigma`` the standard deviation of the starting noise, ``timesteps`` the descending schedule.
    """

    config_name = "scheduler_config.json"
    _compatibles: tuple[str, ...] = KARRAS_DIFFUSION_SCHEDULERS
    order = 1
    init_noise_sigma = 1.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # concrete schedulers, not the shared mixins
            _REGISTRY[cls.__name__] = cls
            COMPONENTS.add(("diffusers", cls.__name__), cls)  # model_index.json names them as diffusers does

    # -- noise schedule ---------------------------------------------------------------------------------

    def _init_noise_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             rescale_betas_zero_snr=False) -> None:
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion to the given (training) timesteps, one per batch element."""
        return q_sample(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction training target for clean ``sample`` and ``noise`` at ``timesteps``."""
        return velocity(self.alphas_cumprod, sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: only the sigma-parameterised schedulers rescale the model input."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _check_prediction_type(self, allowed=PREDICTION_TYPES) -> None:
        if self.config.prediction_type not in allowed:
            raise bad_prediction_type(self.config.prediction_type, allowed)

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 after dynamic thresholding (``thresholding``) or clipping to ``clip_sample_range``
        (``clip_sample``), for the schedulers that have both options (DDIM, DDPM)."""
        cfg = self.config
        if cfg.thresholding:
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise LDMKitError(f"{type(self).__name__}.step() called before set_timesteps(). "
                              "Call scheduler.set_timesteps(num_inference_steps) first.")

    # -- compatibility ----------------------------------------------------------------------------------

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that can be built from this one's config (``Other.from_config(config)``)."""
        names = {type(self).__name__, *self._compatibles}
        return [cls for name, cls in _REGISTRY.items() if name in names]

    @classmethod
    def _split_config(cls, config: Mapping) -> tuple[dict, dict]:
        accepted, unknown = super()._split_config(config)
        # Fields of compatible schedulers (e.g. DDIM's clip_sample given to Euler) are expected when swapping
        # schedulers, as in diffusers: ignore them quietly. Anything else still warns (EDMEuler, compatible
        # with none, names the noise-schedule fields of an LDM config it ignores, as diffusers does).
        sibling = set()
        for name, other in _REGISTRY.items():
            if other is not cls and name in cls._compatibles:
                sibling.update(other._config_fields())
        quiet = {k: v for k, v in unknown.items() if k in sibling}
        if quiet:
            logger.debug("%s ignores config keys of other schedulers: %s", cls.__name__,
                         ", ".join(sorted(quiet)))
        return accepted, {k: v for k, v in unknown.items() if k not in sibling}

    @classmethod
    def from_config(cls, config: Mapping | None = None, **overrides):
        """Build from a config (e.g. ``other_scheduler.config``), with keyword overrides, as diffusers does:

        * fields the source config only had at its class's default (listed in ``_use_default_values``) are
          not passed on, so ``Euler.from_config(ddim.config)`` for a DDIM config that never chose a
          ``timestep_spacing`` uses Euler's own default (``linspace``), not DDIM's (``leading``);
        * fields this class does not take stay in its config, so DDIM -> Euler -> DDIM keeps
          ``clip_sample=False`` and ``set_alpha_to_one=False``.
        """
        config = dict(config or {})
        defaulted = set(config.pop("_use_default_values", ()))
        config = {k: v for k, v in config.items() if k not in defaulted}
        config.update(overrides)
        scheduler = super().from_config(config)
        own = set(cls._config_fields())
        kept = {k: v for k, v in config.items() if k not in own and not k.startswith("_")}
        unset = sorted(own - set(config))
        if unset:
            kept["_use_default_values"] = unset
        scheduler._internal_config = FrozenDict({**kept, **scheduler.config})
        return scheduler

    def config_to_json(self) -> str:
        # The defaults marker is in-memory bookkeeping; diffusers does not write it either.
        data = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
        data.update({k: v for k, v in self.config.items() if k != "_use_default_values"})
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _config_fields(cls) -> list[str]:
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    # -- loading and saving -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, **overrides):
        """Load ``scheduler_config.json`` from a folder or Hub repo (e.g. ``subfolder="scheduler"``).

        Keyword ``overrides`` replace config values, e.g. ``from_pretrained(repo, subfolder="scheduler",
        timestep_spacing="trailing")``.
        """
        pattern = cls.config_name if subfolder is None else f"{subfolder}/{cls.config_name}"
        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, allow_patterns=[pattern])
        if subfolder:
            folder = folder / subfolder
        config = cls.load_config(folder)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``scheduler_config.json`` (readable by diffusers' ``from_pretrained``)."""
        self.save_config(folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config_to_json()})"
