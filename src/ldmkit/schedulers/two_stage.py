"""The layout and state of the samplers that evaluate the model twice per step of a base sigma schedule:
Heun (the second evaluation at the next sigma), KDPM2 and KDPM2 ancestral (at a midpoint in log sigma;
k-diffusion's ``sample_dpm_2`` and ``sample_dpm_2_ancestral``: DPM-Solver-2, Lu et al. 2022, Alg. 1, in the sigma
parameterisation of Karras et al. 2022) and DPM-Solver SDE (``sample_dpmpp_sde``).

A base schedule ``sigma_0 > ... > sigma_{n-1} > sigma_n`` with timesteps ``t_0 .. t_{n-1}`` becomes ``2n - 1``
model evaluations, ``timesteps = [t_0, m_0, t_1, m_1, ..., m_{n-2}, t_{n-1}]`` (``m_k``: the timestep of step
``k``'s second evaluation); the last step, to sigma = 0, evaluates once. ``sigmas`` is laid out as diffusers lays it
out, ``[s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, s_n]`` (KDPM2: ``s_n`` twice more), so that ``add_noise`` and
``init_noise_sigma`` read it as they read the other sigma schedulers'.
"""

from __future__ import annotations

import numpy as np
import torch

from .sigmas import VESigmaMixin, sigma_to_t, training_sigmas


def two_stage_layout(sigmas: torch.Tensor, timesteps: torch.Tensor, second_timesteps: torch.Tensor,
                     padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)`` of the two-evaluation layout from the base ``sigmas`` (``n + 1``, the final one
    included), the base ``timesteps`` (``n``) and those of the second evaluations (the first ``n - 1`` are used).
    ``padded``: KDPM2's layout, with two more copies of the final sigma."""
    inner = sigmas[1:] if padded else sigmas[1:-1]
    laid_sigmas = torch.cat([sigmas[:1], inner.repeat_interleave(2), sigmas[-1:]])
    second = second_timesteps[: len(timesteps) - 1].to(timesteps)
    laid_timesteps = torch.cat([torch.stack([timesteps[:-1], second], dim=-1).flatten(), timesteps[-1:]])
    return laid_sigmas, laid_timesteps


def log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The midpoint in log sigma, ``exp((log a + log b) / 2) = sqrt(a b)`` (0 where either end is 0), formed by
    ``lerp`` from ``log a`` as diffusers forms it (KDPM2 from the next sigma, KDPM2 ancestral from the current)."""
    mid = a.log().lerp(b.log(), 0.5).exp()
    return torch.where((a == 0) | (b == 0), torch.zeros_like(mid), mid)


class TwoStageSigmaMixin(VESigmaMixin):
    """State of KDPM2, KDPM2 ancestral and DPM-Solver SDE: the base schedule (``_base_sigmas``), the sigmas of
    the second evaluations (``_mids``) and, between the two evaluations of a step, the sample it started from
    (``sample``; None before the first)."""

    order = 2
    _prediction_types = ("epsilon", "v_prediction")  # diffusers has no "sample" for these three

    @property
    def state_in_first_order(self) -> bool:
        """True before the first evaluation of a step, False before its second."""
        return self.sample is None

    def _set_base_schedule(self, num_inference_steps, device, num_train_timesteps, round_karras: bool):
        """The base schedule by the shared builder (spacing, Karras / exponential / beta sigmas), stored as the
        plain one-evaluation schedule; returns its sigmas (float64, the final 0 included)."""
        n = self._steps_asked(num_inference_steps, num_train_timesteps)
        sigmas, timesteps = self._sigma_schedule(n, self._spaced_timesteps(n, num_train_timesteps),
                                                 round_karras=round_karras)
        self._set_schedule(sigmas, timesteps, device)
        self._base_sigmas = self.sigmas
        self.sample = None
        return sigmas

    def _lay_out(self, mids: torch.Tensor | None, second_timesteps: np.ndarray, padded: bool = False) -> None:
        """Interleave the second evaluations (at ``mids``, timesteps ``second_timesteps``) into the schedule."""
        self._mids = mids
        second = torch.from_numpy(np.asarray(second_timesteps))
        self.sigmas, self.timesteps = two_stage_layout(self.sigmas, self.timesteps, second, padded)

    def _second_timesteps(self, mids: torch.Tensor) -> np.ndarray:
        """The (fractional) training timesteps of the (float32) midpoint sigmas, weighted in float32."""
        return sigma_to_t(mids.numpy(), np.log(training_sigmas(self.alphas_cumprod)), dtype=np.float32)

    def _stage(self) -> tuple[int, bool]:
        """``(k, first)``: the base step of the current evaluation and whether it is its first. ``timesteps[2k]``
        is step ``k``'s first evaluation and ``timesteps[2k + 1]`` its second; a first evaluation at an odd index
        (a start part-way) is that of the step whose sigma ``add_noise`` used there."""
        first = self.state_in_first_order
        return ((self.step_index + 1) // 2 if first else self.step_index // 2), first

    def _input_sigma(self, k: int, first: bool):
        return self._base_sigmas[k] if first else self._mids[k]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Divide by ``sqrt(sigma^2 + 1)`` at the sigma of this evaluation (the midpoint for the second)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / ((self._input_sigma(*self._stage()) ** 2 + 1) ** 0.5)
