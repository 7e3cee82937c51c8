"""A small, fast version of benchmarks/sampler_study.py: every deterministic sampler with the exact
Gaussian-mixture denoiser, against the exact probability-flow ODE solution from the same noise."""

from __future__ import annotations

import math

import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.testing.gmm_denoiser import ExactEpsModel, GaussianMixture, probability_flow_reference
from ldmkit.testing.samplers import LDM_BETAS, SAMPLERS, path_errors, run_sampler

DETERMINISTIC = [s for s in SAMPLERS if not s.stochastic]
STEPS = (5, 20, 100)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on a shared CPU
    gmm = GaussianMixture.random(dim=16, seed=0)
    model = ExactEpsModel(gmm, ls.DDIMScheduler(**LDM_BETAS).alphas_cumprod)
    noise = torch.randn(256, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma_max, sigma_min = math.exp(model.log_sigmas[-1]), math.exp(model.log_sigmas[0])
    reference = probability_flow_reference(gmm, noise, sigma_max, sigma_min, tol=1e-8)
    return gmm, model, noise, reference


@pytest.fixture(scope="module")
def errors(setup):
    """Typical (median) path error for each deterministic sampler and step count, plus DDIM at 50."""
    gmm, model, noise, reference = setup
    out = {}
    for sampler in DETERMINISTIC:
        for n in (*STEPS, 50) if sampler.name.startswith("DDIM") else STEPS:
            x, _ = run_sampler(sampler.build(), model, noise, n)
            out[sampler.name, n] = path_errors(gmm, x, reference)["median_err"]
    return out


def test_exact_eps_is_minus_s_times_the_score():
    """eps*(x_t) = -s grad log p_t(x_t), with p_t the mixture of N(a mu_k, a^2 Sigma_k + s^2 I)."""
    gmm = GaussianMixture.random(dim=6, seed=3)
    alpha_bar = 0.3
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    sigmas = torch.einsum("kde,ke,kfe->kdf", gmm.eigvecs, gmm.eigvals, gmm.eigvecs)
    covs = a * a * sigmas + s * s * torch.eye(6, dtype=torch.float64)
    components = torch.distributions.MultivariateNormal(a * gmm.means, covariance_matrix=covs)
    log_p = torch.logsumexp(gmm.weights.log() + components.log_prob(x[:, None, :]), dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(gmm.eps(x.detach(), alpha_bar), -s * score, rtol=1e-10, atol=1e-12)


def test_samples_have_the_closed_form_moments():
    gmm = GaussianMixture.random(dim=4, seed=2)
    x = gmm.sample(200_000, torch.Generator().manual_seed(0))
    assert (x.mean(0) - gmm.mean()).abs().max() < 0.01
    assert (torch.cov(x.T) - gmm.covariance()).abs().max() < 0.02


def test_high_order_samplers_converge_to_the_reference(setup):
    """The reference is what the samplers converge to: UniPC with Karras sigmas gets within 1e-3."""
    gmm, model, noise, reference = setup
    x, _ = run_sampler(ls.UniPCMultistepScheduler(**LDM_BETAS, use_karras_sigmas=True), model, noise, 100)
    assert path_errors(gmm, x, reference)["median_err"] < 1e-3


@pytest.mark.parametrize("name", [s.name for s in DETERMINISTIC])
def test_error_decreases_with_steps(errors, name):
    e5, e20, e100 = (errors[name, n] for n in STEPS)
    assert e5 > e20 > e100, (e5, e20, e100)


def test_dpm_solver_karras_at_20_steps_beats_ddim_at_50(errors):
    dpm = errors["DPM-Solver++ 2M Karras", 20]
    assert dpm <= errors["DDIM", 50] and dpm <= errors["DDIM (CompVis)", 50]


def test_dpm_solver_linspace_at_20_steps_does_not_beat_ddim_at_50(errors):
    """Measured order, and why: with linspace spacing DPM-Solver++ (and UniPC) end with one first-order step
    from sigma(t = 50) ~ 0.23 straight to 0, which dominates their error; DDIM at 50 steps ends from
    t = 19 (trailing) or t = 1 (CompVis). Karras sigmas remove that long last step (test above)."""
    dpm = errors["DPM-Solver++ 2M", 20]
    assert dpm > errors["DDIM", 50] and dpm > errors["DDIM (CompVis)", 50]
