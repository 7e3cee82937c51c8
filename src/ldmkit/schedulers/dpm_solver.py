"""DPM-Solver and DPM-Solver++: Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps" (arXiv:2206.00927) and "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models" (arXiv:2211.01095).

Notation: ``alpha_t = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma alpha_t``,
``lambda = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s`` for a step ``s -> t``. ``dpmsolver++``
integrates the data-prediction (x_0) form, ``dpmsolver`` the noise-prediction (eps) form; the ``sde-``
variants are the SDE solvers of DPM-Solver++ sec. 5 (noise drawn at every step). ``m`` are converted model
outputs (x_0 or eps), newest last. The updates themselves are :func:`exponential.exponential_step`; the
functions here form its Taylor terms ``D0, D1, D2`` from the history.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput, dynamic_threshold, randn
from .exponential import ALGORITHM_TYPES, exponential_step
from .predictions import to_eps, to_x0
from .sigmas import VPSigmaMixin, flow_sigmas, multistep_timesteps

SOLVER_TYPES = ("midpoint", "heun")
DPM_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def dpm_convert_model_output(model_output, sample, alpha_t, sigma_t, prediction_type: str,
                             data_prediction: bool, threshold=None):
    """The x_0 (``data_prediction``, DPM-Solver++ sec. 4) or eps (DPM-Solver) the solver integrates.

    ``threshold`` is ``(ratio, max_value)`` for dynamic thresholding of x_0 (DPM-Solver++ sec. 4), or None; in
    the eps form the thresholded x_0 is turned back into eps.
    """
    if data_prediction:
        x0 = to_x0(model_output, sample, alpha_t, sigma_t, prediction_type)
        return x0 if threshold is None else dynamic_threshold(x0, *threshold)
    if prediction_type == "flow_prediction":
        raise LDMKitError("prediction_type 'flow_prediction' is not supported by the noise-prediction algorithm "
                          "dpmsolver; use epsilon, sample or v_prediction, or dpmsolver++.")
    eps = to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(to_x0(eps, sample, alpha_t, sigma_t, "epsilon"), *threshold)
        eps = to_eps(x0, sample, alpha_t, sigma_t, "sample")
    return eps


# ---------------------------------------------------------------------------------------------------------
# Taylor terms and updates. (alpha, sigma) pairs are the alpha_t / sigma_t of the named points.
# ---------------------------------------------------------------------------------------------------------


def _step(x, terms, t, s, h, algorithm_type: str, noise, midpoint: bool = False):
    # closed_form: e^z - 1 and the phi functions formed as diffusers' DPM-Solver forms them.
    return exponential_step(x, terms, t, s, h, algorithm_type, noise, midpoint, closed_form=True)


def dpm_solver_first_order(x, m, t, s, h, algorithm_type: str, noise=None):
    """First-order step ``s -> t`` (= DDIM): DPM-Solver++ eq. 8 ``x_t = sigma_t/sigma_s x - alpha_t (e^-h - 1)
    x0``; DPM-Solver eq. 3.7 ``x_t = alpha_t/alpha_s x - sigma_t (e^h - 1) eps``; and their SDE versions."""
    return _step(x, [m], t, s, h, algorithm_type, noise)


def dpm_solver_2m(x, m0, m1, t, s0, h, h_0, algorithm_type: str, solver_type: str, noise=None):
    """Multistep second order (DPM-Solver++(2M), DPM-Solver++ Alg. 2): from ``s0`` to ``t`` with the
    outputs at ``s0`` (m0) and the previous point ``s1`` (m1), ``h_0 = lambda_s0 - lambda_s1``,
    ``D1 = (m0 - m1) / r0`` with ``r0 = h_0 / h``; ``midpoint`` or ``heun`` weights for D1."""
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    return _step(x, [D0, D1], t, s0, h, algorithm_type, noise, midpoint=solver_type == "midpoint")


def dpm_solver_3m(x, m0, m1, m2, t, s0, h, h_0, h_1, algorithm_type: str, noise=None):
    """Multistep third order (DPM-Solver++(3M); DPM-Solver App. B): two scaled differences
    ``D1_0 = (m0 - m1) / r0``, ``D1_1 = (m1 - m2) / r1`` give ``D1`` and ``D2``."""
    if algorithm_type == "sde-dpmsolver":
        raise LDMKitError(f"solver_order=3 does not support algorithm_type {algorithm_type!r}; "
                          "use dpmsolver++, dpmsolver or sde-dpmsolver++, or solver_order=2.")
    r0, r1 = h_0 / h, h_1 / h
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    return _step(x, [m0, D1, D2], t, s0, h, algorithm_type, noise)


def dpm_solver_2s(x, m0, m1, t, s1, h, h_0, algorithm_type: str, solver_type: str, noise=None):
    """Singlestep second order (DPM-Solver-2 / DPM-Solver++(2S)): one step from ``s1`` to ``t`` using the
    output at ``s1`` (m1) and at the intermediate point ``s0`` (m0), ``h = lambda_t - lambda_s1``,
    ``h_0 = lambda_s0 - lambda_s1``."""
    r0 = h_0 / h
    D0, D1 = m1, (1.0 / r0) * (m0 - m1)
    return _step(x, [D0, D1], t, s1, h, algorithm_type, noise, midpoint=solver_type == "midpoint")


def dpm_solver_3s(x, m0, m1, m2, t, s2, h, h_0, h_1, algorithm_type: str, solver_type: str, noise=None):
    """Singlestep third order (DPM-Solver-3, Lu et al. 2022 Alg. 2): one step from ``s2`` to ``t`` using
    outputs at ``s2`` (m2) and two intermediate points ``s1`` (m1), ``s0`` (m0); ``midpoint`` uses only the
    second intermediate difference (the paper's choice), ``heun`` both."""
    r0, r1 = h_0 / h, h_1 / h
    D1_0, D1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    if solver_type == "midpoint":
        return _step(x, [m2, D1_1], t, s2, h, algorithm_type, noise)
    D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
    D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    return _step(x, [m2, D1, D2], t, s2, h, algorithm_type, noise)


# ---------------------------------------------------------------------------------------------------------
# Shared scheduler machinery
# ---------------------------------------------------------------------------------------------------------


class _DPMSolverBase(VPSigmaMixin):
    """Noise schedule, sigmas and model output conversion shared by the multistep and singlestep solvers."""

    _prediction_types = DPM_PREDICTION_TYPES
    _final_from_schedule = False  # the final sigma repeats the schedule's last (DEIS), else final_sigmas_type

    def _init_dpm(self, rescale_betas_zero_snr: bool = False) -> None:
        cfg = self.config
        if self._own("algorithm_type") in ("dpmsolver", "sde-dpmsolver") and cfg.final_sigmas_type == "zero":
            raise LDMKitError(f"final_sigmas_type='zero' is not supported with algorithm_type="
                              f"{cfg.algorithm_type!r}; set final_sigmas_type='sigma_min' or use "
                              "dpmsolver++.")
        self._init_sigma_scheduler(rescale_betas_zero_snr)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).to("cpu")
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        T = cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._flow_shift = cfg.flow_shift
        self._reset_step_index()

    def _set_flow_shift(self, mu) -> None:
        if mu is not None:
            if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
                raise LDMKitError("mu is only used with use_dynamic_shifting=True and "
                                  "time_shift_type='exponential'.")
            self._flow_shift = float(np.exp(mu))

    def _last_timestep(self) -> int:
        """One past the noisiest training step the schedule may start at: ``lambda_min_clipped`` drops the
        steps whose half log-SNR lambda is below it (for the numerical stability of cosine schedules)."""
        T = self.config.num_train_timesteps
        if self._own("lambda_min_clipped") is None:
            return T
        return T - torch.searchsorted(torch.flip(self.lambda_t, [0]), self.config.lambda_min_clipped).item()

    def _spaced_timesteps(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        cfg = self.config
        return multistep_timesteps(cfg.num_train_timesteps, self._last_timestep(), n, cfg.timestep_spacing,
                                   cfg.steps_offset)

    def _dpm_schedule(self, n: int, timesteps, round_karras: bool) -> tuple[np.ndarray, np.ndarray]:
        """The sigma schedule, or with ``use_flow_sigmas`` (and no other sigma option) the shifted flow sigmas."""
        final_from_schedule = self._final_from_schedule
        if self.config.use_flow_sigmas and self._sigma_option() is None:
            sigmas = flow_sigmas(self.config.num_train_timesteps, n, self._flow_shift)
            final = self._final_sigma(sigmas if final_from_schedule else None)
            return np.concatenate([sigmas, [final]]), (sigmas * self.config.num_train_timesteps).copy()
        return self._sigma_schedule(n, timesteps, bounds_from_training=True, round_karras=round_karras,
                                    final_from_schedule=final_from_schedule)

    def _point(self, index: int):
        """``(alpha_t, sigma_t)`` and ``lambda`` of ``sigmas[index]``."""
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        return (alpha, sigma), torch.log(alpha) - torch.log(sigma)

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output as the x_0 (dpmsolver++) or eps (dpmsolver) that the solver integrates."""
        cfg = self.config
        if cfg.prediction_type == "epsilon" and cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]
        return self._convert(model_output, sample, cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"),
                             cfg.thresholding)

    def _convert(self, model_output, sample, data_prediction: bool, thresholding: bool):
        cfg = self.config
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.step_index])
        threshold = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if thresholding else None
        return dpm_convert_model_output(model_output, sample, alpha_t, sigma_t, cfg.prediction_type,
                                        data_prediction, threshold)


def _normalise_dpm_types(algorithm_type: str, solver_type: str, allowed_algorithms) -> tuple[str, str]:
    """diffusers maps ``deis`` to ``dpmsolver++`` and the UniPC/DEIS solver types to ``midpoint``."""
    if algorithm_type == "deis":
        algorithm_type = "dpmsolver++"
    if algorithm_type not in allowed_algorithms:
        raise LDMKitError(f"Unknown algorithm_type {algorithm_type!r}; "
                          f"use one of {', '.join(allowed_algorithms)}.")
    if solver_type in ("logrho", "bh1", "bh2"):
        solver_type = "midpoint"
    if solver_type not in SOLVER_TYPES:
        raise LDMKitError(f"Unknown solver_type {solver_type!r}; use midpoint or heun.")
    return algorithm_type, solver_type


class DPMSolverMultistepScheduler(_DPMSolverBase):
    """Multistep DPM-Solver / DPM-Solver++ (``solver_order`` 1-3; the default is DPM-Solver++(2M)), with the
    SDE variants (``sde-dpmsolver++``), Karras / exponential / beta / Lu lambda / flow sigmas.

    Same config fields, defaults and results as diffusers' ``DPMSolverMultistepScheduler``.
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        use_lu_lambdas: bool | None = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float | None = 1.0,
        final_sigmas_type: str | None = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        algorithm_type, solver_type = _normalise_dpm_types(algorithm_type, solver_type, ALGORITHM_TYPES)
        if solver_order not in (1, 2, 3):
            raise LDMKitError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        self.register_config(locals())
        self._init_dpm(rescale_betas_zero_snr)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """Choose the sampling steps (``num_inference_steps`` or explicit ``timesteps``); reset history."""
        cfg = self.config
        self._set_flow_shift(mu)
        n = self._steps_asked(num_inference_steps, timesteps=timesteps)
        self._set_schedule(*self._dpm_schedule(n, timesteps, cfg.beta_schedule != "squaredcos_cap_v2"), device)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update with the highest order the history allows (lower near the end of short
        schedules, ``lower_order_final``)."""
        self._require_timesteps()
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self.step_index, len(self.timesteps)
        lower_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15

        x0 = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.to(torch.float32)
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
            else:
                noise = variance_noise.to(device=x0.device, dtype=torch.float32)
        else:
            noise = None

        t, lambda_t = self._point(i + 1)
        s0, lambda_s0 = self._point(i)
        h = lambda_t - lambda_s0
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = dpm_solver_first_order(sample, x0, t, s0, h, cfg.algorithm_type, noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            _, lambda_s1 = self._point(i - 1)
            prev_sample = dpm_solver_2m(sample, self.model_outputs[-1], self.model_outputs[-2], t, s0, h,
                                        lambda_s0 - lambda_s1, cfg.algorithm_type, cfg.solver_type, noise)
        else:
            _, lambda_s1 = self._point(i - 1)
            _, lambda_s2 = self._point(i - 2)
            m = self.model_outputs
            prev_sample = dpm_solver_3m(sample, m[-1], m[-2], m[-3], t, s0, h, lambda_s0 - lambda_s1,
                                        lambda_s1 - lambda_s2, cfg.algorithm_type, noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(x0.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


class DPMSolverSinglestepScheduler(_DPMSolverBase):
    """Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, Alg. 1-2): the schedule is cut into groups of
    ``solver_order`` steps; within a group every step restarts from the group's first sample and uses the
    model outputs of the group so far.

    Same config fields, defaults and results as diffusers' ``DPMSolverSinglestepScheduler``. diffusers
    rewrites its config to ``lower_order_final=True`` at ``set_timesteps`` when the step count is not a
    multiple of ``solver_order`` or ``final_sigmas_type='zero'``; here the config is left as given and the
    same rule is applied at every ``set_timesteps`` (so reuse never depends on earlier calls).
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float | None = 1.0,
        final_sigmas_type: str | None = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        algorithm_type, solver_type = _normalise_dpm_types(algorithm_type, solver_type,
                                                           ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"))
        if solver_order not in (1, 2, 3):
            raise LDMKitError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        self.register_config(locals())
        self._init_dpm()
        self.model_outputs = [None] * solver_order
        self.sample = None
        self._lower_order_final = lower_order_final
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of each step: ``[1, 2, 3, 1, 2, 3, ...]`` for third order, lower at the end with
        ``lower_order_final``, and first order for a final step to sigma = 0."""
        steps, order = num_inference_steps, self.config.solver_order
        if self._lower_order_final:
            if order == 3:
                if steps % 3 == 0:
                    orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
                elif steps % 3 == 1:
                    orders = [1, 2, 3] * (steps // 3) + [1]
                else:
                    orders = [1, 2, 3] * (steps // 3) + [1, 2]
            elif order == 2:
                orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        else:
            orders = {3: [1, 2, 3] * (steps // 3), 2: [1, 2] * (steps // 2), 1: [1] * steps}[order]
        if self.config.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def _spaced_timesteps(self, n: int, num_train_timesteps: int | None = None) -> np.ndarray:
        # Always linspace; repeated timesteps are not refused here (as in diffusers).
        return multistep_timesteps(self.config.num_train_timesteps, self._last_timestep(), n, "linspace",
                                   refuse_repeats=False)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """Choose the sampling steps (``num_inference_steps`` evenly spaced, or explicit ``timesteps``)."""
        cfg = self.config
        self._set_flow_shift(mu)
        n = self._steps_asked(num_inference_steps, timesteps=timesteps)
        self._set_schedule(*self._dpm_schedule(n, timesteps, True), device)
        self.model_outputs = [None] * cfg.solver_order
        self.sample = None
        self._lower_order_final = (cfg.lower_order_final or n % cfg.solver_order != 0
                                   or cfg.final_sigmas_type == "zero")
        self.order_list = self.get_order_list(n)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One step of the current group, restarting from the group's first sample."""
        self._require_timesteps()
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        x0 = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        order = self.order_list[self.step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        i, m, x = self.step_index, self.model_outputs, self.sample
        t, lambda_t = self._point(i + 1)
        if order == 1:
            s0, lambda_s0 = self._point(i)
            prev_sample = dpm_solver_first_order(x, m[-1], t, s0, lambda_t - lambda_s0, cfg.algorithm_type,
                                                 noise)
        elif order == 2:
            _, lambda_s0 = self._point(i)
            s1, lambda_s1 = self._point(i - 1)
            prev_sample = dpm_solver_2s(x, m[-1], m[-2], t, s1, lambda_t - lambda_s1, lambda_s0 - lambda_s1,
                                        cfg.algorithm_type, cfg.solver_type, noise)
        else:
            _, lambda_s0 = self._point(i)
            _, lambda_s1 = self._point(i - 1)
            s2, lambda_s2 = self._point(i - 2)
            prev_sample = dpm_solver_3s(x, m[-1], m[-2], m[-3], t, s2, lambda_t - lambda_s2,
                                        lambda_s0 - lambda_s2, lambda_s1 - lambda_s2, cfg.algorithm_type,
                                        cfg.solver_type, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
