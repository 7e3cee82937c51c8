"""The feature cache (DeepCache): exact no-op when off or at interval 1; call counts when on."""

import pytest
import torch

from ldmkit import DiffusionPipeline
from ldmkit.errors import LDMKitError
from ldmkit.pipelines.feature_cache import full_steps


@pytest.fixture(scope="module")
def pipe():
    p = DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, steps=6):
    return pipe(["red apple", "cat"], num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images


def test_disabled_and_interval_1_are_exact(pipe):
    reference = _run(pipe)
    cache = pipe.enable_feature_cache(interval=1)
    assert torch.equal(_run(pipe), reference)
    assert cache.calls == {"full": 6, "shallow": 0}
    pipe.enable_feature_cache(interval=3)
    assert not torch.equal(_run(pipe), reference)
    pipe.disable_feature_cache()
    assert pipe.predict_wrappers == [] and pipe.unet._feature_cache is None
    assert torch.equal(_run(pipe), reference)


@pytest.mark.parametrize("interval,full", [(2, 3), (3, 2), (4, 2), (6, 1)])
def test_call_counts(pipe, interval, full):
    cache = pipe.enable_feature_cache(interval=interval)
    try:
        _run(pipe)
    finally:
        pipe.disable_feature_cache()
    assert cache.calls == {"full": full, "shallow": 6 - full}


def test_schedules_and_errors(pipe):
    assert full_steps(10, 3, "uniform") == [0, 3, 6, 9]
    quad = full_steps(10, 3, "quadratic")
    assert len(quad) == 4 and quad[0] == 0 and quad == sorted(set(quad)) and quad != [0, 3, 6, 9]
    for bad in ({"interval": 0}, {"branch": 9}, {"schedule": "nope"}):
        with pytest.raises(LDMKitError):
            pipe.enable_feature_cache(**bad)


def test_uncond_unet2d_cache_counts():
    from ldmkit.models import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    from ldmkit.pipelines.feature_cache import FeatureCache

    cache = FeatureCache(unet, 2, 1, "uniform")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        whole = unet(x, 10).sample
        unet._feature_cache = cache
        cache.begin_step(full=True)
        assert torch.equal(unet(x, 10).sample, whole)  # a full step is the plain forward
        cache.end_step()
        cache.begin_step(full=False)
        shallow = unet(x, 10).sample  # same input: the cached deep feature is exact, so the result is too
    assert torch.allclose(shallow, whole, atol=1e-5) and cache.calls == {"full": 1, "shallow": 1}


def test_a_step_with_several_unet_calls_reuses_each_calls_own_features(pipe):
    """Tiled pipelines call the UNet once per tile in a step: a shallow step must give every tile the deep
    feature of its own call on the full step, not the last tile's."""
    from ldmkit.pipelines.denoising import Sampling

    a, b = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    context = pipe.bert(pipe.tokenizer(["red apple", ""], padding="max_length", max_length=77,
                                       return_tensors="pt").input_ids)[0]
    pipe.scheduler.set_timesteps(4)

    def outputs(tiles):
        seen = []

        def predict(latents, t):  # one "tile" per input; the loop's latents are ignored
            for x in tiles:
                seen.append(pipe.unet(x, t, encoder_hidden_states=context).sample)
            return seen[-1][:1]

        sampling = Sampling(num_inference_steps=4, generator=None, eta=0.0)
        pipe.denoise(torch.zeros(1, 4, 8, 8), predict, sampling)
        return seen[len(tiles) * 1: len(tiles) * 2]  # step 1: shallow with interval 2

    pipe.enable_feature_cache(interval=2)
    try:
        with torch.inference_mode():
            alone, together = outputs([a]), outputs([a, b])
    finally:
        pipe.disable_feature_cache()
    assert torch.equal(alone[0], together[0])
