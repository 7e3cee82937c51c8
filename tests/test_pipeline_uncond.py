"""LDMPipeline: parity with diffusers, and the latent scale of VQ models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError, LDMPipeline


@pytest.fixture(scope="module")
def uncond(tiny_uncond_dir):
    pipe = LDMPipeline.from_pretrained(tiny_uncond_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matches_diffusers(uncond, tiny_uncond_dir, eta):
    import functools

    import diffusers

    theirs = diffusers.LDMPipeline.from_pretrained(tiny_uncond_dir)
    theirs.set_progress_bar_config(disable=True)
    step = theirs.scheduler.step
    theirs.scheduler.step = functools.partial(step, generator=torch.Generator().manual_seed(9))
    ref = theirs(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, eta=eta,
                 output_type="np").images
    latents = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    got = uncond(batch_size=2, latents=latents, generator=torch.Generator().manual_seed(9), num_inference_steps=4,
                 eta=eta, output_type="np").images
    assert got.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(got - ref).max() <= 1e-4


def _decoded_scale(pipe):
    """The factor the pipeline divides latents by before decoding (captured at the decoder's input)."""
    latents = pipe(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    seen = []
    decode = pipe.vqvae.decode
    pipe.vqvae.decode = lambda z, *a, **k: seen.append(z) or decode(z, *a, **k)
    try:
        pipe(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    finally:
        pipe.vqvae.decode = decode
    ratio = latents / seen[0]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    return round(ratio.flatten()[0].item(), 5)


def test_scale_defaults_to_one_without_config_key(tiny_uncond_dir, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_uncond_dir, folder)
    config_path = folder / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("scaling_factor")  # as the published celebahq config
    config_path.write_text(json.dumps(config))
    pipe = LDMPipeline.from_pretrained(folder)
    assert pipe.vqvae.config.scaling_factor == 1.0
    assert _decoded_scale(pipe) == 1.0
    config["scaling_factor"] = 0.5
    config_path.write_text(json.dumps(config))
    assert _decoded_scale(LDMPipeline.from_pretrained(folder)) == 0.5


def test_bad_arguments(uncond):
    with pytest.raises(LDMKitError, match="batch_size"):
        uncond(batch_size=0)
    with pytest.raises(LDMKitError, match="latents have shape"):
        uncond(latents=torch.zeros(1, 3, 8, 8))


def test_loads_through_diffusion_pipeline(tiny_uncond_dir):
    assert isinstance(DiffusionPipeline.from_pretrained(tiny_uncond_dir), LDMPipeline)
