"""The samplers of the steps-versus-quality study (benchmarks/sampler_study.py, docs/sampler-study.md) and
what both the study and its fast test (tests/test_sampler_study.py) run them with: the pipelines' loop on a
model, and the path error against the exact probability-flow solution."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import schedulers as ls
from .gmm_denoiser import ExactEpsModel, GaussianMixture

# The published LDM noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps.
LDM_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class Sampler:
    """A row of the study: ``build()`` makes a fresh scheduler; ``stochastic`` ones draw noise in ``step``."""

    name: str
    build: Callable[[], ls.SchedulerMixin]
    stochastic: bool
    note: str


SAMPLERS = [
    Sampler("DDIM", lambda: ls.DDIMScheduler(**LDM_BETAS, clip_sample=False, set_alpha_to_one=True,
                                            timestep_spacing="trailing"),
            False, "eta 0, trailing spacing, last step to x_0"),
    Sampler("DDIM (CompVis)", ls.DDIMScheduler.compvis, False,
            "the published LDM config: leading spacing + 1, last step to alphas_cumprod[0]"),
    Sampler("PLMS", lambda: ls.PNDMScheduler(**LDM_BETAS, skip_prk_steps=True, steps_offset=1),
            False, "PNDM with skip_prk_steps (the CompVis PLMS sampler), leading spacing + 1"),
    Sampler("LMS", lambda: ls.LMSDiscreteScheduler(**LDM_BETAS), False, "order 4, linspace"),
    Sampler("Euler", lambda: ls.EulerDiscreteScheduler(**LDM_BETAS), False, "linspace"),
    Sampler("Heun", lambda: ls.HeunDiscreteScheduler(**LDM_BETAS), False, "2 evaluations per step, linspace"),
    Sampler("DPM-Solver++ 2M", lambda: ls.DPMSolverMultistepScheduler(**LDM_BETAS), False, "linspace"),
    Sampler("DPM-Solver++ 2M Karras", lambda: ls.DPMSolverMultistepScheduler(**LDM_BETAS, use_karras_sigmas=True),
            False, "Karras sigmas (rho 7)"),
    Sampler("DPM-Solver++ 2M leading", lambda: ls.DPMSolverMultistepScheduler(
        **LDM_BETAS, timestep_spacing="leading", steps_offset=1),
            False, "the spacing inherited from a DDIM config that states leading"),
    Sampler("DPM-Solver++ 2S", lambda: ls.DPMSolverSinglestepScheduler(**LDM_BETAS), False, "singlestep, order 2"),
    Sampler("UniPC", lambda: ls.UniPCMultistepScheduler(**LDM_BETAS), False, "bh2, order 2, linspace"),
    Sampler("UniPC Karras", lambda: ls.UniPCMultistepScheduler(**LDM_BETAS, use_karras_sigmas=True), False,
            "bh2, order 2, Karras sigmas"),
    Sampler("Euler ancestral", lambda: ls.EulerAncestralDiscreteScheduler(**LDM_BETAS), True, "linspace"),
    Sampler("DPM-Solver++ 2M SDE", lambda: ls.DPMSolverMultistepScheduler(
        **LDM_BETAS, algorithm_type="sde-dpmsolver++"), True, "linspace"),
    Sampler("DPM-Solver++ 2M SDE Karras", lambda: ls.DPMSolverMultistepScheduler(
        **LDM_BETAS, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), True, "Karras sigmas"),
]


def run_sampler(scheduler, model: ExactEpsModel, noise: torch.Tensor, steps: int,
                seed: int = 0) -> tuple[torch.Tensor, int]:
    """The pipelines' loop: scale the noise by ``init_noise_sigma``, then ``scale_model_input``, model,
    ``step`` (with a generator for the samplers that draw noise). Returns the sample and the NFE."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(
        scheduler.step).parameters else {}
    calls = model.calls
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x, model.calls - calls


def path_errors(gmm: GaussianMixture, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-sample RMS error against the exact ODE solution: its median (the typical image) and its RMS over
    samples, and the fraction of samples that end in another mixture component than the exact solution (a
    different "composition"). A few samples sit on the boundary between two components' basins and flip
    for any perturbation; each adds ~1 per dimension, so the RMS over samples measures those flips more than
    the accuracy of the rest, and the median is the headline number."""
    per_sample = (x - ref).pow(2).mean(1).sqrt()
    flips = gmm.responsibilities(x).argmax(1) != gmm.responsibilities(ref).argmax(1)
    return {"median_err": per_sample.median().item(), "rmse": per_sample.pow(2).mean().sqrt().item(),
            "flip_rate": flips.double().mean().item()}
