"""The schedulers of issue 16 (KDPM2, KDPM2 ancestral, DEIS, DPM-Solver SDE, EDM Euler) against diffusers 0.42.1:
whole trajectories, same config, same model outputs, same generator (and the same Brownian-tree seed); add_noise
and set_begin_index; the maths that is theirs alone (DEIS's coefficients, the Brownian increments)."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.schedulers.deis import deis_coefficients
from ldmkit.schedulers.dpm_sde import BrownianTreeNoiseSampler
from scheduler_utils import (  # pytest puts tests/ (no __init__.py) on sys.path
    ATOL,
    RTOL,
    SD,
    C,
    assert_same_trajectory,
    compare,
    fake_model,
    needs_scipy,
    trajectory,
)

NEW = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
       "DPMSolverSDEScheduler", "EDMEulerScheduler"]
SEED = dict(noise_sampler_seed=7)  # DPM-Solver SDE: diffusers' step takes no generator; both trees from one seed

K_CASES = [
    {},
    dict(SD, use_karras_sigmas=True),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(use_exponential_sigmas=True),
    pytest.param(dict(use_beta_sigmas=True), marks=needs_scipy),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
]


def compare_float32_timesteps(name, config, steps):
    """``compare``, but the timesteps as float32: with a sigma option set diffusers' KDPM2 timesteps are float64
    (``sigma_to_t`` of float64 sigmas); ldmkit's are float32, as for its other sigma schedulers."""
    a = trajectory(getattr(ls, name)(**config), steps)
    b = trajectory(getattr(diffusers, name)(**config), steps)
    assert torch.tensor(a[1]).tolist() == torch.tensor(b[1], dtype=torch.float32).tolist()
    assert_same_trajectory((a[0], b[1]), b)


@pytest.mark.parametrize("config", K_CASES + [dict(beta_schedule="squaredcos_cap_v2")])
@pytest.mark.parametrize("steps", [5, 12])
def test_kdpm2_matches_diffusers(config, steps):
    compare_float32_timesteps("KDPM2DiscreteScheduler", config, steps)


@pytest.mark.parametrize("config", K_CASES)
@pytest.mark.parametrize("steps", [5, 12])
def test_kdpm2_ancestral_matches_diffusers(config, steps):
    compare_float32_timesteps("KDPM2AncestralDiscreteScheduler", config, steps)


def test_kdpm2_ancestral_stays_finite_where_diffusers_gives_nan():
    """The cosine schedule's first sigma is ~2e4: diffusers' sigma_down = sqrt(to^2 - up^2) rounds below 0 (NaN
    image); here it is to^2 / from, the same quantity without the cancellation."""
    config = dict(beta_schedule="squaredcos_cap_v2")
    theirs = trajectory(diffusers.KDPM2AncestralDiscreteScheduler(**config), 6)[0]
    assert torch.isnan(theirs[-1][0]).all()
    ours = ls.KDPM2AncestralDiscreteScheduler(**config)
    outs = trajectory(ours, 6)[0]
    assert all(torch.isfinite(x).all() for x, _ in outs)
    s0, s1 = ours._base_sigmas[0], ours._base_sigmas[1]
    torch.testing.assert_close(ours._targets[0], s1**2 / s0)


DEIS_CASES = [
    {},
    dict(solver_order=1, timestep_spacing="leading", steps_offset=1),
    dict(solver_order=3),
    dict(SD, use_karras_sigmas=True, solver_order=3),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(use_exponential_sigmas=True, solver_order=3),
    pytest.param(dict(use_beta_sigmas=True), marks=needs_scipy),
    dict(beta_schedule="squaredcos_cap_v2", solver_order=3),
    dict(prediction_type="sample", thresholding=True, sample_max_value=2.0, solver_order=3),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    dict(lower_order_final=False, solver_order=3),
    dict(algorithm_type="dpmsolver++", solver_type="midpoint"),  # mapped to deis / logrho, as in diffusers
]


@pytest.mark.parametrize("config", DEIS_CASES)
@pytest.mark.parametrize("steps", [7, 16])
def test_deis_matches_diffusers(config, steps):
    compare("DEISMultistepScheduler", config, steps=steps)


def test_deis_dynamic_shift_matches_diffusers():
    config = dict(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction")
    compare("DEISMultistepScheduler", config, set_kwargs=dict(mu=0.7))


SDE_CASES = [
    SEED,
    dict(SD, **SEED, use_karras_sigmas=True),
    dict(SD, **SEED, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(**SEED, timestep_spacing="leading", steps_offset=1),
    dict(**SEED, use_exponential_sigmas=True),
    pytest.param(dict(**SEED, use_beta_sigmas=True), marks=needs_scipy),
    dict(**SEED, beta_schedule="squaredcos_cap_v2"),
    dict(SD, noise_sampler_seed=[3, 4]),  # a tree per sample
]


@pytest.mark.parametrize("config", SDE_CASES)
@pytest.mark.parametrize("steps", [5, 12])
def test_dpm_sde_matches_diffusers(config, steps):
    compare("DPMSolverSDEScheduler", config, steps=steps)


def test_dpm_sde_s_noise_matches_diffusers():
    compare("DPMSolverSDEScheduler", dict(SD, **SEED), step_kwargs=dict(s_noise=0.7))


def test_dpm_sde_seed_from_the_generator():
    """Without noise_sampler_seed the tree's seed comes from the step's generator (diffusers' step has none: it
    draws from torch's global generator, as here without a generator)."""
    seed = torch.randint(0, 2**63 - 1, [], generator=torch.Generator().manual_seed(0)).item()
    ours = trajectory(ls.DPMSolverSDEScheduler(**SD), 6, seed=0)
    assert_same_trajectory(ours, trajectory(diffusers.DPMSolverSDEScheduler(**SD, noise_sampler_seed=seed), 6))
    other = trajectory(ls.DPMSolverSDEScheduler(**SD), 6, seed=1)[0]
    assert not torch.allclose(other[-1][0], ours[0][-1][0])
    results = []
    for scheduler in (ls.DPMSolverSDEScheduler(**SD), diffusers.DPMSolverSDEScheduler(**SD)):
        scheduler.set_timesteps(4)
        torch.manual_seed(5)
        x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(42)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=RTOL)


def test_brownian_increments_add_up():
    """W(a, c) = W(a, b) + W(b, c) on one path, whichever way the interval is walked; each is N(0, 1) scaled."""
    x = torch.zeros(4000)
    tree = BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=3)
    a, b, c = torch.tensor(8.0), torch.tensor(3.0), torch.tensor(0.5)
    whole = tree(a, c) * (a - c).sqrt()
    parts = tree(a, b) * (a - b).sqrt() + tree(b, c) * (b - c).sqrt()
    torch.testing.assert_close(whole, parts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tree(c, a), -tree(a, c))
    assert abs(tree(a, b).std().item() - 1) < 0.05 and abs(tree(a, b).mean().item()) < 0.05
    assert not torch.equal(BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=4)(a, b), tree(a, b))


EDM_CASES = [
    {},
    dict(prediction_type="v_prediction"),
    dict(sigma_schedule="exponential"),
    dict(final_sigmas_type="sigma_min", rho=5.0, sigma_data=1.0, sigma_min=0.01, sigma_max=20.0),
]


@pytest.mark.parametrize("config", EDM_CASES)
@pytest.mark.parametrize("churn", [{}, dict(s_churn=5.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)])
def test_edm_euler_matches_diffusers(config, churn):
    compare("EDMEulerScheduler", config, steps=10, step_kwargs=churn)


def test_edm_euler_custom_sigmas_are_the_schedule():
    """diffusers documents ``sigmas`` as custom sigmas but maps them through the Karras formula as positions in
    [0, 1]; here they are the sigmas. Sampling diffusers' own mapped sigmas gives diffusers' trajectory."""
    ramp = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
    theirs = diffusers.EDMEulerScheduler()
    theirs.set_timesteps(sigmas=ramp)
    sigmas = theirs.sigmas[:-1].tolist()
    b = trajectory(theirs, None, set_kwargs=dict(sigmas=ramp))
    assert_same_trajectory(trajectory(ls.EDMEulerScheduler(), None, set_kwargs=dict(sigmas=sigmas)), b)


def test_edm_euler_given_pred_original_sample():
    ours, theirs = ls.EDMEulerScheduler(), diffusers.EDMEulerScheduler()
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(3)
        x = torch.ones(1, C, 2, 2) * s.init_noise_sigma
        s.scale_model_input(x, s.timesteps[0])
        outs.append(s.step(torch.zeros_like(x), s.timesteps[0], x, pred_original_sample=0.5 * x).prev_sample)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=RTOL)


def test_edm_euler_preconditioning_methods_match_diffusers():
    ours, theirs = ls.EDMEulerScheduler(sigma_data=0.7), diffusers.EDMEulerScheduler(sigma_data=0.7)
    x, out, sigma = torch.randn(1, C, 2, 2), torch.randn(1, C, 2, 2), torch.tensor(3.0)
    torch.testing.assert_close(ours.precondition_inputs(x, sigma), theirs.precondition_inputs(x, sigma))
    torch.testing.assert_close(ours.precondition_noise(3.0), theirs.precondition_noise(3.0))
    torch.testing.assert_close(ours.precondition_outputs(x, out, sigma), theirs.precondition_outputs(x, out, sigma))


def _config(name):
    return {"DPMSolverSDEScheduler": dict(SD, **SEED), "EDMEulerScheduler": {}}.get(name, SD)


@pytest.mark.parametrize("name", NEW)
def test_add_noise_and_begin_index(name):
    """img2img: add_noise at a schedule timestep, then start part-way with set_begin_index."""
    results = []
    for library in (ls, diffusers):
        s = getattr(library, name)(**_config(name))
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(1)
        x, noise = torch.randn(2, C, 4, 4, generator=g), torch.randn(2, C, 4, 4, generator=g)
        start = 4 * s.order
        noisy = s.add_noise(x, noise, s.timesteps[start:start + 1].repeat(2))
        s.set_begin_index(start)
        y = noisy
        kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        for t in s.timesteps[start:]:
            y = s.step(fake_model(s.scale_model_input(y, t), t), t, y, **kw).prev_sample
        results.append((noisy, y))
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NEW)
def test_schedule_attributes_match_diffusers(name):
    ours, theirs = getattr(ls, name)(**_config(name)), getattr(diffusers, name)(**_config(name))
    for s in (ours, theirs):
        s.set_timesteps(8)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    assert ours.order == theirs.order and len(ours) == len(theirs)


def test_deis_coefficients_integrate_the_lagrange_basis():
    """c_j = int_{rho_s0}^{rho_t} L_j(log rho) d rho, checked against a fine trapezoid rule."""
    rhos = [torch.tensor(2.0), torch.tensor(3.5), torch.tensor(6.0)]
    rho_t = torch.tensor(0.8)
    tau = torch.linspace(rho_t.item(), rhos[0].item(), 200001, dtype=torch.float64)
    for order in (2, 3):
        points = [r.double().log() for r in rhos[:order]]
        for j, c in enumerate(deis_coefficients(rho_t, rhos[:order])):
            basis = torch.ones_like(tau)
            for k, p in enumerate(points):
                if k != j:
                    basis = basis * (tau.log() - p) / (points[j] - p)
            expected = -torch.trapezoid(basis, tau).item()  # from rho_s0 down to rho_t
            assert c.item() == pytest.approx(expected, rel=1e-5)
