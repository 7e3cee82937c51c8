"""Every scheduler inside the pipelines, against diffusers, on the tiny models of conftest.

Where diffusers' own pipeline drives a scheduler correctly it is the reference: its text-to-image pipeline
for DDIM, PNDM and DDPM (noise level 1, no input scaling), its unconditional pipeline for all (it applies
``init_noise_sigma`` and ``scale_model_input``). diffusers' text-to-image pipeline applies neither, and
its super-resolution pipeline scales the low-res condition together with the latent, so for the
sigma-space schedulers there the reference is a sampling loop written here from diffusers' scheduler
class and diffusers' models loaded from the same folder. In the super-resolution loop only the latent
is scaled, as in the original LDM code (the condition is concatenated inside the model, after k-diffusion's
``c_in`` scaling) and diffusers' Stable Diffusion upscaler.

diffusers' pipelines never hand the generator to ``scheduler.step``; where step noise is drawn the tests
bind one to diffusers' step, seeded as the one given to ldmkit.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil

import numpy as np
import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit import DiffusionPipeline, LDMKitError

TOL = 1e-4  # max abs error on pixels in [0, 1], fp32 (the project's bar)
PROMPTS = ["a painting of a squirrel eating a burger", "a red square"]
STEPS = 4
SIZE = 32  # text-to-image pixels: 4x4 latents, enough for the two-level UNet
STEP_SEED = 11

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
TREE = {"noise_sampler_seed": 3}  # DPM-Solver SDE's Brownian tree (diffusers' step takes no generator)

# Schedulers diffusers' text-to-image pipeline drives correctly: (class, config overrides, eta).
VP_CASES = [
    ("DDIMScheduler", {}, 0.0),
    ("DDIMScheduler", {}, 0.5),
    ("PNDMScheduler", {"skip_prk_steps": True}, 0.0),
    ("PNDMScheduler", {}, 0.0),  # Runge-Kutta warm-up steps, then PLMS
    ("DDPMScheduler", {}, 0.0),
]

# Sigma-space schedulers: (class, config overrides).
SIGMA_CASES = [
    ("LMSDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", KARRAS),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", KARRAS),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", KARRAS),
    ("DPMSolverMultistepScheduler", {}),  # DPM-Solver++(2M)
    ("DPMSolverMultistepScheduler", KARRAS),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", SDE),
    ("DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    ("DPMSolverSinglestepScheduler", {}),
    ("DPMSolverSinglestepScheduler", KARRAS),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", KARRAS),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", KARRAS),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", KARRAS),
    ("DEISMultistepScheduler", {}),
    ("DEISMultistepScheduler", KARRAS),
    ("DPMSolverSDEScheduler", TREE),
    ("DPMSolverSDEScheduler", {**TREE, **KARRAS}),
    # EDM Euler is for EDM-preconditioned models: with an LDM it gives noise, in diffusers' loop the same noise.
    ("EDMEulerScheduler", {}),
]

ALL_NAMES = sorted({name for name, *_ in VP_CASES + SIGMA_CASES})


def _case_id(case) -> str:
    name, overrides, *rest = case
    parts = [name.replace("Scheduler", "")] + [f"{k}={v}" for k, v in overrides.items()]
    return "-".join(parts + [f"eta={e}" for e in rest if e])


def _generator(seed: int = STEP_SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _diffusers_step_kwargs(scheduler, seed: int = STEP_SEED) -> dict:
    return {"generator": _generator(seed)} if "generator" in inspect.signature(scheduler.step).parameters else {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and on a shared CPU far faster (idle OpenMP
    threads spin-wait; with two threads this file took minutes instead of seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def t2i(tiny_text2img_dir):
    """(ldmkit pipeline, diffusers pipeline); each test's scheduler is restored afterwards."""
    import diffusers

    ours = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    theirs = diffusers.LDMTextToImagePipeline.from_pretrained(tiny_text2img_dir)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture
def pipes(t2i):
    ours, theirs = t2i
    saved = ours.scheduler, theirs.scheduler
    yield ours, theirs
    ours.scheduler, theirs.scheduler = saved


def _use(pipe, library, name: str, overrides: dict):
    """Swap the pipeline's scheduler the documented way: ``X.from_config(pipe.scheduler.config)``."""
    pipe.scheduler = getattr(library, name).from_config(pipe.scheduler.config, **overrides)
    return pipe.scheduler


def _t2i_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn((len(PROMPTS), 4, SIZE // 8, SIZE // 8), generator=_generator(seed))


def _ours_t2i(ours, latents, guidance_scale, steps=STEPS, eta=0.0, prompts=PROMPTS, seed=STEP_SEED):
    return ours(prompts, latents=latents.clone(), generator=_generator(seed), num_inference_steps=steps,
                guidance_scale=guidance_scale, eta=eta, height=SIZE, width=SIZE, output_type="np").images


def _sample(scheduler, latents, predict_eps, steps=STEPS):
    """The sampling loop every pipeline runs, with diffusers' ``scheduler``: ``predict_eps(x, t)`` applies
    the scheduler's input scaling itself."""
    scheduler.set_timesteps(steps)
    x = latents.clone() * scheduler.init_noise_sigma
    extra = _diffusers_step_kwargs(scheduler)
    for t in scheduler.timesteps:
        x = scheduler.step(predict_eps(x, t), t, x, **extra).prev_sample
    return x


@torch.no_grad()
def _reference_t2i(theirs, scheduler, latents, guidance_scale, steps=STEPS):
    """Text-to-image sampling with diffusers' models and ``scheduler``, as its pipeline would do it if it
    applied ``init_noise_sigma`` and ``scale_model_input`` (and passed the generator to ``step``)."""

    def encode(texts):
        ids = theirs.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return theirs.bert(ids.input_ids)[0]

    guided = guidance_scale != 1.0
    context = encode(PROMPTS)
    if guided:
        context = torch.cat([encode([""] * len(PROMPTS)), context])

    def predict_eps(x, t):
        model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        eps = theirs.unet(model_input, t, encoder_hidden_states=context).sample
        if not guided:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    x = _sample(scheduler, latents, predict_eps, steps)
    image = theirs.vqvae.decode(x / theirs.vqvae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _assert_images_close(got, ref):
    assert got.shape == ref.shape
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    assert np.abs(got - ref).max() <= TOL


# ------------------------------------------------------------------------------------------ text-to-image


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("case", VP_CASES, ids=_case_id)
def test_text2img_matches_diffusers_pipeline(pipes, case, guidance_scale):
    import diffusers

    name, overrides, eta = case
    ours, theirs = pipes
    _use(ours, ls, name, overrides)
    scheduler = _use(theirs, diffusers, name, overrides)
    scheduler.step = functools.partial(scheduler.step, **_diffusers_step_kwargs(scheduler))
    latents = _t2i_latents()
    ref = theirs(PROMPTS, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=guidance_scale,
                 eta=eta, height=SIZE, width=SIZE, output_type="np").images
    _assert_images_close(_ours_t2i(ours, latents, guidance_scale, eta=eta), ref)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("case", SIGMA_CASES, ids=_case_id)
def test_text2img_sigma_schedulers_match_diffusers_loop(pipes, case, guidance_scale):
    import diffusers

    name, overrides = case
    ours, theirs = pipes
    _use(ours, ls, name, overrides)
    scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, **overrides)
    latents = _t2i_latents()
    ref = _reference_t2i(theirs, scheduler, latents, guidance_scale)
    _assert_images_close(_ours_t2i(ours, latents, guidance_scale), ref)


def test_compvis_ddim_matches_the_published_config(pipes):
    """``DDIMScheduler.compvis()`` is the sampler the LDM checkpoints ship with (here: the fixture's)."""
    ours, theirs = pipes
    ours.scheduler = ls.DDIMScheduler.compvis()
    latents = _t2i_latents(1)
    ref = theirs(PROMPTS, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=3.0, height=SIZE,
                 width=SIZE, output_type="np").images
    _assert_images_close(_ours_t2i(ours, latents, 3.0), ref)


# ---------------------------------------------------------------------------- unconditional and super-res

UNCOND_SR_CASES = [
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    ("UniPCMultistepScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("DPMSolverSDEScheduler", TREE),
    ("EDMEulerScheduler", {}),
]


@pytest.fixture(scope="module")
def kl_decoders(tmp_path_factory):
    """(ldmkit, diffusers) copies of one small KL autoencoder with 3 latent channels and a 4x decoder.

    The unconditional and super-resolution pipelines decode with a VQ model. With the random tiny UNet the
    final latents sit far outside the codebook (|z| ~ 40, codes ~ 1), where all codes are almost equally
    near: the nearest two differ in distance by ~1e-5, so a 1e-6 rounding difference in the latent can flip
    a code and move pixels by 0.07. The sampler is what is under test, so its latents are decoded here by a
    continuous decoder (VQ decoding itself is compared in test_pipeline_superres and the model tests).
    """
    from diffusers import AutoencoderKL as DiffusersKL

    from ldmkit import AutoencoderKL
    from reference_models import perturb

    torch.manual_seed(0)
    theirs = DiffusersKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8)
    perturb(theirs)
    folder = tmp_path_factory.mktemp("kl")
    theirs.save_pretrained(folder)
    return AutoencoderKL.from_pretrained(folder), theirs


def _ours_with_final_latents(pipe, *args, **kwargs):
    """Run an ldmkit pipeline; return its images and the latents it decoded them from."""
    seen = []
    images = pipe(*args, callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"]), output_type="np",
                  num_inference_steps=STEPS, generator=_generator(), **kwargs).images
    return images, seen[-1]


def _assert_latents_close(got, ref):
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", UNCOND_SR_CASES, ids=_case_id)
@torch.no_grad()
def test_uncond_matches_diffusers_loop(tiny_uncond_dir, kl_decoders, case):
    """diffusers' unconditional pipeline scales the noise by init_noise_sigma before set_timesteps, so for
    sigma schedulers with leading spacing it starts at the wrong noise level: the reference is a loop."""
    import diffusers

    name, overrides = case
    ours_kl, theirs_kl = kl_decoders
    ours = DiffusionPipeline.from_pretrained(tiny_uncond_dir, vqvae=ours_kl)
    ours.set_progress_bar_config(disable=True)
    theirs = diffusers.LDMPipeline.from_pretrained(tiny_uncond_dir, vqvae=theirs_kl)
    ours.scheduler = getattr(ls, name).from_config(ours.scheduler.config, **overrides)
    scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, **overrides)

    latents = torch.randn((2, 3, 16, 16), generator=_generator(0))
    ref_latents = _sample(scheduler, latents, lambda x, t: theirs.unet(scheduler.scale_model_input(x, t), t).sample)
    ref = theirs_kl.decode(ref_latents / theirs_kl.config.scaling_factor).sample
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got, got_latents = _ours_with_final_latents(ours, batch_size=2, latents=latents)
    _assert_latents_close(got_latents, ref_latents)
    _assert_images_close(got, ref)


@pytest.mark.parametrize("case", UNCOND_SR_CASES, ids=_case_id)
@torch.no_grad()
def test_superres_matches_diffusers_loop(tiny_superres_dir, kl_decoders, case):
    import diffusers

    name, overrides = case
    ours_kl, theirs_kl = kl_decoders
    ours = DiffusionPipeline.from_pretrained(tiny_superres_dir, vqvae=ours_kl)
    ours.set_progress_bar_config(disable=True)
    theirs = diffusers.LDMSuperResolutionPipeline.from_pretrained(tiny_superres_dir, vqvae=theirs_kl)
    ours.scheduler = getattr(ls, name).from_config(ours.scheduler.config, **overrides)
    scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, **overrides)

    lowres = torch.rand((1, 3, 16, 16), generator=_generator(5))
    latents = torch.randn((1, 3, 16, 16), generator=_generator(0))
    cond = lowres * 2 - 1
    ref_latents = _sample(scheduler, latents, lambda x, t: theirs.unet(
        torch.cat([scheduler.scale_model_input(x, t), cond], dim=1), t).sample)
    ref = (theirs_kl.decode(ref_latents).sample.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    got, got_latents = _ours_with_final_latents(ours, cond, latents=latents, tiling=False)  # tensors in [-1, 1]
    _assert_latents_close(got_latents, ref_latents)
    _assert_images_close(got, ref)


# ------------------------------------------------------------------------------ swapping, reuse, validation

SWAPS = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
         "UniPCMultistepScheduler", "PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]


def test_switching_schedulers_back_and_forth_equals_fresh_pipelines(pipes, tiny_text2img_dir):
    ours, _ = pipes
    original = dict(ours.scheduler.config)
    latents = _t2i_latents(2)
    for name in SWAPS:
        ours.scheduler = getattr(ls, name).from_config(ours.scheduler.config)
        fresh = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
        fresh.set_progress_bar_config(disable=True)
        fresh.scheduler = getattr(ls, name).from_config(fresh.scheduler.config)
        got, ref = _ours_t2i(ours, latents, 3.0), _ours_t2i(fresh, latents, 3.0)
        assert np.array_equal(got, ref), name
    # Back at DDIM, the fields Euler and the others do not take (clip_sample, set_alpha_to_one) survived.
    ours.scheduler = ls.DDIMScheduler.from_config(ours.scheduler.config)
    assert {k: ours.scheduler.config[k] for k in original} == original


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_swap_from_a_config_without_spacing_matches_diffusers(pipes, tiny_text2img_dir, tmp_path, name):
    """The published LDM scheduler configs predate ``timestep_spacing``. A scheduler swapped in from such a
    config takes its own default spacing (``linspace``: starts at t = 999), as in diffusers, not DDIM's
    ``leading`` (which starts Euler at t = 751 for 4 steps)."""
    import diffusers

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_text2img_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    published = ("_class_name", "beta_start", "beta_end", "beta_schedule", "clip_sample", "num_train_timesteps",
                 "set_alpha_to_one", "steps_offset", "trained_betas")
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k in published}))

    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = getattr(ls, name).from_config(ours.scheduler.config)
    theirs_ddim = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler = getattr(diffusers, name).from_config(theirs_ddim.config)
    assert ours.scheduler.config.timestep_spacing == scheduler.config.timestep_spacing == "linspace"
    latents = _t2i_latents(5)
    ref = _reference_t2i(pipes[1], scheduler, latents, 3.0)
    _assert_images_close(_ours_t2i(ours, latents, 3.0), ref)


@pytest.mark.parametrize("case", [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", SDE),
    ("DPMSolverSinglestepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("PNDMScheduler", {}),
    ("HeunDiscreteScheduler", {}),
], ids=_case_id)
def test_multistep_state_does_not_leak_between_calls(pipes, case):
    """The multistep history is reset by set_timesteps: call, call with other settings, call again."""
    ours, _ = pipes
    _use(ours, ls, *case)
    latents = _t2i_latents(3)
    first = _ours_t2i(ours, latents, 3.0)
    _ours_t2i(ours, _t2i_latents(4), 1.0, steps=STEPS + 1, prompts=PROMPTS[::-1], seed=1)
    assert np.array_equal(first, _ours_t2i(ours, latents, 3.0))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_step_counts_raise_ldmkit_error_from_the_pipeline(pipes, name):
    ours, _ = pipes
    _use(ours, ls, name, {})
    with pytest.raises(LDMKitError, match="1001"):
        ours(PROMPTS, num_inference_steps=1001, output_type="latent")


def test_pndm_runge_kutta_warmup_needs_four_steps(pipes):
    ours, _ = pipes
    _use(ours, ls, "PNDMScheduler", {"skip_prk_steps": False})
    with pytest.raises(LDMKitError, match="skip_prk_steps"):
        ours(PROMPTS, num_inference_steps=3, output_type="latent")
