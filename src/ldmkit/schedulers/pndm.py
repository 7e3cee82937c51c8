"""PNDM: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
(arXiv:2202.09778). PLMS (pseudo linear multistep) is the sampler of the original latent diffusion /
Stable Diffusion release; PRK (pseudo Runge-Kutta) is its warm-up."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerMixin, SchedulerOutput, check_num_inference_steps, spaced_timesteps
from .predictions import alpha_sigma, to_eps


def pndm_transfer(sample, eps, alpha_prod_t, alpha_prod_t_prev):
    """The transfer part ``phi(x_t, eps, t, t - delta)`` of Liu et al. 2022 (sec. 3.2, eq. 11), i.e. one
    DDIM step (Song et al. 2021, eq. 12 with sigma = 0) written for a given eps:
    ``x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / D`` with
    ``D = a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)``.
    """
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
    denom = alpha_prod_t * (1 - alpha_prod_t_prev) ** (0.5) + (
        alpha_prod_t * (1 - alpha_prod_t) * alpha_prod_t_prev) ** (0.5)
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom


def plms_eps(ets: list):
    """The linear multistep combination of the last eps estimates (Adams-Bashforth of order len(ets),
    Liu et al. 2022, eq. 12): ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24`` at fourth order."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


class PNDMScheduler(SchedulerMixin):
    """PLMS sampling, warmed up either by three pseudo Runge-Kutta steps (4 model calls each; the PNDM
    paper) or, with ``skip_prk_steps=True``, by a pseudo improved-Euler step (the latent diffusion code's
    PLMS and Stable Diffusion's default).

    Same config fields, defaults and results as diffusers' ``PNDMScheduler``.
    """

    order = 1
    pndm_order = 4

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self.register_config(locals())
        self._check_prediction_type(("epsilon", "v_prediction"))
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Timesteps by ``timestep_spacing``; with PRK warm-up, the first three steps are split into half
        steps (each half-step timestep appears twice, for the four Runge-Kutta stages)."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        self.num_inference_steps = n
        # Ascending here; the schedule is reversed below.
        self._timesteps = spaced_timesteps(cfg.num_train_timesteps, n, cfg.timestep_spacing,
                                           cfg.steps_offset)[::-1].copy()
        ts = self._timesteps
        if cfg.skip_prk_steps:
            # The second timestep is repeated: the improved-Euler warm-up evaluates the model there twice.
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            if n < self.pndm_order:
                raise LDMKitError(f"PNDMScheduler with the Runge-Kutta warm-up needs num_inference_steps >= "
                                  f"{self.pndm_order}, got {n}. Use more steps or skip_prk_steps=True.")
            half = cfg.num_train_timesteps // n // 2
            prk = np.array(ts[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset_state()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """A PRK stage during the warm-up, a PLMS step afterwards."""
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def _transfer(self, sample, timestep: int, prev_timestep: int, eps):
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (self.alphas_cumprod[prev_timestep] if prev_timestep >= 0
                             else self.final_alpha_cumprod)
        eps = to_eps(eps, sample, *alpha_sigma(alpha_prod_t), self.config.prediction_type)
        return pndm_transfer(sample, eps, alpha_prod_t, alpha_prod_t_prev)

    def step_prk(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                 return_dict: bool = True) -> SchedulerOutput | tuple:
        """One of the four stages of a pseudo Runge-Kutta step (Liu et al. 2022, eq. 13): eps is evaluated at
        t, twice at t - delta/2 and at t - delta, combined with weights 1/6, 1/3, 1/3, 1/6."""
        self._require_timesteps()
        timestep = int(timestep)
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._transfer(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                  return_dict: bool = True) -> SchedulerOutput | tuple:
        """A pseudo linear multistep step (Liu et al. 2022, eq. 12) with as many past eps as available."""
        self._require_timesteps()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise LDMKitError("PNDMScheduler.step_plms needs the 12 PRK warm-up steps first; call step() for "
                              "every timestep in scheduler.timesteps, or set skip_prk_steps=True.")
        timestep = int(timestep)
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - delta
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # Second evaluation of the improved-Euler warm-up: redo the first step from its start.
            prev_timestep = timestep
            timestep = timestep + delta

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        else:
            model_output = plms_eps(self.ets)
        prev_sample = self._transfer(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
