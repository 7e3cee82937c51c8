"""DEIS: Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (arXiv:2204.13902),
the multistep ``rhoAB-DEIS`` variant (their sec. 4, eq. 14) with log-rho Lagrange interpolation.

DEIS integrates the probability-flow ODE in ``rho = sigma_t / alpha_t``, where ``x / alpha = x_0 + rho eps`` and
so ``d(x / alpha) / d rho = eps``: over a step ``s0 -> t``, ``x_t / alpha_t = x_s0 / alpha_s0 + int eps d rho``
with ``eps`` replaced by its Lagrange interpolant in ``log rho = -lambda`` through the last ``order`` outputs.
First order is DDIM, the first-order exponential integrator (:func:`exponential.exponential_step`). The same
integrals are the phi functions of the exponential integrator applied to the interpolant's Taylor terms, but
formed that way they round differently from diffusers by more than the 1e-5 parity bar (the terms are large and
cancel); so higher orders use DEIS's closed forms (:func:`deis_coefficients`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, dynamic_threshold
from .dpm_solver import _DPMSolverBase
from .exponential import exponential_step
from .predictions import to_eps, to_x0


def _log(value: torch.Tensor) -> torch.Tensor:
    # numpy's float32 log, as diffusers takes it: torch's differs in the last bit, which the differences of large
    # terms below amplify past 1e-5.
    return torch.as_tensor(np.log(value.cpu().numpy()))


def _basis_integral(rho, b, *others):
    """An antiderivative in ``rho`` of the Lagrange basis polynomial in ``log rho`` that is 1 at ``b`` and 0 at
    ``others`` (one or two points), in the closed forms of DEIS (and diffusers)."""
    log = _log
    if len(others) == 1:
        (c,) = others
        return rho * (-log(c) + log(rho) - 1) / (log(b) - log(c))
    c, d = others
    numerator = rho * (log(c) * (log(d) - log(rho) + 1) - log(d) * log(rho) + log(d) + log(rho) ** 2
                       - 2 * log(rho) + 2)
    return numerator / ((log(b) - log(c)) * (log(b) - log(d)))


def deis_coefficients(rho_t, rhos: list) -> list:
    """``c_j = int_{rho_s0}^{rho_t} L_j(log rho) d rho`` for the points ``rhos = [rho_s0, rho_s1(, rho_s2)]``
    (Zhang & Chen 2023, eq. 14, log-rho interpolation): the step is ``x_t = alpha_t (x_s0 / alpha_s0 + sum_j c_j
    eps_j)``."""
    coefficients = []
    for j, rho_j in enumerate(rhos):
        others = rhos[j + 1:] + rhos[:j]
        coefficients.append(_basis_integral(rho_t, rho_j, *others) - _basis_integral(rhos[0], rho_j, *others))
    return coefficients


class DEISMultistepScheduler(_DPMSolverBase):
    """Multistep DEIS of order ``solver_order`` (1 to 3, warming up from 1; lower at the end of short schedules
    with ``lower_order_final``), with Karras / exponential / beta / flow sigmas.

    Same config fields, defaults and results as diffusers' ``DEISMultistepScheduler`` (``algorithm_type``
    ``dpmsolver``/``dpmsolver++`` and the other solvers' ``solver_type`` names become ``deis`` / ``logrho``, as
    there). The schedule ends at the smallest training sigma (or the last alternative sigma), not 0.
    """

    order = 1
    _default_final_sigmas_type = "sigma_min"
    _final_from_schedule = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        algorithm_type = "deis" if algorithm_type in ("dpmsolver", "dpmsolver++") else algorithm_type
        solver_type = "logrho" if solver_type in ("midpoint", "heun", "bh1", "bh2") else solver_type
        if algorithm_type != "deis" or solver_type != "logrho":
            raise LDMKitError(f"DEISMultistepScheduler has algorithm_type 'deis' and solver_type 'logrho' only, got "
                              f"{algorithm_type!r} / {solver_type!r}.")
        if solver_order not in (1, 2, 3):
            raise LDMKitError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        self.register_config(locals())
        self._init_dpm()
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      mu: float | None = None) -> None:
        """Choose the sampling steps (``mu``: the dynamic flow shift, ``exp(mu)``) and reset the history."""
        self._set_flow_shift(mu)
        n = self._steps_asked(num_inference_steps)
        self._set_schedule(*self._dpm_schedule(n, None, round_karras=True), device)
        self._reset_history()

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The eps that DEIS integrates, formed from the (optionally thresholded) x_0 estimate, as diffusers
        forms it."""
        cfg = self.config
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.step_index])
        x0 = to_x0(model_output, sample, alpha_t, sigma_t, cfg.prediction_type)
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return to_eps(x0, sample, alpha_t, sigma_t, "sample")

    def _update(self, sample: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        """From ``sigmas[i]`` to ``sigmas[i+1]`` with the newest ``len(eps)`` outputs (newest first)."""
        i = self.step_index
        (alpha_t, sigma_t), lambda_t = self._point(i + 1)
        (alpha_s0, sigma_s0), lambda_s0 = self._point(i)
        if len(eps) == 1:  # DDIM: the exponential integrator's first order
            return exponential_step(sample, eps, (alpha_t, sigma_t), (alpha_s0, sigma_s0), lambda_t - lambda_s0,
                                    "dpmsolver", closed_form=True)
        rhos = [sigma / alpha for alpha, sigma in (self._alpha_sigma(self.sigmas[i - j]) for j in range(len(eps)))]
        out = sample / alpha_s0
        for coefficient, e in zip(deis_coefficients(sigma_t / alpha_t, rhos), eps):
            out = out + coefficient * e
        return alpha_t * out

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One multistep update with the highest order the history allows."""
        self._require_timesteps()
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self.step_index, len(self.timesteps)
        order = min(cfg.solver_order, self.lower_order_nums + 1)
        if cfg.lower_order_final and n < 15:
            order = min(order, n - i)  # first order at the last step, at most second at the one before
        self.model_outputs = self.model_outputs[1:] + [self.convert_model_output(model_output, sample)]
        prev_sample = self._update(sample, self.model_outputs[::-1][:order])
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
