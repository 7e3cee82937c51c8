"""ldmkit schedulers against diffusers 0.42.1: whole trajectories, same model outputs, same generator."""

from __future__ import annotations

import inspect
import json
import logging

import diffusers
import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.errors import LDMKitError

ATOL = RTOL = 1e-5
C = 3


def fake_model(x: torch.Tensor, t, out_channels: int = C, positive_variance: bool = False) -> torch.Tensor:
    """A fixed random linear "network" eps = f(x, t), identical for both libraries."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(out_channels, x.shape[1], generator=g) * 0.3
    b = torch.randn(out_channels, 1, 1, generator=g) * 0.1
    tt = float(t) / 1000.0
    xf = x.float()
    out = torch.einsum("oc,bchw->bohw", w, xf) + b * (1 + tt) + 0.05 * torch.sin(xf * 3).sum(1, True)
    if out_channels > x.shape[1]:  # learned variance: second half in [-1, 1]
        v = out[:, x.shape[1]:]
        out[:, x.shape[1]:] = torch.sigmoid(v) * 1e-2 if positive_variance else torch.tanh(v)
    return out.to(x.dtype)


def trajectory(scheduler, steps: int, *, seed: int = 0, out_channels: int = C, set_kwargs=None,
               positive_variance: bool = False, **step_kwargs):
    """Run a whole sampling loop; return every step's (prev_sample, pred_original_sample)."""
    scheduler.set_timesteps(steps, **(set_kwargs or {}))
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(42)) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = dict(step_kwargs, generator=gen)
    outs = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = fake_model(inp, t, out_channels, positive_variance)
        res = scheduler.step(eps, t, x, **step_kwargs)
        x = res.prev_sample
        outs.append((x, getattr(res, "pred_original_sample", None)))
    outs.append((x, None))
    return outs, [float(t) for t in scheduler.timesteps]


def assert_same_trajectory(ours, theirs):
    (a_out, a_ts), (b_out, b_ts) = ours, theirs
    assert a_ts == b_ts
    assert len(a_out) == len(b_out)
    for i, ((a, a0), (b, b0)) in enumerate(zip(a_out, b_out)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"step {i}: {m}")
        if a0 is not None and b0 is not None:
            torch.testing.assert_close(a0, b0, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"x0, step {i}: {m}")
    assert torch.isfinite(a_out[-1][0]).all()


def compare(name, config, steps=6, step_kwargs=None, out_channels=C, set_kwargs=None):
    ours = getattr(ls, name)(**config)
    theirs = getattr(diffusers, name)(**config)
    step_kwargs = step_kwargs or {}
    kw = dict(out_channels=out_channels, set_kwargs=set_kwargs,
              positive_variance=config.get("variance_type") == "learned")
    a = trajectory(ours, steps, **kw, **step_kwargs)
    b = trajectory(theirs, steps, **kw, **step_kwargs)
    assert_same_trajectory(a, b)
    return ours, theirs


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# ---------------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------------

DDIM_CASES = [
    {},
    dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    dict(SD, clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction",
         rescale_betas_zero_snr=True, steps_offset=1),
    dict(timestep_spacing="linspace", prediction_type="sample", clip_sample_range=0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=True),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
]


@pytest.mark.parametrize("config", DDIM_CASES)
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
def test_ddim_matches_diffusers(config, eta):
    if config.get("rescale_betas_zero_snr") and eta == 1.0:
        pytest.skip("diffusers gives NaN here (see test_ddim_zero_snr_eta_one_is_finite)")
    compare("DDIMScheduler", config, step_kwargs=dict(eta=eta))


def test_ddim_zero_snr_eta_one_is_finite():
    # diffusers takes sqrt of a rounding-negative 1 - a_prev - sigma^2 here (NaN); ldmkit clamps at 0.
    config = dict(SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                  prediction_type="v_prediction")
    outs, _ = trajectory(ls.DDIMScheduler(**config), 6, eta=1.0)
    assert all(torch.isfinite(x).all() for x, _ in outs)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_step_counts(steps):
    compare("DDIMScheduler", dict(SD, clip_sample=False), steps=steps, step_kwargs=dict(eta=0.5))


def test_ddim_use_clipped_model_output():
    compare("DDIMScheduler", dict(clip_sample_range=0.3),
            step_kwargs=dict(eta=0.5, use_clipped_model_output=True))


def test_ddim_variance_noise_and_return_tuple():
    ours, theirs = ls.DDIMScheduler(**SD), diffusers.DDIMScheduler(**SD)
    for s in (ours, theirs):
        s.set_timesteps(5)
    x = torch.randn(1, C, 4, 4)
    noise = torch.randn(1, C, 4, 4)
    t = ours.timesteps[1]
    a = ours.step(fake_model(x, t), t, x, eta=0.7, variance_noise=noise, return_dict=False)
    b = theirs.step(fake_model(x, t), t, x, eta=0.7, variance_noise=noise, return_dict=False)
    assert isinstance(a, tuple) and len(a) == 2
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(a[1], b[1], atol=ATOL, rtol=RTOL)
    with pytest.raises(LDMKitError, match="generator and variance_noise"):
        ours.step(fake_model(x, t), t, x, eta=0.7, variance_noise=noise, generator=torch.Generator())


def test_ddim_compvis_preset():
    s = ls.DDIMScheduler.compvis()
    assert s.config.steps_offset == 1 and s.config.set_alpha_to_one is False and s.config.clip_sample is False
    s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1
    assert s.final_alpha_cumprod == s.alphas_cumprod[0]
    # The last step lands on alphas_cumprod[0], as ldm/models/diffusion/ddim.py does.
    x, eps = torch.randn(1, C, 2, 2), torch.randn(1, C, 2, 2)
    a_t, a_prev = s.alphas_cumprod[1], s.alphas_cumprod[0]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(s.step(eps, 1, x).prev_sample, expected)
    assert ls.DDIMScheduler.compvis(eta_unused_key=1, steps_offset=0).config.steps_offset == 0


# ---------------------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------------------

DDPM_CASES = [
    ({}, C),
    (dict(variance_type="fixed_small_log"), C),
    (dict(variance_type="fixed_large", prediction_type="v_prediction", clip_sample=False), C),
    (dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2"), 2 * C),
    (dict(variance_type="learned", clip_sample=False), 2 * C),
    (dict(SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
          prediction_type="v_prediction"), C),
    (dict(timestep_spacing="linspace", prediction_type="sample", thresholding=True), C),
    (dict(steps_offset=1, beta_schedule="sigmoid"), C),
]


@pytest.mark.parametrize("config,out_channels", DDPM_CASES)
def test_ddpm_matches_diffusers(config, out_channels):
    compare("DDPMScheduler", config, steps=6, out_channels=out_channels)


def test_ddpm_learned_needs_double_channels():
    s = ls.DDPMScheduler(variance_type="learned_range")
    s.set_timesteps(4)
    x = torch.randn(1, C, 2, 2)
    with pytest.raises(LDMKitError, match="twice"):
        s.step(x, s.timesteps[0], x)


def test_ddpm_full_chain_without_set_timesteps():
    ours, theirs = ls.DDPMScheduler(num_train_timesteps=20), diffusers.DDPMScheduler(num_train_timesteps=20)
    x = torch.randn(1, C, 2, 2)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xa = xb = x
    for t in range(19, -1, -1):
        xa = ours.step(fake_model(xa, t), t, xa, generator=ga).prev_sample
        xb = theirs.step(fake_model(xb, t), t, xb, generator=gb).prev_sample
    torch.testing.assert_close(xa, xb, atol=ATOL, rtol=RTOL)


def test_ddpm_custom_timesteps():
    ours, theirs = ls.DDPMScheduler(), diffusers.DDPMScheduler()
    custom = [900, 500, 200, 10, 0]
    a = trajectory(ours, None, set_kwargs=dict(timesteps=custom), seed=5)
    b = trajectory(theirs, None, set_kwargs=dict(timesteps=custom), seed=5)
    assert_same_trajectory(a, b)
    with pytest.raises(LDMKitError, match="descending"):
        ours.set_timesteps(timesteps=[1, 5])
    with pytest.raises(LDMKitError, match="not both"):
        ours.set_timesteps(5, timesteps=[5, 1])


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_add_noise_and_velocity(name):
    ours, theirs = getattr(ls, name)(**SD), getattr(diffusers, name)(**SD)
    x, noise = torch.randn(3, C, 4, 4), torch.randn(3, C, 4, 4)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t))
    torch.testing.assert_close(ours.get_velocity(x, noise, t), theirs.get_velocity(x, noise, t))
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod)
    half = ours.add_noise(x.half(), noise.half(), t)
    assert half.dtype == torch.float16


def test_generator_list_matches_diffusers():
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    ours, theirs = ls.DDPMScheduler(), diffusers.DDPMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(3)
    x = torch.randn(2, C, 4, 4)
    t = ours.timesteps[0]
    a = ours.step(fake_model(x, t), t, x, generator=gens()).prev_sample
    b = theirs.step(fake_model(x, t), t, x, generator=gens()).prev_sample
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# The rest of the family
# ---------------------------------------------------------------------------------------------------------

HAS_SCIPY = True
try:
    import scipy.stats  # noqa: F401
except ImportError:  # diffusers' LMSDiscreteScheduler and beta sigmas need scipy
    HAS_SCIPY = False
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="diffusers needs scipy for this")

PNDM_CASES = [
    {},
    dict(skip_prk_steps=True),
    dict(SD, skip_prk_steps=True, steps_offset=1),
    dict(SD, skip_prk_steps=False, steps_offset=1, set_alpha_to_one=True),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", skip_prk_steps=True),
    dict(prediction_type="v_prediction", timestep_spacing="linspace"),
]


@pytest.mark.parametrize("config", PNDM_CASES)
@pytest.mark.parametrize("steps", [6, 10])
def test_pndm_matches_diffusers(config, steps):
    compare("PNDMScheduler", config, steps=steps)


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


def test_half_precision_runs():
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "DDIMScheduler"):
        s = getattr(ls, name)(**SD)
        s.set_timesteps(3)
        x = torch.randn(1, C, 4, 4).half()
        for t in s.timesteps:
            x = s.step(fake_model(s.scale_model_input(x, t), t), t, x).prev_sample
        assert x.dtype == torch.float16 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------
# Common contract: validation, configs, reuse
# ---------------------------------------------------------------------------------------------------------

ALL = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
       "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
       "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad,match", [(0, "at least 1"), (-3, "at least 1"), (1001, "exceeds"),
                                       (2.5, "must be an int"), ("10", "must be an int"),
                                       (True, "must be an int")])
def test_set_timesteps_validation(name, bad, match):
    s = getattr(ls, name)()
    with pytest.raises(LDMKitError, match=match):
        s.set_timesteps(bad)


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


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip_with_diffusers(name, tmp_path):
    fields = getattr(ls, name)._config_fields()
    config = dict(SD, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing")
    config = {k: v for k, v in config.items() if k in fields}
    ours = getattr(ls, name)(**config)
    ours.save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "scheduler_config.json").read_text())
    assert data["_class_name"] == name and "_diffusers_version" in data
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "a")
    for k, v in ours.config.items():
        assert theirs.config[k] == v, k
    theirs.save_pretrained(tmp_path / "b")
    back = getattr(ls, name).from_pretrained(tmp_path / "b")
    assert dict(back.config) == dict(ours.config)
    # subfolder and keyword overrides
    ours.save_pretrained(tmp_path / "c" / "scheduler")
    sub = getattr(ls, name).from_pretrained(tmp_path / "c", subfolder="scheduler", beta_end=0.02)
    assert sub.config.beta_end == 0.02 and sub.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ALL)
def test_unknown_config_keys_warn(name, caplog):
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        s = getattr(ls, name).from_config({"num_train_timesteps": 500, "some_future_option": 3,
                                           "_class_name": "X", "_diffusers_version": "9.9"})
    assert s.config.num_train_timesteps == 500
    assert "some_future_option" in caplog.text
    assert "_class_name" not in caplog.text


@pytest.mark.parametrize("name", ALL)
def test_reuse_gives_identical_results(name):
    extra = {"DPMSolverMultistepScheduler": dict(algorithm_type="sde-dpmsolver++", solver_order=3),
             "DPMSolverSinglestepScheduler": dict(algorithm_type="sde-dpmsolver++", solver_order=3),
             "UniPCMultistepScheduler": dict(solver_order=3)}.get(name, {})
    s = getattr(ls, name)(**SD, **extra)
    kw = dict(eta=0.5) if name == "DDIMScheduler" else {}
    a = trajectory(s, 5, seed=7, **kw)
    trajectory(s, 4, seed=1, **kw)
    b = trajectory(s, 5, seed=7, **kw)
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("src", ALL)
@pytest.mark.parametrize("dst", ALL)
def test_from_config_interchange(src, dst, caplog):
    a = getattr(ls, src)(**SD, prediction_type="v_prediction")
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        b = getattr(ls, dst).from_config(a.config)
    assert caplog.text == ""  # sibling fields are dropped quietly, as in diffusers
    assert b.config.beta_schedule == "scaled_linear" and b.config.prediction_type == "v_prediction"
    assert type(b) in a.compatibles
    # and from diffusers' own config object
    c = getattr(ls, dst).from_config(getattr(diffusers, src)(**SD).config)
    assert c.config.beta_end == 0.012


def test_step_before_set_timesteps_errors():
    s = ls.DDIMScheduler()
    x = torch.zeros(1, C, 2, 2)
    with pytest.raises(LDMKitError, match="set_timesteps"):
        s.step(x, 999, x)
