"""The exact fast convolutions (ldmkit.models.conv): same numbers as F.conv2d, used only where they apply,
cached Winograd weights that follow the weight, and the switch that turns them off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmkit.errors import LDMKitError
from ldmkit.models import conv as fast
from ldmkit.models.conv import Conv2d, conv3x3_im2col, conv3x3_winograd, winograd_weight


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", [(2, 8, 6, 10), (1, 3, 2, 2), (3, 16, 8, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_direct(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, shape[1], 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64) if bias else None
    # float64: the algorithm itself is exact; the float32 agreement is rounding (next test)
    assert _rel_err(conv3x3_winograd(x, winograd_weight(weight), b), F.conv2d(x, weight, b, padding=1)) < 1e-12


@pytest.mark.parametrize("algorithm", ["im2col", "winograd"])
def test_float32_agreement(algorithm):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 8, 8, generator=gen)
    weight, bias = torch.randn(32, 64, 3, 3, generator=gen) / 24, torch.randn(32, generator=gen)
    expected = F.conv2d(x, weight, bias, padding=1)
    got = (conv3x3_im2col(x, weight, bias) if algorithm == "im2col"
           else conv3x3_winograd(x, winograd_weight(weight), bias))
    assert got.shape == expected.shape and _rel_err(got, expected) < 1e-5


def test_im2col_equals_direct_without_bias():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 5, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    assert _rel_err(conv3x3_im2col(x, weight, None), F.conv2d(x, weight, padding=1)) < 1e-12


def _layer(monkeypatch, in_ch=8, out_ch=8) -> Conv2d:
    """A small layer with the thresholds lowered so that its shapes reach each algorithm."""
    monkeypatch.setattr(fast, "IM2COL_MIN_WEIGHT", 8 * 8 * 9)
    monkeypatch.setattr(fast, "IM2COL_MAX_PIXELS", 16)
    monkeypatch.setattr(fast, "WINOGRAD_MIN_PIXELS", 32)
    monkeypatch.setattr(fast, "WINOGRAD_NARROW_CHANNELS", 4)
    return Conv2d(in_ch, out_ch, 3, padding=1).eval()


def test_pick_follows_shape_and_context(monkeypatch):
    layer = _layer(monkeypatch)
    small, large, odd = torch.randn(1, 8, 4, 4), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        assert layer._pick(small) == "im2col" and layer._pick(large) == "winograd"
        assert layer._pick(odd) == "direct"                  # Winograd needs even sizes
        assert layer._pick(large.double()) == "direct"       # float32 only
        assert layer._pick(large.bfloat16()) == "direct"
    assert layer._pick(large) == "direct"  # gradients wanted: training keeps oneDNN's kernels
    fast.set_conv_algorithm(layer, "direct")
    with torch.no_grad():
        assert layer._pick(large) == "direct" and layer._pick(small) == "direct"
    strided = Conv2d(8, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        assert strided._pick(large) == "direct"


def test_layer_output_equals_nn_conv2d(monkeypatch):
    layer = _layer(monkeypatch)
    plain = torch.nn.Conv2d(8, 8, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    for x in (torch.randn(1, 8, 4, 4), torch.randn(2, 8, 8, 8)):
        with torch.inference_mode():
            assert _rel_err(layer(x), plain(x)) < 1e-5
    assert set(layer.state_dict()) == {"weight", "bias"}  # the cache is not a parameter or buffer


def test_winograd_cache_follows_the_weight(monkeypatch):
    layer = _layer(monkeypatch)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        layer(x)
        first = layer._winograd[1]
        layer(x)
        assert layer._winograd[1] is first                      # kept between calls
        layer.weight.mul_(2.0)                                  # changed in place (an optimizer step)
        out = layer(x)
        assert layer._winograd[1] is not first
        assert _rel_err(out, F.conv2d(x, layer.weight, layer.bias, padding=1)) < 1e-5
        layer.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.zeros(8)})
        assert _rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1)) < 1e-5
    layer.to(torch.float64)
    assert "_winograd" not in layer.__dict__                    # moving the module drops it
    with torch.no_grad():
        layer.float()(x)
    fast.set_conv_algorithm(layer, "direct")
    assert "_winograd" not in layer.__dict__                    # "direct" releases it


def test_training_gradients_are_direct(monkeypatch):
    layer = _layer(monkeypatch).train()
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and "_winograd" not in layer.__dict__


def test_model_switch_and_unknown_name():
    from ldmkit import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    layers = [m for m in unet.modules() if isinstance(m, Conv2d)]
    assert layers and all(m.conv_algorithm == "auto" for m in layers)
    unet.set_conv_algorithm("direct")
    assert all(m.conv_algorithm == "direct" for m in layers)
    with pytest.raises(LDMKitError, match="direct"):
        unet.set_conv_algorithm("fft")
