"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502)."""

from __future__ import annotations

import torch

from ..errors import LDMKitError
from .base import (
    SchedulerMixin,
    SchedulerOutput,
    check_num_inference_steps,
    randn,
    spaced_timesteps,
)
from .predictions import alpha_sigma, to_eps, to_x0_and_eps


def ddim_sigma(alpha_prod_t, alpha_prod_t_prev):
    """Variance of the DDIM step at eta = 1 (Song et al. 2021, eq. 16):
    ``sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``, the DDPM posterior variance."""
    return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_step(x0, eps, alpha_prod_t_prev, std_dev_t):
    """One DDIM update without its noise term (Song et al. 2021, eq. 12):
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps`` (the caller adds ``sigma_t z``).

    ``1 - a_prev - sigma_t^2`` is exactly 0 at eta = 1 from a zero-SNR step (``a_t = 0``); rounding can make
    it negative, so it is clamped at 0 (diffusers returns NaN there)."""
    direction = torch.clamp(torch.as_tensor(1 - alpha_prod_t_prev - std_dev_t**2), min=0) ** (0.5) * eps
    return alpha_prod_t_prev ** (0.5) * x0 + direction


class DDIMScheduler(SchedulerMixin):
    """DDIM sampling; ``eta`` goes from deterministic DDIM (0) to DDPM-like ancestral sampling (1).

    Same config fields, defaults and results as diffusers' ``DDIMScheduler``. Note the diffusers defaults
    (``clip_sample=True``, ``set_alpha_to_one=True``, ``steps_offset=0``) are not the ones of latent
    diffusion checkpoints, whose ``scheduler_config.json`` sets them; :meth:`compvis` builds the sampler of
    the original CompVis LDM code (``ldm/models/diffusion/ddim.py``): ``steps_offset=1``,
    ``set_alpha_to_one=False`` (the last step goes to ``alphas_cumprod[0]``, not to 1) and no clipping.

    As in diffusers, the previous timestep is always ``t - num_train_timesteps // num_inference_steps``,
    whatever ``timestep_spacing`` is.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self.register_config(locals())
        self._check_prediction_type()
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)
        # alpha_bar "before" the first training step, used by the last sampling step.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    @classmethod
    def compvis(cls, **overrides) -> DDIMScheduler:
        """The DDIM sampler of the original CompVis latent diffusion code (and Stable Diffusion v1):
        scaled-linear betas 0.00085..0.012, timesteps ``0, k, 2k, ... + 1``, final step against
        ``alphas_cumprod[0]``, no clipping of x_0. Keyword overrides change any field.

        (When ``1000 % num_inference_steps != 0`` the CompVis code runs ``ceil(1000 / (1000 // n))`` steps
        instead of ``n``; here, as in diffusers, exactly ``n`` steps are run.)
        """
        config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
        config.update(overrides)
        return cls.from_config(config)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps by ``timestep_spacing``."""
        n = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(self.config.num_train_timesteps, n, self.config.timestep_spacing,
                                     self.config.steps_offset)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def _alpha_prev(self, prev_timestep):
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep, prev_timestep):
        return ddim_sigma(self.alphas_cumprod[timestep], self._alpha_prev(prev_timestep))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DDIM step from ``timestep`` to the previous one.

        ``eta`` scales the noise (0: deterministic). ``use_clipped_model_output`` recomputes eps from the
        clipped x_0. ``variance_noise`` gives the noise directly instead of drawing it from ``generator``.
        """
        self._require_timesteps()
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_t)

        alpha_t, sigma_t = alpha_sigma(alpha_prod_t)
        x0, eps = to_x0_and_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)
        x0 = self._clip_x0(x0)

        std_dev_t = eta * ddim_sigma(alpha_prod_t, alpha_prod_t_prev) ** (0.5)
        if use_clipped_model_output:
            eps = to_eps(x0, sample, alpha_t, sigma_t, "sample")
        prev_sample = ddim_step(x0, eps, alpha_prod_t_prev, std_dev_t)

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise LDMKitError("DDIMScheduler.step got both generator and variance_noise; pass only one.")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator=generator, device=model_output.device,
                                       dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
