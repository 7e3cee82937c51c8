"""Original CompVis checkpoints of five families reproduce the outputs the original code recorded.

Per family: first-stage encode / decode, the conditioning (BERT, class embedder), every UNet call, the DDIM
sampler's steps (eta 0 and 1) and PLMS, whole pipeline trajectories from the recorded x_T and seed, the
decoded images and the inpainting composite. Tolerance: 1e-5 relative to the reference's magnitude.
"""

from __future__ import annotations

import pytest
import torch

from compvis_fixtures import (
    FAMILIES,
    GUIDED,
    RUNS,
    SEED,
    assert_rel,
    call_pipeline,
    expected_images,
    load,
    model_call,
    prompts,
    reference,
    requires_fixtures,
    single_thread,
)
from ldmkit import LDMKitError, PNDMScheduler
from ldmkit.pipelines.denoising import make_step

pytestmark = requires_fixtures
_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
ALL_RUNS = [(f, r) for f in FAMILIES for r in RUNS] + [("txt2img", "plms")]


@pytest.mark.parametrize("family", FAMILIES)
def test_first_stage_encode_decode(family):
    pipe, ref = load(family), reference(family)
    with torch.no_grad():
        if family == "txt2img":  # KL: quant_conv(encoder(x)) = mean ++ logvar; decode the mode
            posterior = pipe.vqvae.encode(ref["fs_check.image"]).latent_dist
            assert_rel(posterior.parameters, ref["fs_check.moments"], "KL moments")
            assert_rel(posterior.mode(), ref["fs_check.posterior_mode"], "KL mode")
            decoded = pipe.vqvae.decode(ref["fs_check.posterior_mode"]).sample
        else:  # VQ: encode stops before quantization, decode quantizes
            assert_rel(pipe.vqvae.encode(ref["fs_check.image"]).latents, ref["fs_check.h"], "VQ encode")
            decoded = pipe.vqvae.decode(ref["fs_check.h"]).sample
    assert_rel(decoded, ref["fs_check.decoded"], "first-stage decode")


def test_text_encoder_and_tokens():
    pipe, ref = load("txt2img"), reference("txt2img")
    for name, texts in (("cond", prompts(ref["cond.token_ids"])), ("uncond", ["", ""])):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.max_length, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(ids, ref[f"{name}.token_ids"])
        with torch.no_grad():
            assert_rel(pipe.bert(ids)[0], ref[f"{name}.bert_out"], f"{name} BERT output")


def test_class_embedder():
    pipe, ref = load("cin"), reference("cin")
    with torch.no_grad():
        assert torch.equal(pipe.class_embedder(ref["cond.class_label"]), ref["cond.c"])
        assert torch.equal(pipe.class_embedder(ref["uncond.class_label"]), ref["uncond.c"])
    assert pipe.class_embedder.null_class == 1000


@pytest.mark.parametrize("family,run", ALL_RUNS)
def test_every_model_call(family, run):
    pipe, ref = load(family), reference(family)
    for i, (x, t) in enumerate(zip(ref[f"{run}.model_in_x"], ref[f"{run}.model_in_t"])):
        out = model_call(pipe, family, x, t)
        if i == 0:
            assert_rel(out, ref[f"{run}.first_model_out"], "first model call")
            eps = out
            if family in GUIDED:
                uncond, cond = out.chunk(2)
                eps = uncond + GUIDED[family] * (cond - uncond)
            assert_rel(eps, ref[f"{run}.first_eps"], "first (guided) eps")
        assert_rel(out, ref[f"{run}.model_out"][i], f"model call {i}")


@pytest.mark.parametrize("family,run", [(f, r) for f in FAMILIES for r in RUNS])
def test_ddim_steps_replayed(family, run):
    """Our DDIM, configured as the original, on the recorded model outputs and noise: every x_{t-1} and x_0."""
    pipe, ref = load(family), reference(family)
    scheduler, eta = pipe.scheduler, 1.0 if run == "ddim_eta1" else 0.0
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert ref[f"{run}.model_in_t"][:, 0].tolist() == scheduler.timesteps.tolist()
    assert_rel(scheduler.alphas_cumprod[scheduler.timesteps.flip(0)], ref[f"{run}.ddim_alphas"], "ddim_alphas")
    for i, t in enumerate(scheduler.timesteps):
        eps = ref[f"{run}.model_out"][i]
        if family in GUIDED:
            uncond, cond = eps.chunk(2)
            eps = uncond + GUIDED[family] * (cond - uncond)
        out = scheduler.step(eps, t, ref[f"{run}.x_inter"][i], eta=eta, variance_noise=ref[f"{run}.noise"][i])
        assert_rel(out.prev_sample, ref[f"{run}.x_inter"][i + 1], f"x after step {i}")
        assert_rel(out.pred_original_sample, ref[f"{run}.pred_x0"][i + 1], f"pred_x0 of step {i}")


@pytest.mark.parametrize("family,run", [(f, r) for f in FAMILIES for r in RUNS])
def test_ddim_pipeline_trajectory_and_images(family, run):
    pipe, ref = load(family), reference(family)
    steps = []
    out = call_pipeline(pipe, family, 1.0 if run == "ddim_eta1" else 0.0, output_type="pt",
                        callback_on_step_end=lambda p, i, t, d: steps.append(d["latents"].clone()))
    for i, latents in enumerate(steps):
        assert_rel(latents, ref[f"{run}.x_inter"][i + 1], f"latents after step {i}")
    assert_rel(steps[-1], ref[f"{run}.samples"], "samples")
    assert_rel(out.images, expected_images(family, run), "images" if family != "inpainting" else "composite")


def test_plms_pipeline_trajectory_and_images():
    pipe, ref = load("txt2img"), reference("txt2img")
    plms = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe = type(pipe)(**{**pipe.components, "scheduler": plms})
    pipe.set_progress_bar_config(disable=True)
    steps = []
    out = call_pipeline(pipe, "txt2img", 0.0, output_type="pt",
                        callback_on_step_end=lambda p, i, t, d: steps.append(d["latents"].clone()))
    # The first PLMS step evaluates the model twice (pseudo improved Euler): x' then the step proper.
    assert len(steps) == 6
    assert_rel(torch.cat([steps[0]] * 2), ref["plms.model_in_x"][1], "PLMS x'")
    for i, latents in enumerate(steps[1:]):
        assert_rel(latents, ref["plms.x_inter"][i + 1], f"PLMS latents after step {i}")
    assert_rel(out.images, expected_images("txt2img", "plms"), "PLMS images")


def test_plms_with_compvis_noise_draws_like_the_original():
    """PLMS through the loop's CompVis step: same trajectory; the generator advances by the 6 recorded draws."""
    pipe, ref = load("txt2img"), reference("txt2img")
    scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == ref["plms.model_in_t"][:, 0].tolist()
    generator, latents = torch.Generator().manual_seed(SEED), ref["x_T"]
    step = make_step(scheduler, 0.0, generator, draw_noise_every_step=True)
    for t in scheduler.timesteps:
        uncond, cond = model_call(pipe, "txt2img", torch.cat([latents] * 2), t).chunk(2)
        latents = step(uncond + 3.0 * (cond - uncond), t, latents)
    assert_rel(latents, ref["plms.samples"], "PLMS samples")
    _assert_consumed(generator, ref["plms.noise"])


def _assert_consumed(generator: torch.Generator, recorded: torch.Tensor) -> None:
    """``generator`` has drawn exactly the recorded per-step noise after seeding."""
    fresh = torch.Generator().manual_seed(SEED)
    for draw in recorded:
        assert torch.equal(torch.randn(draw.shape, generator=fresh), draw)
    assert torch.equal(generator.get_state(), fresh.get_state())


@pytest.mark.parametrize("family,run", [(f, "ddim_eta0") for f in FAMILIES] + [("cin", "ddim_eta1")])
def test_noise_is_drawn_at_every_step_even_at_eta_0(family, run):
    pipe, ref = load(family), reference(family)
    generator = torch.Generator().manual_seed(SEED)
    call_pipeline(pipe, family, 1.0 if run == "ddim_eta1" else 0.0, generator=generator, output_type="latent")
    _assert_consumed(generator, ref[f"{run}.noise"])
    # The draws can be switched off; then eta 0 leaves the generator where x_T left it.
    quiet = type(pipe)(**pipe.components)
    quiet.draw_noise_every_step = False
    quiet.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    call_pipeline(quiet, family, 0.0, generator=generator, output_type="latent")
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(SEED).get_state())


@pytest.mark.parametrize("family,run", ALL_RUNS)
def test_decode_recorded_samples(family, run):
    pipe, ref = load(family), reference(family)
    samples = ref[f"{run}.samples"]
    with torch.no_grad():
        decoded = pipe.vqvae.decode(samples * (1.0 / pipe.vqvae.config.scaling_factor)).sample
        assert_rel(decoded, ref[f"{run}.decoded"], "decoded")
        if family != "txt2img":  # VQ: the same codes (the fixture's argmin margins are >= 0.0044)
            assert torch.equal(pipe.vqvae.quantize(samples)[2], ref[f"{run}.vq_indices"])
            if f"{run}.decoded_noquant" in ref:
                unquantized = pipe.vqvae.decode(samples, force_not_quantize=True).sample
                assert_rel(unquantized, ref[f"{run}.decoded_noquant"], "decoded without quantization")


def test_inpainting_condition():
    pipe, ref = load("inpainting"), reference("inpainting")
    image, mask, condition = pipe.prepare_inputs(list(ref["input.image_uint8_hwc"].numpy()),
                                                 list(ref["input.mask_uint8_hw"].numpy()))
    assert torch.equal(mask, ref["batch.mask"])  # thresholded and +-1
    assert_rel(condition[:, :3], ref["cond.masked_image_latent"], "masked-image latent")
    assert torch.equal(condition[:, 3:], ref["cond.mask_latent"])
    assert_rel(condition, ref["cond.c"], "concat condition")


def test_ema_weights_by_default_live_weights_on_request():
    ref = reference("uncond")
    x, t = ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0]
    # The recorded runs sampled inside ema_scope(), as the original scripts; use_ema None does the same.
    assert_rel(model_call(load("uncond"), "uncond", x, t), ref["ddim_eta0.first_model_out"], "EMA (default)")
    assert_rel(model_call(load("uncond", True), "uncond", x, t), ref["ddim_eta0.first_model_out"], "EMA")
    assert_rel(model_call(load("uncond", False), "uncond", x, t), ref["live_weights.first_model_out"], "live")


def test_use_ema_without_ema_weights_is_an_error():
    with pytest.raises(LDMKitError, match="no EMA weights"):
        load("superres", True)
    # use_ema=False loads the live weights: the only ones this checkpoint has, so those the runs recorded.
    ref = reference("superres")
    x, t = ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0]
    assert_rel(model_call(load("superres", False), "superres", x, t), ref["ddim_eta0.first_model_out"], "live")


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_and_ckpt_give_the_same_model(family):
    ref = reference(family)
    x, t = ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0]
    from_safetensors = model_call(load(family, kind="safetensors"), family, x, t)
    assert torch.equal(from_safetensors, model_call(load(family), family, x, t))
