"""Issue 15 case 15: a call for many images runs in chunks of max_batch_size, each with its own rows'
generators (the same images as one call per chunk), with the UNet batch bounded and memory that does not
grow with the count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines
from ldmkit import LDMKitError
from memory_probe import PeakMemory


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _unet_batches(pipe, call):
    seen = []
    handle = pipe.unet.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        result = call()
    finally:
        handle.remove()
    return result, seen


@pytest.mark.parametrize("guidance, passes", [(1.0, 1), (3.0, 2)])
def test_prompts_run_in_chunks_equal_to_one_call_per_chunk(guidance, passes):
    pipe = tiny_pipelines.text2img()
    prompts = ["red apple", "blue car", "cat", "grinning face", "red heart"]
    kw = {"num_inference_steps": 2, "guidance_scale": guidance, "output_type": "np"}
    out, seen = _unet_batches(pipe, lambda: pipe(prompts, generator=_gens(5), max_batch_size=2, **kw).images)
    assert max(seen) == 2 * passes and len(seen) == 3 * 2
    parts = [pipe(prompts[a:b], generator=_gens(b - a, a), **kw).images for a, b in ((0, 2), (2, 4), (4, 5))]
    assert np.array_equal(out, np.concatenate(parts))


def test_one_at_a_time_equals_separate_calls_and_the_attribute_is_the_default():
    pipe = tiny_pipelines.text2img()
    prompts = ["red apple", "blue car", "cat"]
    pipe.max_batch_size = 1
    try:
        out, seen = _unet_batches(pipe, lambda: pipe(prompts, num_inference_steps=1, generator=_gens(3),
                                                     num_images_per_prompt=1, output_type="pt").images)
    finally:
        del pipe.max_batch_size
    assert set(seen) == {1}
    for i, p in enumerate(prompts):
        single = pipe(p, num_inference_steps=1, generator=_gens(1, i), output_type="pt").images
        assert torch.equal(out[i:i + 1], single)


def test_images_per_prompt_across_chunk_borders():
    pipe = tiny_pipelines.text2img()
    kw = {"num_inference_steps": 1, "num_images_per_prompt": 3, "output_type": "np", "negative_prompt": ["x", "y"]}
    whole = pipe(["red apple", "cat"], generator=_gens(6), **kw).images
    chunked = pipe(["red apple", "cat"], generator=_gens(6), max_batch_size=4, **kw).images
    assert whole.shape == chunked.shape == (6, 32, 32, 3)
    assert np.abs(whole - chunked).max() < 1e-4  # batch-size-dependent CPU rounding only


@pytest.mark.parametrize("kind", ["uncond", "class_conditional", "superres", "inpaint"])
def test_every_batched_pipeline_chunks(kind):
    pipe = getattr(tiny_pipelines, kind)()
    args = {"uncond": lambda: {"batch_size": 5},
            "class_conditional": lambda: {"class_labels": [0, 1, 2, 3, 4]},
            "superres": lambda: {"image": [torch.rand(3, 8, 8) * 2 - 1 for _ in range(5)]},
            "inpaint": lambda: {"image": [torch.rand(3, 16, 16) for _ in range(5)],
                                "mask_image": torch.ones(1, 16, 16)}}[kind]()
    out, seen = _unet_batches(pipe, lambda: pipe(**args, num_inference_steps=1, generator=_gens(5),
                                                 output_type="np", max_batch_size=2).images)
    assert max(seen) == 2
    whole = pipe(**args, num_inference_steps=1, generator=_gens(5), output_type="np").images
    assert out.shape == whole.shape and np.abs(out - whole).max() < 1e-4


def test_memory_does_not_grow_with_the_count():
    pipe = tiny_pipelines.text2img()
    peaks = []
    for n in (4, 16):
        with PeakMemory() as probe:
            pipe(["red apple"] * n, num_inference_steps=1, generator=_gens(n), max_batch_size=2)
        peaks.append(probe.peak)
    assert peaks[1] < 1.2 * peaks[0], peaks


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True])
def test_a_bad_max_batch_size_is_refused(bad):
    with pytest.raises(LDMKitError, match="max_batch_size"):
        tiny_pipelines.uncond()(batch_size=2, num_inference_steps=1, max_batch_size=bad)
