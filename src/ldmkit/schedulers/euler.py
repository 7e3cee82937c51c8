"""Euler and Euler-ancestral samplers of the probability-flow ODE / reverse SDE in sigma space
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1-2;
the ancestral variant is k-diffusion's ``sample_euler_ancestral``)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, randn
from .predictions import ve_denoised
from .sigmas import VESigmaMixin, sigma_to_t, training_sigmas


def to_d(sample, denoised, sigma):
    """The ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, Alg. 1 line 4)."""
    return (sample - denoised) / sigma


def churn_gamma(sigma, s_churn: float, num_steps: int, s_tmin: float, s_tmax: float) -> float:
    """Stochastic "churn" factor (Karras et al. 2022, Alg. 2 line 4):
    ``gamma = min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]``, else 0."""
    return min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def ancestral_step_sigmas(sigma_from, sigma_to, clamp: bool = False):
    """Split the step ``sigma_from -> sigma_to`` into a deterministic step down to ``sigma_down`` and fresh
    noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` (k-diffusion
    ``get_ancestral_step``, eta = 1: the DDPM posterior in sigma space). ``clamp`` keeps ``sigma_up <= sigma_to``
    against rounding, as k-diffusion and diffusers' DPM-Solver SDE do (Euler and KDPM2 ancestral do not)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if clamp:
        sigma_up = torch.minimum(sigma_to, sigma_up)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


class ChurnEulerMixin(VESigmaMixin):
    """The Euler step with Karras' stochastic churn, shared by Euler and EDM Euler, which differ only in the
    denoiser ``D(x; sigma)`` (:meth:`_denoise`)."""

    def _denoise(self, model_output, sample, sigma, sigma_hat):
        raise NotImplementedError

    def _churn_step(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                    return_dict, denoised=None) -> SchedulerOutput | tuple:
        """One Euler step ``x + (x - D(x)) / sigma_hat * (sigma_next - sigma_hat)``; with ``s_churn > 0``
        noise first raises sigma to ``sigma_hat = sigma (1 + gamma)`` (Karras et al. 2022, Alg. 2). A given
        ``denoised`` replaces the model's."""
        self._check_not_index(timestep)
        self._warn_if_unscaled()
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        gamma = churn_gamma(sigma, s_churn, len(self.sigmas) - 1, s_tmin, s_tmax)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                          generator=generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        if denoised is None:
            denoised = self._denoise(model_output, sample, sigma, sigma_hat)
        derivative = to_d(sample, denoised, sigma_hat)
        prev_sample = sample + derivative * (self.sigmas[self.step_index + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


class EulerDiscreteScheduler(ChurnEulerMixin):
    """Euler steps of the probability-flow ODE, optionally with Karras' stochastic churn (``s_churn``).

    Same config fields, defaults and results as diffusers' ``EulerDiscreteScheduler``.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self.register_config(locals())
        if interpolation_type not in ("linear", "log_linear"):
            raise LDMKitError(f"Unknown interpolation_type {interpolation_type!r}; use linear or log_linear.")
        self._init_sigma_scheduler(rescale_betas_zero_snr)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        T = num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(0, T - 1, T)[::-1].copy())
        self.num_inference_steps = None
        if self._continuous_timesteps:
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas])
        else:
            self.timesteps = timesteps.to(torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False
        self._reset_step_index()

    @property
    def _continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None) -> None:
        """Choose the sampling sigmas: ``num_inference_steps`` by ``timestep_spacing`` (and the Karras /
        exponential / beta option), or explicit ``timesteps``, or explicit ``sigmas`` (ending with the final
        sigma)."""
        n = self._steps_asked(num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        if sigmas is not None:  # the whole schedule, final sigma included
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], np.log(training_sigmas(self.alphas_cumprod)))
        else:
            sigmas, timesteps = self._sigma_schedule(n, timesteps,
                                                     log_linear=self.config.interpolation_type == "log_linear")
        self._set_schedule(sigmas, timesteps, device)
        if self._continuous_timesteps:
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in self.sigmas[:-1]]).to(device=device)

    def _timestep_conflicts(self) -> list[str]:
        return super()._timestep_conflicts() + (["timestep_type='continuous'"] if self._continuous_timesteps else [])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler step (churn with ``s_churn > 0``): :meth:`ChurnEulerMixin._churn_step`."""
        return self._churn_step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict)

    def _denoise(self, model_output, sample, sigma, sigma_hat):
        pt = self.config.prediction_type
        return ve_denoised(model_output, sample, sigma_hat if pt == "epsilon" else sigma, pt)


class EulerAncestralDiscreteScheduler(VESigmaMixin):
    """Ancestral Euler sampling: an Euler step to ``sigma_down`` plus fresh noise of std ``sigma_up``.

    Same config fields, defaults and results as diffusers' ``EulerAncestralDiscreteScheduler`` (which also
    draws noise at the last step, scaled by ``sigma_up = 0``; so does this one, to keep generators in sync).
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.register_config(locals())
        self._init_sigma_scheduler(rescale_betas_zero_snr)
        sigmas = np.concatenate([training_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.num_inference_steps = None
        T = num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T)[::-1].copy())
        self.is_scale_input_called = False
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps by ``timestep_spacing`` and their interpolated sigmas."""
        self._set_schedule(*self._sigma_schedule(self._steps_asked(num_inference_steps)), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Euler step to ``sigma_down``, then add ``sigma_up`` noise drawn from ``generator``."""
        self._check_not_index(timestep)
        self._warn_if_unscaled()
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        denoised = ve_denoised(model_output, sample, sigma, self.config.prediction_type)
        sigma_up, sigma_down = ancestral_step_sigmas(sigma, self.sigmas[self.step_index + 1])
        prev_sample = sample + to_d(sample, denoised, sigma) * (sigma_down - sigma)
        noise = randn(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                      generator=generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
