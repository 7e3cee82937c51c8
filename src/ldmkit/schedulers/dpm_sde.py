"""DPM-Solver SDE: k-diffusion's ``sample_dpmpp_sde`` (DPM-Solver++(2S) with the stochastic steps of DPM-Solver++,
Lu et al. 2022, "DPM-Solver++", sec. 5; eta = 1, r = 1/2), its noise drawn from a seeded Brownian tree.

In sigma space (``alpha = 1``, ``lambda = -log sigma``) each step ``sigma_k -> sigma_{k+1}`` makes two ancestral
first-order DPM-Solver++ steps from ``sigma_k``: to the midpoint ``lambda_mid = (lambda_k + lambda_{k+1}) / 2`` with
the model's estimate at ``sigma_k``, then to ``sigma_{k+1}`` with its estimate at the midpoint. Each lands at
``sigma_down`` (:func:`euler.ancestral_step_sigmas`) and adds ``sigma_up`` times the Brownian increment of its
interval, normalised; the last step, to sigma = 0, is plain Euler.

The Brownian tree (torchsde's ``BrownianInterval``; Li et al. 2020, "Scalable Gradients for Stochastic
Differential Equations", sec. 4, virtual Brownian tree) fixes one Brownian path ``W(sigma)`` per seed, so the
increments of a finer schedule refine the same path, and with ``noise_sampler_seed`` the samples match diffusers'.
torchsde is an optional dependency (``pip install torchsde``), needed by this scheduler only, as in diffusers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import LDMKitError
from .base import SchedulerOutput
from .euler import ancestral_step_sigmas, to_d
from .exponential import exponential_step
from .predictions import ve_denoised
from .sigmas import sigma_to_t, training_sigmas
from .two_stage import TwoStageSigmaMixin


def import_torchsde():
    try:
        import torchsde
    except ImportError:
        raise LDMKitError("DPMSolverSDEScheduler draws its noise from a Brownian tree, which needs torchsde: "
                          "pip install torchsde (or pip install 'ldmkit[sde]').") from None
    return torchsde


class BrownianTreeNoiseSampler:
    """Standard normal noise for a step ``sigma -> sigma_next``: the increment ``W(sigma_next) - W(sigma)`` of the
    Brownian path fixed by ``seed`` over ``[sigma_min, sigma_max]``, divided by ``sqrt(|sigma_next - sigma|)``.

    ``seed`` is an int (one path of the whole batch's shape) or a list of one int per sample (a path per sample,
    so that each image depends on its own seed only). The tree's parameters are diffusers' (and k-diffusion's), so
    a seed gives diffusers' noise.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed):
        torchsde = import_torchsde()
        self.batched = isinstance(seed, list | tuple)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise LDMKitError(f"Got {len(seeds)} noise_sampler_seed values for a batch of {x.shape[0]}: give one "
                              "int, or one per sample.")
        shape = x.shape[1:] if self.batched else x.shape
        self.lower, self.upper = min(sigma_min, sigma_max), max(sigma_min, sigma_max)
        self.trees = [torchsde.BrownianInterval(t0=self.lower, t1=self.upper, size=tuple(shape), dtype=x.dtype,
                                                device=x.device, entropy=int(s), tol=1e-6, pool_size=24,
                                                halfway_tree=True) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1.0 if t0 < t1 else -1.0
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():
            # exp(-(-log sigma)) can exceed sigma_max (or undercut sigma_min) by an ulp; torchsde warns each time.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()


def draw_tree_seed(generator):
    """A tree seed from ``generator`` (one per generator of a list), or from torch's global generator as
    diffusers draws it when there is none."""
    if isinstance(generator, list | tuple):
        return [draw_tree_seed(g) for g in generator]
    kwargs = {} if generator is None else {"generator": generator, "device": generator.device}
    return torch.randint(0, 2**63 - 1, [], **kwargs).item()


def sde_half_step(x, denoised, lambda_from, lambda_to, noise_sampler, s_noise: float):
    """An ancestral first-order DPM-Solver++ step from ``sigma = e^-lambda_from`` towards ``e^-lambda_to``: the
    exponential integrator (DPM-Solver++ eq. 8, ``alpha = 1``) to ``sigma_down``, plus ``sigma_up`` Brownian noise."""
    sigma_from, sigma_to = lambda_from.neg().exp(), lambda_to.neg().exp()
    sigma_up, sigma_down = ancestral_step_sigmas(sigma_from, sigma_to, clamp=True)
    lambda_down = sigma_down.log().neg()
    x = exponential_step(x, [denoised], (1.0, lambda_down.neg().exp()), (1.0, sigma_from), lambda_down - lambda_from,
                         "dpmsolver++")
    return x + noise_sampler(sigma_from, sigma_to) * s_noise * sigma_up


class DPMSolverSDEScheduler(TwoStageSigmaMixin):
    """DPM-Solver SDE (``sample_dpmpp_sde``): two model evaluations per step but the last (``order = 2``).

    Same config fields, defaults (note beta_start 0.00085, beta_end 0.012) and results as diffusers'
    ``DPMSolverSDEScheduler``; prediction types ``epsilon`` and ``v_prediction``. The Brownian tree is seeded by
    ``noise_sampler_seed`` (an int, or one per sample); without one, by a seed drawn from the ``generator`` given
    to ``step`` (the pipelines pass theirs, so a seeded generator reproduces the image; diffusers' step takes no
    generator), else from torch's global generator, as diffusers does.
    """

    _timestep_dtype = np.float64  # as diffusers spaces them: the sigmas, hence the Brownian queries, follow

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        noise_sampler_seed: int | list[int] | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        import_torchsde()  # fail here, not at the first step
        self.register_config(locals())
        self._init_sigma_scheduler()
        self.use_karras_sigmas = use_karras_sigmas
        self.noise_sampler_seed = noise_sampler_seed
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None) -> None:
        """The base schedule (``num_inference_steps`` by ``timestep_spacing``, or Karras / exponential / beta
        sigmas), each step's midpoint evaluation interleaved; a new Brownian tree at the next step."""
        sigmas = self._set_base_schedule(num_inference_steps, device, num_train_timesteps, round_karras=False)
        lambdas = -np.log(sigmas[:-1])  # the midpoints' timesteps in float64, as diffusers forms them
        mids = np.exp(-(lambdas[:-1] + np.diff(lambdas) * 0.5))
        self._lay_out(None, sigma_to_t(mids, np.log(training_sigmas(self.alphas_cumprod))))
        self.mid_point_sigma = None
        self.noise_sampler = None

    def _input_sigma(self, k: int, first: bool):
        return self._base_sigmas[k] if first else self.mid_point_sigma

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> SchedulerOutput | tuple:
        """The first half step (to the midpoint) or the second (the whole step with the midpoint estimate)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            seed = self.noise_sampler_seed if self.noise_sampler_seed is not None else draw_tree_seed(generator)
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, positive.min().item(), self.sigmas.max().item(),
                                                          seed)
        k, first = self._stage()
        sigma, sigma_next = self._base_sigmas[k], self._base_sigmas[k + 1]
        # The scalar lambdas formed as diffusers forms them: the Brownian queries must be the same to the bit.
        lambda_s, lambda_next = sigma.log().neg(), sigma_next.log().neg()
        lambda_mid = lambda_s + (lambda_next - lambda_s) * 0.5
        sigma_input = sigma if first else lambda_mid.neg().exp()
        denoised = ve_denoised(model_output, sample, sigma_input, self.config.prediction_type)
        if sigma_next == 0:
            prev_sample = sample + to_d(sample, denoised, sigma) * (sigma_next - sigma)
        else:
            lambda_to = lambda_mid if first else lambda_next
            prev_sample = sde_half_step(sample if first else self.sample, denoised, lambda_s, lambda_to,
                                        self.noise_sampler, s_noise)
            self.sample, self.mid_point_sigma = (sample, lambda_to.neg().exp()) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
