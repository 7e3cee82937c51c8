"""ldmkit's sigma-space samplers (Euler, Euler ancestral, Heun, LMS) against diffusers 0.42.1: whole
trajectories, same model outputs, same generator; add_noise and set_begin_index of every sigma scheduler."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.errors import LDMKitError
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

# ---------------------------------------------------------------------------------------------------------
# Euler, Euler ancestral, Heun, LMS
# ---------------------------------------------------------------------------------------------------------

EULER_CASES = [
    {},
    dict(SD, use_karras_sigmas=True),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(use_exponential_sigmas=True),
    pytest.param(dict(use_beta_sigmas=True), marks=needs_scipy),
    dict(SD, final_sigmas_type="sigma_min", use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(interpolation_type="log_linear"),
    dict(SD, prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True),
    dict(prediction_type="sample"),
]


@pytest.mark.parametrize("config", EULER_CASES)
def test_euler_matches_diffusers(config):
    compare("EulerDiscreteScheduler", config)


@pytest.mark.parametrize("churn", [dict(s_churn=1.0),
                                   dict(s_churn=5.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)])
def test_euler_churn_matches_diffusers(churn):
    compare("EulerDiscreteScheduler", dict(SD), steps=8, step_kwargs=churn)


def test_euler_custom_timesteps_and_sigmas():
    for kw in (dict(timesteps=[999.0, 700.0, 400.0, 100.0]), dict(sigmas=[14.0, 5.0, 1.0, 0.2, 0.0])):
        ours, theirs = ls.EulerDiscreteScheduler(**SD), diffusers.EulerDiscreteScheduler(**SD)
        a = trajectory(ours, None, set_kwargs=kw)
        b = trajectory(theirs, None, set_kwargs=kw)
        assert_same_trajectory(a, b)


EULER_A_CASES = [
    {},
    dict(SD, prediction_type="v_prediction"),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("config", EULER_A_CASES)
def test_euler_ancestral_matches_diffusers(config):
    compare("EulerAncestralDiscreteScheduler", config)


HEUN_CASES = [
    {},
    dict(SD, use_karras_sigmas=True),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(clip_sample=True, clip_sample_range=0.5, prediction_type="sample"),
    dict(beta_schedule="exp", timestep_spacing="leading", steps_offset=1),
    dict(use_exponential_sigmas=True),
]


@pytest.mark.parametrize("config", HEUN_CASES)
def test_heun_matches_diffusers(config):
    compare("HeunDiscreteScheduler", config, steps=5)


LMS_CASES = [
    {},
    dict(SD, use_karras_sigmas=True),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
]


@needs_scipy
@pytest.mark.parametrize("config", LMS_CASES)
def test_lms_matches_diffusers(config):
    compare("LMSDiscreteScheduler", config, steps=7)


def test_lms_coefficients_exact():
    # The integral of the Lagrange basis, checked against a fine trapezoid rule.
    from ldmkit.schedulers.lms import lms_coefficient

    sig = [14.6, 9.0, 5.1, 2.9, 1.3]
    for order in (1, 2, 3, 4):
        for j in range(order):
            tau = torch.linspace(sig[3], sig[4], 20001, dtype=torch.float64)
            basis = torch.ones_like(tau)
            for k in range(order):
                if k != j:
                    basis = basis * (tau - sig[3 - k]) / (sig[3 - j] - sig[3 - k])
            expected = torch.trapezoid(basis, tau).item()
            assert lms_coefficient(sig, order, 3, j) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "HeunDiscreteScheduler", "UniPCMultistepScheduler",
                                  "EulerAncestralDiscreteScheduler"])
def test_sigma_add_noise_and_begin_index(name):
    """img2img: add_noise at a schedule timestep, then start part-way with set_begin_index."""
    ours, theirs = getattr(ls, name)(**SD), getattr(diffusers, name)(**SD)
    results = []
    for s in (ours, theirs):
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(1)
        x, noise = torch.randn(2, C, 4, 4, generator=g), torch.randn(2, C, 4, 4, generator=g)
        start = 4 * s.order
        t0 = s.timesteps[start:start + 1].repeat(2)
        noisy = s.add_noise(x, noise, t0)
        s.set_begin_index(start)
        y = noisy
        kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        for t in s.timesteps[start:]:
            y = s.step(fake_model(s.scale_model_input(y, t), t), t, y, **kw).prev_sample
        results.append((noisy, y))
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=RTOL)


def test_euler_rejects_integer_timestep():
    s = ls.EulerDiscreteScheduler()
    s.set_timesteps(4)
    x = torch.zeros(1, C, 2, 2)
    with pytest.raises(LDMKitError, match="loop index"):
        s.step(x, 0, x)
