"""Euler sampling of models trained with EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 EDM column and Alg. 2).

An EDM model is continuous in sigma: it sees ``c_in(sigma) x`` and ``c_noise(sigma) = ln(sigma) / 4`` and predicts
``F`` with ``D(x; sigma) = c_skip x + c_out F`` (:func:`predictions.edm_denoised`, ``sigma_data`` the data's std).
The sampling sigmas are Karras' (eq. 5) or log-uniform between ``sigma_min`` and ``sigma_max``.

A latent diffusion model is not such a model: it is a discrete-time eps model of 1000 betas, expecting timesteps in
[0, 999] and the variance-preserving input ``x / sqrt(sigma^2 + 1)``. Fed c_noise and c_in it returns noise. So, as
in diffusers, ``EDMEulerScheduler`` is compatible with no other scheduler: built from an LDM's scheduler config it
takes its own defaults and warns that it ignores the config's noise schedule. Euler sampling of an LDM is
``EulerDiscreteScheduler`` (optionally with ``use_karras_sigmas=True``, the same sigma schedule).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput
from .euler import ChurnEulerMixin
from .predictions import EDM_PREDICTION_TYPES, edm_c_in, edm_c_noise, edm_denoised
from .sigmas import karras_sigmas

logger = logging.getLogger("ldmkit")

EDM_SIGMA_SCHEDULES = ("karras", "exponential")


class EDMEulerScheduler(ChurnEulerMixin):
    """Euler steps (with Karras' optional churn, ``s_churn``) for EDM-preconditioned models.

    Same config fields, defaults and results as diffusers' ``EDMEulerScheduler``, with one difference on purpose:
    ``set_timesteps(sigmas=...)`` samples the given sigmas, as diffusers documents; diffusers 0.42.1 passes them
    through the ``sigma_schedule`` formula as if they were positions in [0, 1].
    """

    _compatibles = ()  # diffusers' EDMEulerScheduler lists none: other configs describe other models
    _prediction_types = EDM_PREDICTION_TYPES
    order = 1

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        self.register_config(locals())
        if sigma_schedule not in EDM_SIGMA_SCHEDULES:
            raise LDMKitError(f"Unknown sigma_schedule {sigma_schedule!r}; use karras or exponential.")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise LDMKitError(f"Unknown final_sigmas_type {final_sigmas_type!r}; use zero or sigma_min.")
        self._check_prediction_type(EDM_PREDICTION_TYPES)
        T = num_train_timesteps
        self._set_edm_schedule(self._schedule(np.arange(T + 1, dtype=np.float64) / T), None)
        self.num_inference_steps = None
        self.is_scale_input_called = False

    @classmethod
    def _split_config(cls, config: Mapping) -> tuple[dict, dict]:
        accepted, unknown = super()._split_config(config)
        ignored = sorted(k for k in unknown if k.startswith("beta_") or k == "trained_betas")
        if ignored:
            logger.warning("EDMEulerScheduler ignores the discrete noise schedule of this config (%s): it samples "
                           "EDM-preconditioned models (Karras et al. 2022); a discrete-time model such as an LDM "
                           "gives noise with it. Use EulerDiscreteScheduler (use_karras_sigmas=True for the same "
                           "sigmas) for such a model.", ", ".join(ignored))
        return accepted, unknown

    @property
    def init_noise_sigma(self) -> float:
        """``sqrt(sigma_max^2 + 1)``, as diffusers has it."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _schedule(self, ramp: np.ndarray) -> np.ndarray:
        """The sigmas at positions ``ramp`` in [0, 1] (the exponential schedule: as many, evenly in log sigma)."""
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            return karras_sigmas(cfg.sigma_min, cfg.sigma_max, len(ramp), cfg.rho, ramp=ramp)
        # diffusers spaces EDM's log sigmas in float32 (torch's default dtype), unlike exponential_sigmas (float64)
        # of the other schedulers: the timesteps c_noise(sigma) would differ in the last bits.
        log_sigmas = torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), len(ramp))
        return log_sigmas.exp().flip(0).numpy().astype(np.float64)

    def _set_edm_schedule(self, sigmas: np.ndarray, device) -> None:
        """Store ``sigmas`` and the final one, and the timesteps the network takes, ``c_noise(sigma)``."""
        timesteps = edm_c_noise(torch.from_numpy(sigmas.astype(np.float32))).numpy()
        self._set_schedule(np.concatenate([sigmas, [self._final_sigma(sigmas)]]), timesteps, device)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | torch.Tensor | None = None) -> None:
        """``num_inference_steps`` sigmas of ``sigma_schedule`` from ``sigma_max`` to ``sigma_min``, or the
        custom ``sigmas`` (descending, without the final one, which ``final_sigmas_type`` appends)."""
        self._steps_asked(num_inference_steps, sigmas=sigmas)  # the argument check
        if sigmas is None:
            schedule = self._schedule(torch.linspace(0, 1, num_inference_steps, dtype=torch.float64).numpy())
        else:
            schedule = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu()).reshape(-1)
            if len(schedule) == 0 or not (schedule > 0).all():
                raise LDMKitError("Custom sigmas must be a non-empty list of positive noise levels "
                                  "(the final one is appended by final_sigmas_type).")
        self._set_edm_schedule(schedule, device)

    # diffusers' preconditioning methods, for sampling loops written against them
    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """``c_in(sigma) x``."""
        return sample * edm_c_in(sigma, self.config.sigma_data)

    def precondition_noise(self, sigma) -> torch.Tensor:
        """``c_noise(sigma) = ln(sigma) / 4``, the network's timestep input."""
        return edm_c_noise(sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma]))

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoiser ``D(x; sigma) = c_skip x + c_out F``."""
        return edm_denoised(model_output, sample, sigma, self.config.sigma_data, self.config.prediction_type)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Multiply by ``c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2)`` (EDM's input preconditioning)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self.step_index])

    def _denoise(self, model_output, sample, sigma, sigma_hat):
        return self.precondition_outputs(sample, model_output, sigma_hat)

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
        pred_original_sample: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple:
        """One Euler step with ``D(x; sigma_hat)`` from the preconditioned model output (or the given
        ``pred_original_sample``)."""
        return self._churn_step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict, denoised=pred_original_sample)
