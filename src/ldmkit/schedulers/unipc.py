"""UniPC: Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (arXiv:2302.04867).

UniP (predictor, Alg. 2) is a multistep exponential integrator of order p; UniC (corrector, Alg. 1) refines
the previous step with the new model output at no extra model call. Notation as in DPM-Solver:
``lambda = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s0``, ``r_k = (lambda_{s_k} - lambda_s0) / h``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, check_num_inference_steps
from .dpm_solver import _DPMSolverBase
from .exponential import exponential_step, scaled_phis
from .sigmas import multistep_timesteps


def unipc_coefficients(rks: torch.Tensor, hh: torch.Tensor, order: int, solver_type: str):
    """The linear system of UniPC (Zhao et al. 2023, eq. 8 / Alg. 1-2): ``R[i, k] = r_k^i`` and
    ``b_i = i! hh phi_{i+1}(hh) / B(hh)`` for ``i = 1 .. order``, with ``B(h) = h`` (``bh1``) or ``e^h - 1``
    (``bh2``). Also returns ``B(hh)``."""
    phis = scaled_phis(hh, order + 1)
    if solver_type == "bh1":
        B_h = hh
    elif solver_type == "bh2":
        B_h = phis[0]
    else:
        raise LDMKitError(f"Unknown UniPC solver_type {solver_type!r}; use bh1 or bh2.")
    R = [torch.pow(rks, i - 1) for i in range(1, order + 1)]
    b = [phis[i] * math.factorial(i) / B_h for i in range(1, order + 1)]
    return torch.stack(R), torch.stack(b), B_h


def _combine(rhos, D1s):
    return torch.einsum("k,bkc...->bc...", rhos, D1s)


def unipc_base(x, m0, t, s0, h, predict_x0: bool):
    """The first-order (DDIM-like) part shared by predictor and corrector: the first-order DPM-Solver++
    step ``sigma_t/sigma_s0 x - alpha_t (e^-h - 1) m0`` for x_0 prediction, the DPM-Solver step
    ``alpha_t/alpha_s0 x - sigma_t (e^h - 1) m0`` for eps prediction (at sigma_t = 0 its limit, where diffusers
    has 0 * inf = NaN)."""
    return exponential_step(x, [m0], t, s0, h, "dpmsolver++" if predict_x0 else "dpmsolver")


def _apply_residual(x_t_, scale, B_h, residual):
    """``x_t_ - scale B(h) residual``; a zero residual (first order) is skipped, as ``B(h)`` is infinite for
    a step to sigma = 0 with bh1 or eps prediction (diffusers: inf * 0 = NaN)."""
    if isinstance(residual, int) and residual == 0:
        return x_t_
    return x_t_ - scale * B_h * residual


class UniPCMultistepScheduler(_DPMSolverBase):
    """UniPC with the bh1/bh2 variants, order up to ``solver_order`` (warming up from 1), a corrector after
    every step except those listed in ``disable_corrector``, and optionally another solver ``solver_p`` as
    the predictor.

    Same config fields, defaults and results as diffusers' ``UniPCMultistepScheduler``. ``solver_p`` (a
    scheduler object) is kept on the instance but written to the config as None, since it cannot be saved
    as JSON.
    """

    order = 1

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = (),
        solver_p=None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float | None = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str | None = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_type in ("midpoint", "heun", "logrho"):
            solver_type = "bh2"
        if solver_type not in ("bh1", "bh2"):
            raise LDMKitError(f"Unknown UniPC solver_type {solver_type!r}; use bh1 or bh2.")
        if shift_terminal is not None and not use_flow_sigmas:
            raise LDMKitError("shift_terminal only applies to flow sigmas; set use_flow_sigmas=True.")
        if not isinstance(solver_order, int) or solver_order < 1:
            raise LDMKitError(f"solver_order must be a positive int, got {solver_order!r}.")
        predictor = solver_p
        solver_p = None  # not JSON; kept on the instance
        self.register_config(locals())
        self._init_dpm(rescale_betas_zero_snr)
        self.solver_p = predictor
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.timestep_list = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None

    def _time_shift(self, mu: float, sigma: float, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        if self.config.time_shift_type == "linear":
            return mu / (mu + (1 / t - 1) ** sigma)
        raise LDMKitError(f"Unknown time_shift_type {self.config.time_shift_type!r}; "
                          "use exponential or linear.")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None) -> None:
        """Choose the sampling steps and reset the history. ``sigmas`` (flow sigmas only) and ``mu``
        (dynamic shifting) as in diffusers."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise LDMKitError("use_dynamic_shifting=True needs mu: call set_timesteps(n, mu=...).")
        if sigmas is not None and not cfg.use_flow_sigmas:
            raise LDMKitError("Custom sigmas need use_flow_sigmas=True.")
        n = check_num_inference_steps(len(sigmas) if sigmas is not None else num_inference_steps, T)
        option = self._sigma_option()
        if cfg.use_flow_sigmas and option is None:
            flow = self._flow_sigmas(n, sigmas, mu)
            schedule, timesteps = np.concatenate([flow, [self._final_sigma(flow)]]), (flow * T).copy()
        else:
            schedule, timesteps = self._sigma_schedule(n, train=sigmas, bounds_from_training=True, round_karras=True,
                                                       final_from_schedule=True)
            if option == "use_karras_sigmas" and cfg.use_flow_sigmas:
                schedule = schedule / (schedule + 1)  # Karras sigmas mapped to flow sigmas s / (1 + s)
                timesteps = (schedule[:-1] * T).copy()
        self._set_schedule(schedule, timesteps, device)
        self._reset_history()
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _spaced_timesteps(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        cfg = self.config
        return multistep_timesteps(cfg.num_train_timesteps, cfg.num_train_timesteps, n, cfg.timestep_spacing,
                                   cfg.steps_offset)

    def _flow_sigmas(self, n: int, sigmas, mu) -> np.ndarray:
        """Rectified-flow sigmas (custom, or ``linspace(1, 1/T)``), shifted by ``flow_shift`` or by the dynamic
        shift ``mu``, then stretched so that the last one is ``shift_terminal``."""
        cfg = self.config
        if sigmas is None:
            sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1]
        sigmas = np.asarray(sigmas)
        if cfg.use_dynamic_shifting:
            sigmas = self._time_shift(mu, 1.0, sigmas)
        else:
            sigmas = cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas)
        if cfg.shift_terminal:
            one_minus_z = 1 - sigmas
            sigmas = 1 - (one_minus_z / (one_minus_z[-1] / (1 - cfg.shift_terminal)))
        if np.fabs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        return sigmas

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 (``predict_x0``, optionally thresholded) or eps from the model output."""
        # diffusers thresholds x_0 only, not the eps form.
        return self._convert(model_output, sample, self.predict_x0, self.config.thresholding and self.predict_x0)

    def _history(self, lambda_s0, h, order: int, offset: int, device):
        """``r_k`` and ``D1_k = (m_k - m0) / r_k`` for the ``order - 1`` previous outputs; the model outputs
        ``k`` back sit at ``sigmas[step_index - k - offset]``."""
        m0 = self.model_outputs[-1]
        rks, D1s = [], []
        for i in range(1, order):
            mi = self.model_outputs[-(i + 1)]
            alpha_si, sigma_si = self._alpha_sigma(self.sigmas[self.step_index - i - offset].to(device))
            rk = ((torch.log(alpha_si) - torch.log(sigma_si)) - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        rks.append(torch.ones((), device=device))
        return torch.stack(rks), (torch.stack(D1s, dim=1) if D1s else None)

    def _points(self, i_t: int, i_s0: int, device):
        t = self._alpha_sigma(self.sigmas[i_t].to(device))
        s0 = self._alpha_sigma(self.sigmas[i_s0].to(device))
        lambda_t = torch.log(t[0]) - torch.log(t[1])
        lambda_s0 = torch.log(s0[0]) - torch.log(s0[1])
        return t, s0, lambda_s0, lambda_t - lambda_s0

    def multistep_uni_p_bh_update(self, model_output: torch.Tensor, sample: torch.Tensor, order: int):
        """UniP-p (Zhao et al. 2023, Alg. 2): from ``sigmas[i]`` to ``sigmas[i+1]``."""
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        x, device = sample, sample.device
        t, s0, lambda_s0, h = self._points(self.step_index + 1, self.step_index, device)
        rks, D1s = self._history(lambda_s0, h, order, 0, device)
        hh = -h if self.predict_x0 else h
        R, b, B_h = unipc_coefficients(rks, hh, order, self.config.solver_type)
        if D1s is not None:
            if order == 2:
                rhos_p = torch.ones(1, dtype=x.dtype, device=device) * 0.5
            else:
                rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype)
            pred_res = _combine(rhos_p, D1s)
        else:
            pred_res = 0
        x_t_ = unipc_base(x, self.model_outputs[-1], t, s0, h, self.predict_x0)
        scale = t[0] if self.predict_x0 else t[1]
        return _apply_residual(x_t_, scale, B_h, pred_res).to(x.dtype)

    def multistep_uni_c_bh_update(self, this_model_output: torch.Tensor, last_sample: torch.Tensor,
                                  this_sample: torch.Tensor, order: int):
        """UniC-p (Zhao et al. 2023, Alg. 1): redo the step ``sigmas[i-1] -> sigmas[i]`` that produced
        ``this_sample`` with the new model output included."""
        x, device = last_sample, this_sample.device
        t, s0, lambda_s0, h = self._points(self.step_index, self.step_index - 1, device)
        rks, D1s = self._history(lambda_s0, h, order, 1, device)
        hh = -h if self.predict_x0 else h
        R, b, B_h = unipc_coefficients(rks, hh, order, self.config.solver_type)
        if order == 1:
            rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos_c = torch.linalg.solve(R, b).to(device).to(x.dtype)
        m0 = self.model_outputs[-1]
        x_t_ = unipc_base(x, m0, t, s0, h, self.predict_x0)
        corr_res = _combine(rhos_c[:-1], D1s) if D1s is not None else 0
        scale = t[0] if self.predict_x0 else t[1]
        return (x_t_ - scale * B_h * (corr_res + rhos_c[-1] * (this_model_output - m0))).to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """Correct the previous step with this model output (UniC), then predict the next (UniP)."""
        self._require_timesteps()
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        use_corrector = (self.step_index > 0 and self.step_index - 1 not in self.disable_corrector
                         and self.last_sample is not None)
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(converted, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        if cfg.lower_order_final:
            this_order = min(cfg.solver_order, len(self.timesteps) - self.step_index)
        else:
            this_order = cfg.solver_order
        if self.sigmas[self.step_index + 1] == 0:
            # A step to sigma = 0 is first order whatever lower_order_final says (as in DPM-Solver); higher
            # orders divide by h = inf (diffusers: singular system).
            this_order = 1
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample, self.this_order)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

