"""Linear multistep (Adams-Bashforth type) sampler in sigma space, as in k-diffusion's ``sample_lms``
(Karras et al. 2022 parameterisation; the method is the classical linear multistep method, cf. the
PLMS discussion of Liu et al. 2022)."""

from __future__ import annotations

import numpy as np
import torch

from .base import SchedulerOutput
from .euler import to_d
from .predictions import ve_denoised
from .sigmas import VESigmaMixin


def lms_coefficient(sigmas, order: int, t: int, current_order: int) -> float:
    """Weight of the derivative ``current_order`` steps back in the LMS step ``sigma_t -> sigma_{t+1}``:
    the integral over ``[sigma_t, sigma_{t+1}]`` of its Lagrange basis polynomial through the last ``order``
    sigmas. Integrated exactly (diffusers integrates the same polynomial numerically with scipy)."""
    sigmas = [float(s) for s in sigmas]
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k == current_order:
            continue
        denom = sigmas[t - current_order] - sigmas[t - k]
        poly = poly * np.polynomial.Polynomial([-sigmas[t - k] / denom, 1.0 / denom])
    integral = poly.integ()
    return float(integral(sigmas[t + 1]) - integral(sigmas[t]))


class LMSDiscreteScheduler(VESigmaMixin):
    """Linear multistep sampling of the probability-flow ODE with up to ``order`` (default 4) past
    derivatives. Same config fields, defaults and results as diffusers' ``LMSDiscreteScheduler`` (without
    needing scipy except for ``use_beta_sigmas``)."""

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.register_config(locals())
        self._init_sigma_scheduler()
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None)
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps by ``timestep_spacing`` (or Karras / exponential / beta)."""
        self._set_schedule(*self._sigma_schedule(self._steps_asked(num_inference_steps)), device)
        self._sigmas_list = self.sigmas.tolist()  # the coefficients are integrated in float64 from these
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        return lms_coefficient(self._sigmas_list, order, t, current_order)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """``x_{i+1} = x_i + sum_j c_j d_{i-j}`` over the last ``min(order, i + 1)`` derivatives."""
        self._warn_if_unscaled()
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        denoised = ve_denoised(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives.append(to_d(sample, denoised, sigma))
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(self.step_index + 1, order)
        coeffs = [self.get_lms_coefficient(order, self.step_index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
