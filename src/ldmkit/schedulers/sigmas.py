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
from .base import SchedulerMixin, broadcast_to

logger = logging.getLogger("ldmkit")


def training_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for every training step (ascending, float32)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5:
    ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    ramp = np.linspace(0, 1, n)
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


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each ``sigma``: linear interpolation in log sigma between the
    two neighbouring training sigmas (k-diffusion's ``sigma_to_t``)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
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

    def _sigma_bounds(self, in_sigmas) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` for the Karras / exponential / beta schedules: the config's values
        where the scheduler has them and they are set, else the ends of ``in_sigmas`` (descending)."""
        sigma_min = self.config.get("sigma_min")
        sigma_max = self.config.get("sigma_max")
        sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
        return sigma_min, sigma_max

    def _check_sigma_options(self) -> None:
        flags = [self.config.get(k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                      "use_beta_sigmas")]
        if sum(bool(f) for f in flags) > 1:
            raise LDMKitError("Set at most one of use_karras_sigmas, use_exponential_sigmas, "
                              "use_beta_sigmas.")

    def _alternative_sigmas(self, in_sigmas, n: int):
        """Karras / exponential / beta sigmas if the config asks for one, else None."""
        if self.config.get("use_karras_sigmas"):
            return karras_sigmas(*self._sigma_bounds(in_sigmas), n)
        if self.config.get("use_exponential_sigmas"):
            return exponential_sigmas(*self._sigma_bounds(in_sigmas), n)
        if self.config.get("use_beta_sigmas"):
            return beta_sigmas(*self._sigma_bounds(in_sigmas), n)
        return None


class VESigmaMixin(SigmaSchedulerMixin):
    """Euler, Heun, LMS: the sample lives at scale ``x_0 + sigma eps``."""

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
