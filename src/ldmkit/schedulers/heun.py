"""Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Alg. 1): an Euler step, then a correction with the average of the derivatives at both
ends; the last step (to sigma = 0) is plain Euler."""

from __future__ import annotations

import torch

from .base import SchedulerOutput
from .euler import to_d
from .predictions import ve_denoised
from .sigmas import VESigmaMixin
from .two_stage import two_stage_layout


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
        self._init_sigma_scheduler()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        """True before the Euler stage of a step, False before its correction."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: list[float] | None = None) -> None:
        """Choose the sampling sigmas (``num_inference_steps`` by spacing, or explicit ``timesteps``), then
        duplicate the inner ones for the two stages."""
        n = self._steps_asked(num_inference_steps, num_train_timesteps, timesteps=timesteps)
        if timesteps is None:
            timesteps = self._spaced_timesteps(n, num_train_timesteps)
        sigmas, timesteps = self._sigma_schedule(n, timesteps)
        self._set_schedule(sigmas, timesteps, device)
        # Every inner sigma and timestep twice: the Euler stage and the correction evaluate the model there.
        self.sigmas, self.timesteps = two_stage_layout(self.sigmas, self.timesteps, self.timesteps[1:])
        self.prev_derivative = None
        self.dt = None
        self.sample = None

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
