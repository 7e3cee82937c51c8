"""The one decode: a half-precision first stage that overflows is decoded again in float32, in every pipeline."""

from __future__ import annotations

import warnings

import pytest
import torch

from compvis_fixtures import call_pipeline, load, requires_fixtures, single_thread

_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
FP16_MAX = torch.finfo(torch.float16).max


def overflow_in_half(vae) -> None:
    """Push channel 0 of the decoder's last resnet convolution to float16's largest value: any positive
    contribution of the rest then overflows to inf in float16 (and the float32 head gets NaN), while float32
    stays finite. (Not conv_out: the decoder's head runs in float32 whatever the dtype.)"""
    conv = vae.decoder.up_blocks[-1].resnets[-1].conv2
    with torch.no_grad():
        conv.weight.mul_(100.0)
        conv.bias[0] = FP16_MAX
    vae.half()  # from here the weights are exactly representable in float16 and float32 alike


def _fresh(family: str):
    pipe = load.__wrapped__(family)  # uncached: this test changes the autoencoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, family: str, output_type: str = "pt", **kwargs) -> torch.Tensor:
    return call_pipeline(pipe, family, eta=0.0, output_type=output_type, **kwargs).images


@requires_fixtures
@pytest.mark.parametrize("family, kwargs", [
    ("txt2img", {}), ("superres", {}), ("uncond", {}), ("cin", {}), ("inpainting", {}),
    ("superres", {"tiling": True, "tile_size": 8, "tile_overlap": 4, "decode_tile_size": 8}),
])
def test_half_precision_overflow_is_decoded_again_in_float32(family, kwargs):
    pipe = _fresh(family)
    overflow_in_half(pipe.vqvae)
    # Without the fall-back the float16 decode really is inf/NaN: the test's decoder overflows.
    latents = _run(pipe, family, "latent", **kwargs)
    scale = 1.0 if family == "superres" else pipe.vqvae.config.scaling_factor
    raw = pipe.vqvae.decode(latents.half() * (1.0 / scale)).sample
    assert not torch.isfinite(raw).all()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = _run(pipe, family, **kwargs)
    overflow_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning) and "float32" in str(w.message)]
    assert len(overflow_warnings) == 1
    assert pipe.vqvae.dtype == torch.float16  # the decoder is handed back in the dtype it had
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1

    pipe.vqvae.float()
    expected = _run(pipe, family, **kwargs)
    if family == "inpainting":
        # The masked image was encoded by the float16 encoder in the first run: the condition differs a little.
        torch.testing.assert_close(images, expected, atol=2e-2, rtol=0)
    else:
        assert torch.equal(images, expected)
