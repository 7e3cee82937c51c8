"""KDPM2 and KDPM2 ancestral: k-diffusion's ``sample_dpm_2`` and ``sample_dpm_2_ancestral`` (Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models", with the second-order step of
DPM-Solver-2, Lu et al. 2022, Alg. 1, in sigma space).

Each step ``sigma_k -> sigma_{k+1}`` is a midpoint method in log sigma: an Euler step from ``sigma_k`` to the
midpoint ``sigma_mid = sqrt(sigma_k sigma_{k+1})``, the model evaluated there, and the whole step taken with that
derivative. The ancestral variant aims at ``sigma_down`` (midpoint ``sqrt(sigma_k sigma_down)``) and adds fresh
noise of std ``sigma_up`` (:func:`euler.ancestral_step_sigmas`). The last step, to sigma = 0, is plain Euler.
"""

from __future__ import annotations

import torch

from .base import SchedulerOutput, randn
from .euler import ancestral_step_sigmas, to_d
from .predictions import ve_denoised
from .two_stage import TwoStageSigmaMixin, log_midpoint


class _KDPM2Mixin(TwoStageSigmaMixin):
    """The midpoint step of both KDPM2 samplers; :meth:`_step_ends` says where each step aims and how much
    noise it adds."""

    def _step_ends(self, sigmas: torch.Tensor):
        """``(mids, targets, ups)`` of the base steps from the base ``sigmas`` (the final 0 included)."""
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None) -> None:
        """The base schedule (``num_inference_steps`` by ``timestep_spacing``, or Karras / exponential / beta
        sigmas), then each step's midpoint evaluation interleaved."""
        self._set_base_schedule(num_inference_steps, device, num_train_timesteps, round_karras=True)
        mids, self._targets, self._ups = self._step_ends(self.sigmas)
        self._lay_out(mids, self._second_timesteps(mids), padded=True)

    def _midpoint_step(self, model_output, timestep, sample, generator=None):
        """The first evaluation's Euler step to the midpoint, or the second's whole step from the saved sample
        with the midpoint derivative (plus ``sigma_up`` noise for the ancestral variant)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        k, first = self._stage()
        sigma, sigma_input = self._base_sigmas[k], self._input_sigma(k, first)
        denoised = ve_denoised(model_output, sample, sigma_input, self.config.prediction_type)
        derivative = to_d(sample, denoised, sigma_input)
        if first:
            self.sample = sample
            prev_sample = sample + derivative * (self._mids[k] - sigma)
        else:
            prev_sample = self.sample + derivative * (self._targets[k] - sigma)
            self.sample = None
            if self._ups is not None:
                noise = randn(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                              generator=generator)
                prev_sample = prev_sample + noise * self._ups[k]
        self._step_index += 1
        return prev_sample, denoised


class KDPM2DiscreteScheduler(_KDPM2Mixin):
    """KDPM2 (DPM-Solver-2 in sigma space): two model evaluations per step but the last (``order = 2``).

    Same config fields, defaults (note beta_start 0.00085, beta_end 0.012) and results as diffusers'
    ``KDPM2DiscreteScheduler``; prediction types ``epsilon`` and ``v_prediction``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
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
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def _step_ends(self, sigmas):
        # The midpoint lerped from the next sigma over the whole vector, as diffusers forms it (the same lanes of
        # the vectorised log and exp); 0 at the last step (sigma_n = 0).
        return log_midpoint(sigmas, sigmas.roll(1))[1:], sigmas[1:], None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """The Euler step to the midpoint (first call of a step) or the midpoint step (second call)."""
        prev_sample, denoised = self._midpoint_step(model_output, timestep, sample)
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


class KDPM2AncestralDiscreteScheduler(_KDPM2Mixin):
    """KDPM2 ancestral: the midpoint step aims at ``sigma_down``, then adds ``sigma_up`` noise drawn from the
    ``generator`` (``order = 2``).

    Same config fields, defaults and results as diffusers' ``KDPM2AncestralDiscreteScheduler``, except where
    rounding loses diffusers' ``sigma_down`` (a first step from a huge ``sigma_max``, as with ``squaredcos_cap_v2``,
    where diffusers returns NaN images): see :meth:`_step_ends`.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
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
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def _step_ends(self, sigmas):
        sigmas_from, sigmas_to = sigmas[:-1], sigmas[1:]
        ups, downs = ancestral_step_sigmas(sigmas_from, sigmas_to)
        # From a huge sigma (the first of squaredcos_cap_v2, ~2e4) sigma_to^2 - sigma_up^2 rounds to 0 or below:
        # diffusers' midpoint is then 0 or NaN, and its images NaN. sigma_to^2 / sigma_from is the same quantity
        # without the cancellation.
        lost = ~(downs > 0) & (sigmas_to > 0)
        downs = torch.where(lost, sigmas_to**2 / sigmas_from, downs)
        return log_midpoint(sigmas, torch.cat([downs, downs[-1:]]))[:-1], downs, ups

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """The Euler step to the midpoint (first call), or the midpoint step to ``sigma_down`` plus ``sigma_up``
        noise from ``generator`` (second call)."""
        prev_sample, denoised = self._midpoint_step(model_output, timestep, sample, generator)
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
