"""The same user code through diffusers and ldmkit, on the same folders: a diffusers user changes one import.

Each script below is written once against a library module ``lib`` (``diffusers`` or ``ldmkit``) in the patterns
of diffusers' documentation (loading, reusing components, schedulers, a hand-written denoising loop, outputs,
saving), and runs with both; the results must agree (pixels within 1e-4, the project's bar).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import ldmkit

diffusers = pytest.importorskip("diffusers")
LIBS = {"diffusers": diffusers, "ldmkit": ldmkit}
TOL = 1e-4
PROMPT = "a painting of a squirrel eating a burger"


def both(script, *args):
    """``script(lib, *args)`` with each library; returns (diffusers' result, ldmkit's result)."""
    results = []
    for lib in (diffusers, ldmkit):
        torch.manual_seed(0)
        with torch.no_grad():
            results.append(script(lib, *args))
    return results


def assert_close(theirs, ours):
    theirs, ours = np.asarray(theirs, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= TOL


def _latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------ loading and generating
def load_and_generate(lib, folder):
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    return pipe([PROMPT], num_inference_steps=4, guidance_scale=6.0, latents=_latents((1, 4, 8, 8)),
                output_type="np").images


def test_load_and_generate(tiny_text2img_dir):
    assert_close(*both(load_and_generate, tiny_text2img_dir))


def swap_scheduler(lib, folder, name):
    """The schedulers guide: swap through from_config and keep generating."""
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    pipe.scheduler = getattr(lib, name).from_config(pipe.scheduler.config)
    images = pipe([PROMPT], num_inference_steps=5, guidance_scale=6.0, latents=_latents((1, 4, 8, 8)),
                  output_type="np").images
    return images, sorted(c.__name__ for c in pipe.scheduler.compatibles)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler"])
def test_swap_scheduler(tiny_text2img_dir, name):
    (theirs, their_compatibles), (ours, our_compatibles) = both(swap_scheduler, tiny_text2img_dir, name)
    assert_close(theirs, ours)
    # Every scheduler diffusers lists as compatible, that ldmkit has too, ldmkit lists as well.
    assert set(their_compatibles) & set(dir(ldmkit)) <= set(our_compatibles)


def reuse_components(lib, folder):
    """The 'reuse components' guide: a second pipeline built from the first's components shares them."""
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    other = _quiet(lib.LDMTextToImagePipeline(**pipe.components))
    assert other.unet is pipe.unet and other.vqvae is pipe.vqvae
    return other([PROMPT], num_inference_steps=3, latents=_latents((1, 4, 8, 8)), output_type="np").images


def test_reuse_components(tiny_text2img_dir):
    assert_close(*both(reuse_components, tiny_text2img_dir))


def read_outputs(lib, folder):
    """Outputs read every way diffusers' are: attribute, key, index, tuple."""
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    out = pipe([PROMPT], num_inference_steps=2, latents=_latents((1, 4, 8, 8)), output_type="np")
    assert out["images"] is out.images and out[0] is out.images and out.to_tuple()[0] is out.images
    assert list(out.keys()) == ["images"]
    (tupled,) = pipe([PROMPT], num_inference_steps=2, latents=_latents((1, 4, 8, 8)), output_type="np",
                     return_dict=False)
    return out.images, tupled


def test_read_outputs(tiny_text2img_dir):
    (theirs, their_tuple), (ours, our_tuple) = both(read_outputs, tiny_text2img_dir)
    assert_close(theirs, ours)
    assert_close(their_tuple, our_tuple)


def device_and_dtype(lib, folder):
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    pipe = pipe.to("cpu").to(torch.float32)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert sorted(pipe.components) == ["bert", "scheduler", "tokenizer", "unet", "vqvae"]
    return pipe.unet.config.sample_size, pipe.vqvae.config.scaling_factor, pipe.unet.config.in_channels


def test_device_dtype_components_and_config(tiny_text2img_dir):
    theirs, ours = both(device_and_dtype, tiny_text2img_dir)
    assert theirs == ours


# ------------------------------------------------------------------------------------ a hand-written loop
def hand_written_loop(lib, folder):
    """diffusers' 'deconstruct the pipeline' pattern: tokenizer, text encoder, UNet, scheduler, decoder by hand."""
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    tokenizer, bert, unet, scheduler, vae = pipe.tokenizer, pipe.bert, pipe.unet, pipe.scheduler, pipe.vqvae
    ids = tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond, uncond = bert(ids)[0].chunk(2)
    context = torch.cat([uncond, cond])
    scheduler.set_timesteps(4)
    latents = _latents((1, 4, 8, 8)) * scheduler.init_noise_sigma
    for t in pipe.progress_bar(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(noise_uncond + 5.0 * (noise_cond - noise_uncond), t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def test_hand_written_loop(tiny_text2img_dir):
    assert_close(*both(hand_written_loop, tiny_text2img_dir))


def custom_progress(lib, folder):
    pipe = _quiet(lib.DiffusionPipeline.from_pretrained(folder))
    with pipe.progress_bar(total=3) as bar:
        for _ in range(3):
            bar.update()
    return bar.total


def test_progress_bar_with_a_total(tiny_text2img_dir):
    theirs, ours = both(custom_progress, tiny_text2img_dir)
    assert theirs == ours == 3


# ------------------------------------------------------------------------------------ saving and the other tasks
def save_and_reload_elsewhere(lib, folder, tmp_path):
    """Save with one library, load with the other, generate: the files on disk are the same layout."""
    other = ldmkit if lib is diffusers else diffusers
    pipe = lib.DiffusionPipeline.from_pretrained(folder)
    saved = tmp_path / lib.__name__
    pipe.save_pretrained(saved)
    reloaded = _quiet(other.DiffusionPipeline.from_pretrained(saved))
    return reloaded([PROMPT], num_inference_steps=3, latents=_latents((1, 4, 8, 8)), output_type="np").images


def test_save_with_one_library_load_with_the_other(tiny_text2img_dir, tmp_path):
    assert_close(*both(save_and_reload_elsewhere, tiny_text2img_dir, tmp_path))


def upscale_a_pil_image(lib, folder):
    pipe = _quiet(lib.LDMSuperResolutionPipeline.from_pretrained(folder))
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    # diffusers draws x_T from the generator first; ldmkit does the same, so one seed serves both.
    return pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_upscale_a_pil_image(tiny_superres_dir):
    assert_close(*both(upscale_a_pil_image, tiny_superres_dir))


def sample_unconditionally(lib, folder):
    pipe = _quiet(lib.LDMPipeline.from_pretrained(folder))
    return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_sample_unconditionally(tiny_uncond_dir):
    assert_close(*both(sample_unconditionally, tiny_uncond_dir))
