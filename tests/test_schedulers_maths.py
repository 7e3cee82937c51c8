"""The shared scheduler maths on its own: the model-output conversion table, the phi functions of the
exponential integrators, and the one argument check of set_timesteps."""

from __future__ import annotations

import math

import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.errors import LDMKitError
from ldmkit.schedulers.exponential import scaled_phis
from ldmkit.schedulers.predictions import to_eps, to_x0, ve_denoised


def _model_output(prediction_type, x0, eps, alpha_t, sigma_t):
    """What a perfect network predicts for x_t = alpha_t x0 + sigma_t eps."""
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha_t * eps - sigma_t * x0}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_conversion_table_inverts_the_forward_process(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    alpha_bar = torch.tensor(0.3, dtype=torch.float64)
    alpha_t, sigma_t = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = alpha_t * x0 + sigma_t * eps
    m = _model_output(prediction_type, x0, eps, alpha_t, sigma_t)
    torch.testing.assert_close(to_x0(m, x_t, alpha_t, sigma_t, prediction_type), x0)
    torch.testing.assert_close(to_eps(m, x_t, alpha_t, sigma_t, prediction_type), eps)
    # Sigma space: the same noise level as x = x0 + sigma eps, which the network sees scaled to x_t.
    sigma = sigma_t / alpha_t
    torch.testing.assert_close(ve_denoised(m, x_t / alpha_t, sigma, prediction_type), x0)


def test_conversion_table_refuses_unknown_types():
    x = torch.zeros(1)
    with pytest.raises(LDMKitError, match="Unknown prediction_type 'noise'"):
        to_x0(x, x, 1.0, 1.0, "noise")
    with pytest.raises(LDMKitError, match="epsilon"):
        to_eps(x, x, 1.0, 1.0, "flow_prediction")  # a flow model's output has no eps form here


def _phi(k: int, z: float) -> float:
    """phi_k(z) = (e^z - sum_{j<k} z^j / j!) / z^k, in float64 (exact enough away from 0)."""
    return (math.exp(z) - sum(z**j / math.factorial(j) for j in range(k))) / z**k


@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("z", [-4.0, -1.3, -0.2, 0.2, 0.7, 2.5])
def test_scaled_phis_are_z_times_the_phi_functions(closed_form, z):
    terms = scaled_phis(torch.tensor(z, dtype=torch.float64), 4, closed_form=closed_form)
    for k, term in enumerate(terms, start=1):
        assert term.item() == pytest.approx(z * _phi(k, z), rel=1e-9, abs=1e-12)


def test_scaled_phis_near_zero_and_at_a_step_to_sigma_zero():
    # expm1 keeps e^z - 1 exact where exp(z) - 1 cancels; z phi_1(z) -> z.
    assert scaled_phis(torch.tensor(1e-9, dtype=torch.float32), 1)[0].item() == pytest.approx(1e-9, rel=1e-6)
    # h = inf in the data-prediction form (z = -h): the first-order step lands on x_0.
    first, second = scaled_phis(torch.tensor(-math.inf), 2)
    assert first.item() == -1.0 and second.item() == -1.0


@pytest.mark.parametrize("name,custom", [("EulerDiscreteScheduler", "timesteps, sigmas"),
                                         ("HeunDiscreteScheduler", "timesteps"),
                                         ("DPMSolverMultistepScheduler", "timesteps"),
                                         ("DPMSolverSinglestepScheduler", "timesteps")])
def test_set_timesteps_takes_exactly_one_schedule(name, custom):
    s = getattr(ls, name)()
    with pytest.raises(LDMKitError, match="exactly one of num_inference_steps"):
        s.set_timesteps(5, timesteps=[900, 500, 100])
    with pytest.raises(LDMKitError, match="exactly one of num_inference_steps"):
        s.set_timesteps()
    karras = getattr(ls, name)(use_karras_sigmas=True)
    with pytest.raises(LDMKitError, match="Custom timesteps cannot be combined with use_karras_sigmas"):
        karras.set_timesteps(timesteps=[900, 500, 100])


def test_custom_timesteps_conflict_names_every_option():
    s = ls.DPMSolverMultistepScheduler(use_exponential_sigmas=True, use_lu_lambdas=True)
    with pytest.raises(LDMKitError, match="use_lu_lambdas / use_exponential_sigmas"):
        s.set_timesteps(timesteps=[900, 500, 100])
    euler = ls.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    with pytest.raises(LDMKitError, match="timestep_type='continuous'.*pass num_inference_steps or sigmas"):
        euler.set_timesteps(timesteps=[900.0, 500.0])
    with pytest.raises(LDMKitError, match="at most one of use_karras_sigmas"):
        ls.HeunDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_options_of_another_schedulers_config_stay_off():
    # A config built from another scheduler's keeps that scheduler's fields; they must not switch options on.
    dpm = ls.DPMSolverMultistepScheduler(use_lu_lambdas=True, final_sigmas_type="sigma_min")
    heun = ls.HeunDiscreteScheduler.from_config(dpm.config)
    heun.set_timesteps(4)
    assert heun.sigmas[-1] == 0
    plain = ls.HeunDiscreteScheduler.from_config(ls.DPMSolverMultistepScheduler().config)
    plain.set_timesteps(4)
    torch.testing.assert_close(heun.sigmas, plain.sigmas)
