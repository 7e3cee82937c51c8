"""Euler and Euler-ancestral samplers of the probability-flow ODE / reverse SDE in sigma space
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1-2;
the ancestral variant is k-diffusion's ``sample_euler_ancestral``)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, check_num_inference_steps, randn, spaced_timesteps
from .sigmas import VESigmaMixin, sigma_to_t, training_sigmas

VE_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")


def ve_denoised(model_output, sample, sigma, prediction_type: str):
    """The denoiser ``D(x; sigma)`` (x_0 estimate) of a sample ``x = x_0 + sigma eps`` given the network's
    output on the scaled input ``x / sqrt(sigma^2 + 1)`` (Karras et al. 2022, Table 1, VP column)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise LDMKitError(f"Unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample.")


def to_d(sample, denoised, sigma):
    """The ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, Alg. 1 line 4)."""
    return (sample - denoised) / sigma


def churn_gamma(sigma, s_churn: float, num_steps: int, s_tmin: float, s_tmax: float) -> float:
    """Stochastic "churn" factor (Karras et al. 2022, Alg. 2 line 4):
    ``gamma = min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]``, else 0."""
    return min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def ancestral_step_sigmas(sigma_from, sigma_to):
    """Split the step ``sigma_from -> sigma_to`` into a deterministic step down to ``sigma_down`` and fresh
    noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` (k-diffusion
    ``get_ancestral_step``, eta = 1: the DDPM posterior in sigma space)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def _check_ve_prediction_type(prediction_type):
    if prediction_type not in VE_PREDICTION_TYPES:
        raise LDMKitError(f"Unknown prediction_type {prediction_type!r}; use epsilon, v_prediction, sample.")


class EulerDiscreteScheduler(VESigmaMixin):
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
        self._check_sigma_options()
        _check_ve_prediction_type(prediction_type)
        if interpolation_type not in ("linear", "log_linear"):
            raise LDMKitError(f"Unknown interpolation_type {interpolation_type!r}; use linear or log_linear.")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise LDMKitError(f"Unknown final_sigmas_type {final_sigmas_type!r}; use zero or sigma_min.")
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # Zero terminal SNR makes sigma_max infinite; keep it finite (the value diffusers uses).
            self.alphas_cumprod[-1] = 2**-24
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
        cfg = self.config
        given = sum(v is not None for v in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise LDMKitError("Pass exactly one of num_inference_steps, timesteps or sigmas to "
                              "set_timesteps.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas
                                      or cfg.use_beta_sigmas or self._continuous_timesteps):
            raise LDMKitError("Custom timesteps cannot be combined with use_karras_sigmas / "
                              "use_exponential_sigmas / use_beta_sigmas or continuous timesteps; "
                              "pass sigmas.")
        if num_inference_steps is not None:
            num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        else:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        train = training_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_timesteps(cfg.num_train_timesteps, num_inference_steps,
                                             cfg.timestep_spacing, cfg.steps_offset, dtype=np.float32)
            if cfg.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            else:  # log_linear, as diffusers computes it
                ramp = torch.linspace(np.log(train[-1]), np.log(train[0]), num_inference_steps + 1)
                sigmas = ramp.exp().numpy()
            alternative = self._alternative_sigmas(sigmas, self.num_inference_steps)
            if alternative is not None:
                sigmas = alternative
                timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            else:
                sigma_last = 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_timesteps:
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas.to("cpu")
        self._reset_step_index()

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
        """One Euler step ``x + (x - D(x)) / sigma_hat * (sigma_next - sigma_hat)``; with ``s_churn > 0``
        noise first raises sigma to ``sigma_hat = sigma (1 + gamma)`` (Karras et al. 2022, Alg. 2)."""
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

        pt = self.config.prediction_type
        denoised = ve_denoised(model_output, sample, sigma_hat if pt == "epsilon" else sigma, pt)
        derivative = to_d(sample, denoised, sigma_hat)
        prev_sample = sample + derivative * (self.sigmas[self.step_index + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


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
        _check_ve_prediction_type(prediction_type)
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = np.concatenate([training_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.num_inference_steps = None
        T = num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T)[::-1].copy())
        self.is_scale_input_called = False
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps by ``timestep_spacing`` and their interpolated sigmas."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(cfg.num_train_timesteps, n, cfg.timestep_spacing, cfg.steps_offset,
                                     dtype=np.float32)
        train = training_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_step_index()

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
