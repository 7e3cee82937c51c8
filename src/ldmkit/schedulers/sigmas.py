"""Sigma (noise level) schedules and the shared state of the sigma-parameterised samplers.

In the notation of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364), a variance-preserving sample ``x_t = sqrt(a) x_0 + sqrt(1-a) eps`` is the
variance-exploding sample ``x_t / sqrt(a) = x_0 + sigma eps`` with ``sigma = sqrt((1 - a) / a)``.
The Euler, Heun and LMS samplers work on ``x_0 + sigma eps`` (so their input is scaled by
``1 / sqrt(sigma^2 + 1)`` before the network); DPM-Solver and UniPC use ``alpha_t = 1 / sqrt(sigma^2 + 1)``,
``sigma_t = sigma alpha_t`` and the half log-SNR ``lambda = log(alpha_t / sigma_t)`` (Lu et al. 2022).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerMixin, broadcast_to, check_num_inference_steps, spaced_timesteps
from .predictions import PREDICTION_TYPES

logger = logging.getLogger("ldmkit")


def training_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for every training step (ascending, float32)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0, ramp=None) -> np.ndarray:
    """Karras et al. 2022, eq. 5:
    ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``; ``ramp`` replaces the
    positions ``i/(n-1)`` (EDM's schedules)."""
    ramp = np.linspace(0, 1, n) if ramp is None else np.asarray(ramp)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma, from ``sigma_max`` down to ``sigma_min``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution ("Beta Sampling is All You Need",
    Lee et al. 2024). Needs scipy."""
    try:
        import scipy.stats
    except ImportError:
        raise LDMKitError("use_beta_sigmas needs scipy: pip install scipy") from None
    ppfs = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in ppfs])


def lu_lambda_sigmas(log_sigmas: np.ndarray, n: int) -> np.ndarray:
    """Sigmas evenly spaced in the half log-SNR lambda (Lu et al. 2022b, DPM-Solver++, "uniform logSNR"),
    between the ends of the training schedule; ``lambda = -log sigma`` here."""
    log_sigmas = np.flip(log_sigmas.copy())
    log_max, log_min = log_sigmas[0].item(), log_sigmas[-1].item()
    return np.exp(log_max + np.linspace(0, 1, n) * (log_min - log_max))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray, dtype=None) -> np.ndarray:
    """The (fractional) training timestep of each ``sigma``: linear interpolation in log sigma between the
    two neighbouring training sigmas (k-diffusion's ``sigma_to_t``). The weighting is in float64 unless ``dtype``
    says otherwise (diffusers' KDPM2 samplers weight their midpoint sigmas in float32)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    if dtype is not None:
        low_idx, high_idx = low_idx.astype(dtype), high_idx.astype(dtype)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def sigma_to_alpha_sigma_t(sigma, flow: bool = False):
    """``(alpha_t, sigma_t)`` of a VE sigma: ``alpha_t = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma alpha_t``
    (for rectified-flow sigmas: ``alpha_t = 1 - sigma``, ``sigma_t = sigma``)."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def flow_sigmas(num_train_timesteps: int, n: int, shift: float) -> np.ndarray:
    """Rectified-flow sigmas ``1 - linspace(1, 1/T)``, shifted by ``shift s / (1 + (shift - 1) s)``."""
    alphas = np.linspace(1, 1 / num_train_timesteps, n + 1)
    sigmas = 1.0 - alphas
    return np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()


def multistep_timesteps(num_train_timesteps: int, last_timestep: int, n: int, spacing: str,
                        steps_offset: int = 0, refuse_repeats: bool = True) -> np.ndarray:
    """The integer timesteps of DPM-Solver and UniPC: like :func:`base.spaced_timesteps` but ``linspace`` and
    ``leading`` divide ``[0, last_timestep)`` into ``n + 1`` points and drop the last (t = 0).

    Too many steps for the range repeat a timestep after rounding; the solver's step ``h = lambda_t - lambda_s``
    is then 0 and it divides by zero (diffusers 0.42.1 returns NaN images for 1000 linspace steps). That is
    an error here (unless ``refuse_repeats`` is off), naming the largest step count that works."""
    timesteps = _multistep_timesteps(num_train_timesteps, last_timestep, n, spacing, steps_offset)
    if refuse_repeats and not _distinct(timesteps):
        usable = n - 1
        while usable > 1 and not _distinct(_multistep_timesteps(num_train_timesteps, last_timestep, usable, spacing,
                                                                steps_offset)):
            usable -= 1
        raise LDMKitError(f"num_inference_steps={n} with timestep_spacing={spacing!r} repeats timesteps over "
                          f"{last_timestep} training steps, which these solvers cannot step over (they would "
                          f"divide by zero). Use at most {usable} steps.")
    return timesteps


def _distinct(timesteps: np.ndarray) -> bool:
    return len(np.unique(timesteps)) == len(timesteps) and not (timesteps < 0).any()


def _multistep_timesteps(num_train_timesteps: int, last_timestep: int, n: int, spacing: str,
                         steps_offset: int) -> np.ndarray:
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += steps_offset
        return timesteps
    if spacing == "trailing":
        timesteps = np.arange(last_timestep, 0, -num_train_timesteps / n).round().copy().astype(np.int64)
        timesteps -= 1
        return timesteps
    raise LDMKitError(f"Unknown timestep_spacing {spacing!r}; use linspace, leading or trailing.")


# The config options that replace the interpolated sigmas, in the order they take precedence.
ALTERNATIVE_SIGMAS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")


class SigmaSchedulerMixin(SchedulerMixin):
    """State shared by the samplers that walk a list of sigmas: ``sigmas`` (one more than ``timesteps``,
    ending at 0 or sigma_min), and ``step_index``, found from the first timestep given to ``step`` or set with
    ``set_begin_index`` (img2img starts part-way)."""

    # DPM-Solver / UniPC map a timestep not in the schedule to the last step; Euler-type samplers refuse it.
    _unknown_timestep_is_last = False

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """The index of the next step into ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step index, when set with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (call before the first step; pipelines do for img2img)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of ``timestep`` in the schedule; if it occurs twice (Heun's schedule), the second."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            if self._unknown_timestep_is_last:
                return len(self.timesteps) - 1
            raise LDMKitError(f"Timestep {float(timestep)} is not in {type(self).__name__}.timesteps. "
                              "Pass the values of scheduler.timesteps to step(), not loop indices.")
        return candidates[1 if len(candidates) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_not_index(self, timestep) -> None:
        if isinstance(timestep, int | torch.IntTensor | torch.LongTensor):
            raise LDMKitError(f"{type(self).__name__}.step() got an integer timestep {timestep}: pass one of "
                              "scheduler.timesteps (floats), not a loop index from enumerate(timesteps).")

    def _step_indices(self, timesteps: torch.Tensor, device, lookup: bool = False) -> list[int]:
        schedule = self.timesteps.to(device)
        timesteps = timesteps.to(device)
        if lookup or self.begin_index is None:
            return [self.index_for_timestep(t, schedule) for t in timesteps]
        if self.step_index is not None:
            return [self.step_index] * timesteps.shape[0]
        return [self.begin_index] * timesteps.shape[0]

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        """The v target ``alpha_t eps - sigma_t x_0`` at the noise levels of ``timesteps`` (values of this
        schedule). diffusers' EulerDiscreteScheduler indexes ``alphas_cumprod`` by step index here instead."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        sigma = broadcast_to(sigmas[self._step_indices(timesteps, sample.device, lookup=True)], sample)
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma)
        return alpha_t * noise - sigma_t * sample

    # -- the one argument check and the one schedule builder ---------------------------------------------

    _timestep_dtype = np.float32  # of the timesteps given to the network (int64 for DPM-Solver / UniPC)
    # The final sigma of a class without a final_sigmas_type field (DEIS always ends at sigma_min).
    _default_final_sigmas_type = "zero"
    _prediction_types = PREDICTION_TYPES

    def _init_sigma_scheduler(self, rescale_betas_zero_snr: bool = False) -> None:
        """The config checks every sigma scheduler makes, then the training noise schedule."""
        cfg = self.config
        self._check_sigma_options()
        self._check_prediction_type(self._prediction_types)
        if "final_sigmas_type" in self._config_fields() and cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise LDMKitError(f"Unknown final_sigmas_type {cfg.final_sigmas_type!r}; use zero or sigma_min.")
        self._init_noise_schedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                  cfg.trained_betas, rescale_betas_zero_snr)

    def _init_noise_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             rescale_betas_zero_snr=False) -> None:
        super()._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                     rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # Zero terminal SNR makes sigma_max infinite; keep it finite (the value diffusers uses).
            self.alphas_cumprod[-1] = 2**-24

    def _own(self, key: str):
        """A config value of this class's own fields; None for fields it does not take (a config built from
        another scheduler's keeps that scheduler's fields, which must not switch options on here)."""
        return self.config[key] if key in self._config_fields() else None

    def _sigma_option(self) -> str | None:
        """The config option that replaces the interpolated sigmas, if one is set."""
        return next((key for key in ALTERNATIVE_SIGMAS if self._own(key)), None)

    def _check_sigma_options(self) -> None:
        """At construction: at most one of the Karras / exponential / beta options (each is a whole schedule)."""
        chosen = [key for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if self._own(key)]
        if len(chosen) > 1:
            raise LDMKitError(f"Set at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                              f"(got {', '.join(chosen)}).")

    def _timestep_conflicts(self) -> list[str]:
        """The set options that choose the timesteps themselves, so that custom timesteps cannot be used."""
        return [key for key in ALTERNATIVE_SIGMAS if self._own(key)]

    def _steps_asked(self, num_inference_steps, num_train_timesteps: int | None = None, **custom) -> int:
        """The argument check of ``set_timesteps``; returns the number of sampling steps.

        Exactly one of ``num_inference_steps`` and the custom schedules the scheduler takes (``custom``:
        ``timesteps``, ``sigmas``) is given; custom timesteps do not go with an option that chooses the timesteps
        itself; a step count is an int in ``[1, num_train_timesteps]``. Custom ``sigmas`` end with the final sigma.
        """
        names = ["num_inference_steps", *custom]
        if custom and sum(value is not None for value in (num_inference_steps, *custom.values())) != 1:
            raise LDMKitError(f"Pass exactly one of {', '.join(names[:-1])} or {names[-1]} to set_timesteps.")
        if custom.get("timesteps") is not None:
            conflicts = self._timestep_conflicts()
            if conflicts:
                raise LDMKitError(f"Custom timesteps cannot be combined with {' / '.join(conflicts)}, which choose "
                                  f"the timesteps themselves: pass {' or '.join(k for k in names if k != 'timesteps')}"
                                  " instead, or turn the option off.")
            return len(custom["timesteps"])
        if custom.get("sigmas") is not None:
            return len(custom["sigmas"]) - 1
        return check_num_inference_steps(num_inference_steps, num_train_timesteps or self.config.num_train_timesteps)

    def _spaced_timesteps(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        """The scheduler's spacing rule: ``n`` float timesteps by ``timestep_spacing``."""
        cfg = self.config
        return spaced_timesteps(num_train_timesteps or cfg.num_train_timesteps, n, cfg.timestep_spacing,
                                cfg.steps_offset, dtype=self._timestep_dtype)

    def _sigma_schedule(self, n: int, timesteps=None, *, train=None, log_linear: bool = False,
                        bounds_from_training: bool = False, round_karras: bool = False,
                        final_from_schedule: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The sampling sigmas (``n`` and the final one, float64) and timesteps of every sigma scheduler:

        1. ``timesteps``: the caller's custom ones, else the spacing rule (:meth:`_spaced_timesteps`);
        2. sigmas interpolated there from the training sigmas (or a ``log_linear`` ramp between their ends);
        3. if the config sets one of :data:`ALTERNATIVE_SIGMAS`, that schedule instead, between the ends of the
           interpolated sigmas or (``bounds_from_training``) of the training sigmas, and its timesteps by
           :func:`sigma_to_t` (rounded for Karras and Lu lambdas with ``round_karras``);
        4. the final sigma: 0, or for ``final_sigmas_type='sigma_min'`` the smallest training sigma (the last
           alternative sigma with ``final_from_schedule``).

        ``train`` stands in for the training sigmas (UniPC's custom sigmas).
        """
        if timesteps is None:
            timesteps = self._spaced_timesteps(n)
        else:
            timesteps = np.array(timesteps).astype(self._timestep_dtype)
        train = training_sigmas(self.alphas_cumprod) if train is None else np.asarray(train)
        log_sigmas = np.log(train)
        if log_linear:  # as diffusers computes it: n + 1 points
            sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        option = self._sigma_option()
        if option is None:
            return np.concatenate([sigmas, [self._final_sigma()]]), timesteps
        sigmas = self._alternative_sigmas(option, np.flip(train).copy() if bounds_from_training else sigmas,
                                          log_sigmas, n)
        timesteps = sigma_to_t(sigmas, log_sigmas)
        if round_karras and option in ("use_karras_sigmas", "use_lu_lambdas"):
            timesteps = timesteps.round()
        final = self._final_sigma(sigmas if final_from_schedule else None)
        return np.concatenate([sigmas, [final]]), timesteps

    def _alternative_sigmas(self, option: str, in_sigmas: np.ndarray, log_sigmas: np.ndarray, n: int):
        if option == "use_lu_lambdas":
            return lu_lambda_sigmas(log_sigmas, n)
        # sigma_min / sigma_max from the config where set (diffusers reads them from any config that has them),
        # else the ends of in_sigmas (descending).
        sigma_min, sigma_max = self.config.get("sigma_min"), self.config.get("sigma_max")
        sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
        schedule = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                    "use_beta_sigmas": beta_sigmas}[option]
        return schedule(sigma_min, sigma_max, n)

    def _final_sigma(self, schedule=None):
        """0, or for ``final_sigmas_type='sigma_min'`` the last of ``schedule`` or the smallest training sigma."""
        if (self._own("final_sigmas_type") or self._default_final_sigmas_type) != "sigma_min":
            return 0
        if schedule is not None:
            return schedule[-1]
        return ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5

    def _set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray, device) -> None:
        """Store a schedule from :meth:`_sigma_schedule` (sigmas stay on the CPU: the steps index them there)."""
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        torch_dtype = {np.int64: torch.int64, np.float64: torch.float64}.get(self._timestep_dtype, torch.float32)
        if torch_dtype == torch.float64 and device is not None and torch.device(device).type == "mps":
            torch_dtype = torch.float32  # MPS has no float64 (diffusers falls back the same way)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch_dtype)
        self.num_inference_steps = len(timesteps)
        self._reset_step_index()


class VESigmaMixin(SigmaSchedulerMixin):
    """Euler, Heun, LMS: the sample lives at scale ``x_0 + sigma eps``."""

    _prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")

    @property
    def init_noise_sigma(self):
        """Standard deviation of the starting noise: ``sigma_max`` (or ``sqrt(sigma_max^2 + 1)`` for
        ``leading`` spacing, whose first step is below the noisiest training step)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Divide by ``sqrt(sigma^2 + 1)``: the network expects the variance-preserving ``x_t``."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def _warn_if_unscaled(self) -> None:
        if not self.is_scale_input_called:
            logger.warning("%s: call scale_model_input before step, or the model sees unscaled inputs.",
                           type(self).__name__)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``x_0 + sigma eps`` at the sigmas of ``timesteps`` (which must be in the current schedule)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._step_indices(timesteps, original_samples.device)], original_samples)
        return original_samples + noise * sigma


class VPSigmaMixin(SigmaSchedulerMixin):
    """DPM-Solver, UniPC: the sample stays variance-preserving; sigmas only parameterise the steps."""

    _unknown_timestep_is_last = True
    _timestep_dtype = np.int64

    def _alpha_sigma(self, sigma):
        return sigma_to_alpha_sigma_t(sigma, flow=bool(self.config.get("use_flow_sigmas")))

    def _lambda(self, sigma):
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return torch.log(alpha_t) - torch.log(sigma_t)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x_0 + sigma_t eps`` at the sigmas of ``timesteps`` (which must be in the schedule)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._step_indices(timesteps, original_samples.device)], original_samples)
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
