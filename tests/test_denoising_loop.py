"""The one denoising loop of DiffusionPipeline: hooks, guidance passes, step arguments, shared checks."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError
from ldmkit.pipelines import denoising


@pytest.fixture
def text2img(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def superres(tiny_superres_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_superres_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def uncond(tiny_uncond_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_uncond_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_unet_rows(pipe) -> list[int]:
    rows: list[int] = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: (rows.append(sample.shape[0]), forward(sample, *a, **k))[1]
    return rows


@pytest.mark.parametrize("scale, rows", [(0.0, 1), (1.0, 1), (6.0, 2)])
def test_guidance_runs_only_the_passes_it_needs(text2img, scale, rows):
    seen = _count_unet_rows(text2img)
    text2img("a red square", num_inference_steps=3, guidance_scale=scale, output_type="latent")
    assert seen == [rows] * 3


def test_predict_wrappers_and_step_callbacks_run_in_the_loop(uncond):
    plain = uncond(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    calls, ends = [], []

    def wrapper(predict, timesteps):
        assert len(timesteps) == 3  # applied once per call, with the call's schedule

        def wrapped(latents, t):
            calls.append(int(t))
            return predict(latents, t)

        return wrapped

    uncond.predict_wrappers.append(wrapper)
    uncond.step_callbacks.append(lambda pipe, i, t, tensors: ends.append((i, tuple(tensors))))
    hooked = uncond(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert calls == uncond.scheduler.timesteps.tolist()
    assert ends == [(0, ("latents", "noise_pred")), (1, ("latents", "noise_pred")), (2, ("latents", "noise_pred"))]
    assert torch.equal(plain, hooked)  # a wrapper that changes nothing changes nothing


def test_a_wrapper_can_replace_the_model_call(uncond):
    uncond.predict_wrappers.append(lambda predict, timesteps: lambda latents, t: torch.zeros_like(latents))
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = uncond(num_inference_steps=2, latents=latents, output_type="latent").images
    scheduler = uncond.scheduler
    expected = latents.clone()
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        expected = scheduler.step(torch.zeros_like(expected), t, expected).prev_sample
    assert torch.equal(out, expected)


def test_scheduler_step_signature_is_read_once_per_call(text2img, monkeypatch):
    reads = []
    real = inspect.signature
    monkeypatch.setattr(denoising.inspect, "signature", lambda f, *a, **k: (reads.append(f), real(f, *a, **k))[1])
    text2img("a red square", num_inference_steps=4, output_type="latent")
    assert len(reads) == 1


def test_diffusers_layout_pipelines_draw_no_extra_noise(text2img):
    """Only the CompVis path draws noise at every step; a plain DDIM call at eta 0 draws x_T and nothing more."""
    generator = torch.Generator().manual_seed(3)
    text2img("a red square", num_inference_steps=3, generator=generator, output_type="latent")
    fresh = torch.Generator().manual_seed(3)
    torch.randn((1, 4, 8, 8), generator=fresh)
    assert torch.equal(generator.get_state(), fresh.get_state())


def test_latents_shape_error_names_the_models_factor():
    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")  # f = 4
    with pytest.raises(LDMKitError, match=r"height / 4, width / 4"):
        pipe("red apple", latents=torch.zeros(1, 4, 3, 3), num_inference_steps=1)


def test_batch_size_true_is_refused_everywhere(superres, uncond):
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(LDMKitError, match="batch_size"):
        superres(image, batch_size=True, num_inference_steps=1)
    with pytest.raises(LDMKitError, match="batch_size"):
        uncond(batch_size=True, num_inference_steps=1)


@pytest.mark.parametrize("name, value", [("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
                                         ("guidance_scale", -1.0), ("eta", float("nan")), ("eta", -0.5)])
def test_non_finite_or_negative_numbers_are_refused(text2img, name, value):
    with pytest.raises(LDMKitError, match=f"{name} must be a finite number >= 0"):
        text2img("a red square", num_inference_steps=1, **{name: value})


def test_superres_draws_x_T_like_the_other_pipelines(superres):
    """x_T comes from initial_latents: the same draw as randn of the latent shape, times init_noise_sigma."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    drawn = superres(image, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                     output_type="latent").images
    given = superres(image, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(5),
                     latents=torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(5))).images
    assert torch.equal(drawn, given)


def test_legacy_callback_works_every_callback_steps_with_a_deprecation_warning(uncond):
    seen = []
    with pytest.warns(FutureWarning, match="callback_on_step_end"):
        uncond(num_inference_steps=5, output_type="latent", callback=lambda i, t, latents: seen.append(
            (i, int(t), tuple(latents.shape))), callback_steps=2)
    timesteps = uncond.scheduler.timesteps.tolist()
    assert seen == [(i, timesteps[i], (1, 3, 16, 16)) for i in (0, 2, 4)]


def test_an_unexpected_argument_names_the_nearest_one(text2img):
    with pytest.raises(LDMKitError, match="Did you mean 'num_inference_steps'"):
        text2img("a red square", output_type="latent", num_inference_step=2)


@pytest.mark.parametrize("kwargs, match", [({"callback_steps": 0}, "callback_steps must be a positive integer"),
                                           ({"callback": 3}, "callback must be callable")])
def test_bad_legacy_callback_arguments_are_clear_errors(text2img, kwargs, match):
    with pytest.raises(LDMKitError, match=match), pytest.warns(FutureWarning):
        text2img("a red square", output_type="latent", **kwargs)


def test_outputs_read_as_diffusers_outputs(uncond):
    out = uncond(num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out["images"] is out.images and out[0] is out.images
    assert out.to_tuple() == (out.images,) and list(out.keys()) == ["images"]
    (images,) = uncond(num_inference_steps=1, output_type="pt", return_dict=False,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, out.images)


def test_progress_bar_takes_a_total_for_custom_loops(uncond):
    stream = io.StringIO()
    uncond.set_progress_bar_config(file=stream)
    with uncond.progress_bar(total=3) as bar:
        for _ in range(3):
            bar.update()
    assert "3/3" in stream.getvalue()
    with pytest.raises(LDMKitError, match="iterable or a total"):
        uncond.progress_bar()


@pytest.mark.parametrize("kwargs, match", [
    ({"generator": 42}, r"for a seed pass torch.Generator\(\).manual_seed\(42\)"),
    ({"generator": [torch.Generator(), 3]}, "generator must be a torch.Generator or a list of them"),
    ({"height": "32"}, "height must be an integer number of pixels, got '32' \\(str\\)"),
    ({"width": 32.0}, "width must be an integer number of pixels, got 32.0 \\(float\\)"),
    ({"height": 60}, "positive multiples of 8, got height=60; try height=64"),
])
def test_bad_generator_and_size_types_are_clear_errors(text2img, kwargs, match):
    with pytest.raises(LDMKitError, match=match):
        text2img("a red square", num_inference_steps=1, output_type="latent", **kwargs)


def test_a_unet_without_sample_size_needs_height_and_width(text2img):
    unet = type(text2img.unet).from_config(dict(text2img.unet.config, sample_size=None))
    unet.load_state_dict(text2img.unet.state_dict())
    text2img.unet = unet
    with pytest.raises(LDMKitError, match="no sample_size .* pass height and width"):
        text2img("a red square", num_inference_steps=1, output_type="latent")
    assert text2img("a red square", height=32, width=32, num_inference_steps=1,
                    output_type="latent").images.shape == (1, 4, 4, 4)


def test_eta_above_one_warns(uncond):
    with pytest.warns(UserWarning, match="eta=2.0 is above 1"):
        uncond(num_inference_steps=1, eta=2.0, output_type="latent")
