"""ldmkit's schedulers in alpha space (DDIM, DDPM, PNDM) against diffusers 0.42.1: whole trajectories, same
model outputs, same generator."""

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
    trajectory,
)

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
# PNDM
# ---------------------------------------------------------------------------------------------------------

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
