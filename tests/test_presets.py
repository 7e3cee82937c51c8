"""Presets: what --fast / --exact (and the server) configure on a pipeline."""

import pytest

from ldmkit import DiffusionPipeline
from ldmkit.errors import LDMKitError
from ldmkit.pipelines.presets import apply_preset, get_preset, set_sampler


@pytest.fixture(scope="module")
def pipe():
    return DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")


def test_exact_keeps_the_models_scheduler(pipe):
    before = type(pipe.scheduler).__name__
    assert apply_preset(pipe, "exact") == {}
    assert type(pipe.scheduler).__name__ == before


def test_fast_swaps_in_dpm_solver_karras_and_sets_steps(pipe):
    config = dict(pipe.scheduler.config)
    kwargs = apply_preset(pipe, "fast")
    assert kwargs["num_inference_steps"] == get_preset("fast").num_inference_steps
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_karras_sigmas is True
    assert pipe.scheduler.config.prediction_type == config["prediction_type"]  # the model's training is kept


def test_unknown_names_are_refused(pipe):
    with pytest.raises(LDMKitError, match="unknown preset"):
        apply_preset(pipe, "turbo")
    with pytest.raises(LDMKitError, match="unknown sampler"):
        set_sampler(pipe, "dpm++9m")


def test_fast_preset_enables_cache_and_guidance_interval_exact_disables():
    import ldmkit
    from ldmkit.pipelines.presets import PRESETS, apply_preset

    pipe = ldmkit.DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")
    kwargs = apply_preset(pipe, "fast")
    fast = PRESETS["fast"]
    assert kwargs["guidance_interval"] == fast.guidance_interval
    assert pipe.unet._feature_cache is not None and pipe.unet._feature_cache.interval == fast.cache_interval
    assert "guidance_interval" not in apply_preset(pipe, "exact")
    assert pipe.unet._feature_cache is None and pipe.predict_wrappers == []
