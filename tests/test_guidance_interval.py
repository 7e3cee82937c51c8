"""Limited-interval guidance: an exact no-op by default, half the UNet batch outside the interval."""

import pytest
import torch

from ldmkit import DiffusionPipeline
from ldmkit.errors import LDMKitError


@pytest.fixture(scope="module")
def pipe():
    p = DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, **kw):
    batches = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: (batches.append(sample.shape[0]), original(sample, *a, **k))[1]
    try:
        images = pipe(["red apple"], num_inference_steps=6, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        del pipe.unet.forward
    return images, batches


def test_default_and_full_interval_are_exact(pipe):
    reference, batches = _run(pipe)
    assert batches == [2] * 6
    images, batches = _run(pipe, guidance_interval=(0.0, float("inf")))
    assert torch.equal(images, reference) and batches == [2] * 6


def test_outside_the_interval_batch_halves(pipe):
    sigmas = ((1 - pipe.scheduler.alphas_cumprod) / pipe.scheduler.alphas_cumprod).sqrt()
    reference, _ = _run(pipe)
    images, batches = _run(pipe, guidance_interval=(0.0, 5.0))
    pipe.scheduler.set_timesteps(6)
    expected = [2 if sigmas[int(t)] <= 5.0 else 1 for t in pipe.scheduler.timesteps]
    assert batches == expected and 1 in expected and 2 in expected
    assert not torch.equal(images, reference)
    _, batches = _run(pipe, guidance_interval=(1e6, 1e7))
    assert batches == [1] * 6  # nowhere guided: conditional only


@pytest.mark.parametrize("bad", [(5.0, 1.0), (-1, 2), "x", (1,)])
def test_bad_interval(pipe, bad):
    with pytest.raises(LDMKitError, match="guidance_interval"):
        pipe(["a"], num_inference_steps=2, guidance_scale=3.0, guidance_interval=bad)
