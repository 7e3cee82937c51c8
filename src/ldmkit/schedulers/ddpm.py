"""DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239),
with the learned variances of Nichol & Dhariwal 2021, "Improved DDPM" (arXiv:2102.09672)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import (
    SchedulerMixin,
    SchedulerOutput,
    check_num_inference_steps,
    randn,
    spaced_timesteps,
)
from .predictions import alpha_sigma, to_x0

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")


def posterior_mean(x0, sample, alpha_prod_t, alpha_prod_t_prev):
    """Mean of ``q(x_prev | x_t, x_0)`` (Ho et al. 2020, eq. 7):
    ``mu = sqrt(a_prev) beta_t / (1 - a_t) x_0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t``,
    with ``alpha_t = a_t / a_prev`` and ``beta_t = 1 - alpha_t`` (the step between possibly skipped
    timesteps)."""
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    beta_prod_t = 1 - alpha_prod_t
    x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    sample_coeff = current_alpha_t ** (0.5) * (1 - alpha_prod_t_prev) / beta_prod_t
    return x0_coeff * x0 + sample_coeff * sample


def posterior_variance(alpha_prod_t, alpha_prod_t_prev):
    """``beta_tilde = (1 - a_prev) / (1 - a_t) beta_t`` (Ho et al. 2020, eq. 7), clamped away from 0, and
    ``beta_t`` itself: the two fixed choices of sec. 3.2 ("fixed_small" and "fixed_large")."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    small = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    return small, current_beta_t


def ddpm_noise_std(variance_type, small, large, predicted_variance=None):
    """The standard deviation multiplying the noise ``z`` in ``x_prev = mu + sigma z`` (Ho et al. eq. 11).

    ``learned_range`` interpolates the log variance between ``beta_tilde`` and ``beta`` with the model's
    output ``v`` in [-1, 1] (Nichol & Dhariwal 2021, eq. 15); ``learned`` takes the model output as the
    variance itself (as diffusers does).
    """
    if variance_type == "fixed_small":
        return small**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(small))
    if variance_type == "fixed_large":
        return large**0.5
    if variance_type == "fixed_large_log":
        return torch.exp(0.5 * torch.log(large))
    if variance_type == "learned":
        return predicted_variance**0.5
    if variance_type == "learned_range":
        frac = (predicted_variance + 1) / 2
        log_variance = frac * torch.log(large) + (1 - frac) * torch.log(small)
        return torch.exp(0.5 * log_variance)
    raise LDMKitError(f"Unknown variance_type {variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}.")


class DDPMScheduler(SchedulerMixin):
    """Ancestral DDPM sampling and the training-time forward process (``add_noise``, ``get_velocity``).

    Same config fields, defaults and results as diffusers' ``DDPMScheduler``. With a ``learned`` or
    ``learned_range`` variance the model outputs twice the sample's channels: prediction, then variance.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.register_config(locals())
        self._check_prediction_type()
        if variance_type is None:  # e.g. from a DPM-Solver config; diffusers then uses fixed_small
            variance_type = "fixed_small"
        if variance_type not in VARIANCE_TYPES:
            raise LDMKitError(f"Unknown variance_type {variance_type!r}; "
                              f"use one of {', '.join(VARIANCE_TYPES)}.")
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``, or an
        explicit descending list ``timesteps``."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise LDMKitError("Pass either num_inference_steps or timesteps to set_timesteps, not both.")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if not timesteps:
                raise LDMKitError("timesteps is empty; pass at least one timestep.")
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise LDMKitError(f"timesteps must be strictly descending, got {timesteps}.")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise LDMKitError(f"timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), "
                                  f"got {timesteps}.")
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
            self.timesteps = torch.from_numpy(np.array(timesteps, dtype=np.int64)).to(device)
            return
        n = check_num_inference_steps(num_inference_steps, T)
        self.num_inference_steps = n
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(
            spaced_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset)).to(device)

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the sampling schedule (-1 after the last; ``t - 1`` before
        ``set_timesteps``)."""
        t = int(timestep)
        if self.custom_timesteps or self.num_inference_steps:
            schedule = self.timesteps.tolist()
            if t not in schedule:
                raise LDMKitError(f"Timestep {t} is not in this scheduler's timesteps; "
                                  "pass one of scheduler.timesteps.")
            index = schedule.index(t)
            return -1 if index == len(schedule) - 1 else schedule[index + 1]
        return t - 1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step ``x_prev = mu(x_t, x_0) + sigma_t z`` (Ho et al. 2020, Algorithm 2);
        no noise is added at ``t = 0``."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        variance_type = self.variance_type
        if variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != sample.shape[1] * 2:
                raise LDMKitError(f"variance_type={variance_type!r} needs a model output with twice the "
                                  f"sample's channels ({2 * sample.shape[1]}), got {model_output.shape[1]}. "
                                  "Use a fixed variance_type for a model that predicts only noise.")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        x0 = to_x0(model_output, sample, *alpha_sigma(alpha_prod_t), self.config.prediction_type)
        x0 = self._clip_x0(x0)

        prev_sample = posterior_mean(x0, sample, alpha_prod_t, alpha_prod_t_prev)
        if t > 0:
            noise = randn(model_output.shape, generator=generator, device=model_output.device,
                          dtype=model_output.dtype)
            small, large = posterior_variance(alpha_prod_t, alpha_prod_t_prev)
            std = ddpm_noise_std(variance_type, small, large, predicted_variance)
            prev_sample = prev_sample + std * noise

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
