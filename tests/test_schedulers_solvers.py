"""ldmkit's exponential-integrator solvers (DPM-Solver multistep and singlestep, UniPC) against diffusers
0.42.1: whole trajectories, same model outputs, same generator."""

from __future__ import annotations

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
# DPM-Solver, UniPC
# ---------------------------------------------------------------------------------------------------------

DPM_MULTI_CASES = [
    {},
    dict(SD, use_karras_sigmas=True),
    dict(SD, algorithm_type="sde-dpmsolver++"),
    dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_order=3),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(solver_type="heun"),
    dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"),
    dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(SD, timestep_spacing="leading", steps_offset=1, lower_order_final=False),
    dict(use_lu_lambdas=True, euler_at_final=True),
    dict(use_exponential_sigmas=True),
    pytest.param(dict(use_beta_sigmas=True), marks=needs_scipy),
    dict(thresholding=True, prediction_type="sample", sample_max_value=2.0),
    dict(thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),
]


@pytest.mark.parametrize("config", DPM_MULTI_CASES)
@pytest.mark.parametrize("steps", [7, 16])
def test_dpm_multistep_matches_diffusers(config, steps):
    compare("DPMSolverMultistepScheduler", config, steps=steps)


def test_dpm_multistep_learned_variance_and_variance_noise():
    # variance_type="learned_range": the model's second half (variance) is dropped.
    compare("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), out_channels=2 * C)
    ours = ls.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    theirs = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    x = torch.randn(1, C, 4, 4)
    for s in (ours, theirs):
        s.set_timesteps(4)
    outs = []
    for s in (ours, theirs):
        y = x
        for i, t in enumerate(s.timesteps):
            noise = torch.randn(1, C, 4, 4, generator=torch.Generator().manual_seed(i))
            y = s.step(fake_model(y, t), t, y, variance_noise=noise).prev_sample
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=RTOL)


def test_dpm_multistep_custom_timesteps():
    ts = [901, 700, 500, 300, 101]
    a = trajectory(ls.DPMSolverMultistepScheduler(**SD), None, set_kwargs=dict(timesteps=ts))
    b = trajectory(diffusers.DPMSolverMultistepScheduler(**SD), None, set_kwargs=dict(timesteps=ts))
    assert_same_trajectory(a, b)


DPM_SINGLE_CASES = [
    {},
    dict(solver_order=3),
    dict(solver_order=1),
    dict(SD, solver_order=3, use_karras_sigmas=True),
    dict(solver_type="heun", solver_order=3),
    dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun", solver_order=3),
    dict(prediction_type="v_prediction", final_sigmas_type="sigma_min", lower_order_final=True),
    dict(final_sigmas_type="sigma_min"),
    dict(use_exponential_sigmas=True, thresholding=True, prediction_type="sample"),
]


@pytest.mark.parametrize("config", DPM_SINGLE_CASES)
@pytest.mark.parametrize("steps", [6, 7, 8])
def test_dpm_singlestep_matches_diffusers(config, steps):
    compare("DPMSolverSinglestepScheduler", config, steps=steps)


def test_dpm_singlestep_reuse_does_not_depend_on_history():
    config = dict(final_sigmas_type="sigma_min")
    fresh = trajectory(ls.DPMSolverSinglestepScheduler(**config), 8)
    used = ls.DPMSolverSinglestepScheduler(**config)
    trajectory(used, 7)  # diffusers would switch its config to lower_order_final=True for good here
    assert_same_trajectory(trajectory(used, 8), fresh)
    assert used.config.lower_order_final is False


UNIPC_CASES = [
    {},
    dict(solver_order=1),
    dict(solver_order=3),
    # bh1, eps prediction and lower_order_final=False give NaN / a singular system in diffusers at a final
    # sigma of 0 (see test_unipc_final_zero_sigma_is_finite); compare them against sigma_min.
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(SD, use_karras_sigmas=True, solver_order=3),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 2]),
    dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"),
    dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(SD, timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"),
    dict(thresholding=True, prediction_type="sample"),
    dict(use_exponential_sigmas=True, sigma_min=0.1),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1),
]


@pytest.mark.parametrize("config", UNIPC_CASES)
@pytest.mark.parametrize("steps", [5, 8])
def test_unipc_matches_diffusers(config, steps):
    compare("UniPCMultistepScheduler", config, steps=steps)


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(predict_x0=False),
                                    dict(predict_x0=False, solver_type="bh1"),
                                    dict(lower_order_final=False, solver_order=3)])
def test_unipc_final_zero_sigma_is_finite(config):
    # diffusers returns NaN (or fails to solve) on the last step to sigma = 0 here; ldmkit takes the limit:
    # a first-order step that lands on the x_0 estimate.
    outs, _ = trajectory(ls.UniPCMultistepScheduler(**config), 6)
    assert all(torch.isfinite(x).all() for x, _ in outs)
    if "lower_order_final" not in config:
        ref = trajectory(diffusers.UniPCMultistepScheduler(**config), 6)  # all steps before the last agree
        assert_same_trajectory((outs[:-2], []), (ref[0][:-2], []))


def test_unipc_solver_p():
    ours = ls.UniPCMultistepScheduler(solver_p=ls.DPMSolverMultistepScheduler())
    theirs = diffusers.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler())
    assert_same_trajectory(trajectory(ours, 6), trajectory(theirs, 6))
    assert ours.config.solver_p is None


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_multistep_solvers_refuse_repeated_timesteps(name, spacing):
    # 1000 steps over 1000 training steps repeat a timestep after rounding; diffusers divides by zero there.
    s = getattr(ls, name)(timestep_spacing=spacing)
    with pytest.raises(LDMKitError, match="Use at most 999 steps"):
        s.set_timesteps(1000)
    s.set_timesteps(999)
    assert len(torch.unique(s.timesteps)) == 999
    sample = torch.ones(1, 1, 2, 2)
    for t in s.timesteps[:3]:
        sample = s.step(torch.zeros_like(sample), t, sample).prev_sample
    assert torch.isfinite(sample).all()
