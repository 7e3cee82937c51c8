"""Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Alg. 1): an Euler step, then a correction with the average of the derivatives at both
ends; the last step (to sigma = 0) is plain Euler."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, check_num_inference_steps, spaced_timesteps
from .euler import _check_ve_prediction_type, to_d, ve_denoised
from .sigmas import VESigmaMixin, sigma_to_t, training_sigmas


def heun_correct(first_derivative, second_derivative):
    """Heun's trapezoidal rule: the mean of the derivatives at sigma_i and sigma_{i+1} (Alg. 1 line 8)."""
    return (first_derivative + second_derivative) / 2


class HeunDiscreteScheduler(VESigmaMixin):
    """Heun's method. Each step but the last takes two model evaluations, so ``timesteps`` holds every
    inner timestep twice (``order = 2``); ``step`` alternates between the Euler and the correction stage.

    Same config fields, defaults (note beta_start 0.00085, beta_end 0.012) and results as diffusers'
    ``HeunDiscreteScheduler``.
    """

    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.register_config(locals())
        self._check_sigma_options()
        _check_ve_prediction_type(prediction_type)
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        """True before the Euler stage of a step, False before its correction."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: list[float] | None = None) -> None:
        """Choose the sampling sigmas (``num_inference_steps`` by spacing, or explicit ``timesteps``), then
        duplicate the inner ones for the two stages."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise LDMKitError("Pass exactly one of num_inference_steps or timesteps to set_timesteps.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas
                                      or cfg.use_beta_sigmas):
            raise LDMKitError("Custom timesteps cannot be combined with use_karras_sigmas / "
                              "use_exponential_sigmas / use_beta_sigmas.")
        num_train_timesteps = num_train_timesteps or cfg.num_train_timesteps
        if num_inference_steps is not None:
            num_inference_steps = check_num_inference_steps(num_inference_steps, num_train_timesteps)
        else:
            num_inference_steps = len(timesteps)
        self.num_inference_steps = num_inference_steps
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            timesteps = spaced_timesteps(num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                         cfg.steps_offset, dtype=np.float32)
        train = training_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        alternative = self._alternative_sigmas(sigmas, num_inference_steps)
        if alternative is not None:
            sigmas = alternative
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).to("cpu")
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """The Euler stage (first call of a step) or the Heun correction (second call)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]
        sigma_hat = sigma * (0 + 1)  # no churn
        sigma_input = sigma_hat if first else sigma_next
        denoised = ve_denoised(model_output, sample, sigma_input, self.config.prediction_type)
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if first:
            derivative = to_d(sample, denoised, sigma_hat)
            dt = sigma_next - sigma_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = heun_correct(self.prev_derivative, to_d(sample, denoised, sigma_next))
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
