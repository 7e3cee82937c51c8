"""pipe.compile() and the fast preset's channels-last layout (pipelines/speed.py)."""

import types

import pytest
import torch

from ldmkit import DiffusionPipeline
from ldmkit.errors import LDMKitError
from ldmkit.hardware import CHANNELS_LAST_MIN_WIDTH
from ldmkit.models.unet_2d import UNet2DModel
from ldmkit.pipelines.speed import use_channels_last


def _unet(width: int, dtype) -> UNet2DModel:
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width,), norm_num_groups=32,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    return unet.to(dtype)


def _is_channels_last(module: torch.nn.Module) -> bool:
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def test_channels_last_only_for_wide_bf16_networks():
    wide_bf16, wide_fp32 = _unet(CHANNELS_LAST_MIN_WIDTH, torch.bfloat16), _unet(CHANNELS_LAST_MIN_WIDTH, torch.float32)
    narrow_bf16 = _unet(32, torch.bfloat16)
    pipe = types.SimpleNamespace(components={"unet": wide_bf16, "vqvae": wide_fp32, "other": narrow_bf16,
                                             "scheduler": object()})
    assert use_channels_last(pipe) == ["unet"]
    assert _is_channels_last(wide_bf16) and not _is_channels_last(wide_fp32) and not _is_channels_last(narrow_bf16)
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    contiguous = _unet(CHANNELS_LAST_MIN_WIDTH, torch.bfloat16)
    contiguous.load_state_dict(wide_bf16.state_dict())
    with torch.inference_mode():  # the layout changes the algorithm, not the function
        diff = (wide_bf16(x, 10).sample.float() - contiguous(x, 10).sample.float()).abs().max().item()
    assert diff < 0.05
    use_channels_last(pipe, False)
    assert not _is_channels_last(wide_bf16)


def test_loading_or_moving_to_bf16_on_a_cpu_applies_it(tiny_uncond_dir, monkeypatch):
    from ldmkit import hardware

    monkeypatch.setattr(hardware, "CHANNELS_LAST_MIN_WIDTH", 1)  # the tiny model is narrow
    assert not _is_channels_last(DiffusionPipeline.from_pretrained(tiny_uncond_dir).unet)
    pipe = DiffusionPipeline.from_pretrained(tiny_uncond_dir, torch_dtype=torch.bfloat16)
    assert _is_channels_last(pipe.unet) and _is_channels_last(pipe.vqvae)
    moved = DiffusionPipeline.from_pretrained(tiny_uncond_dir).to(torch.bfloat16)
    assert _is_channels_last(moved.unet)


def test_compile_matches_eager_with_and_without_the_feature_cache(tiny_uncond_dir, one_torch_thread):
    pipe = DiffusionPipeline.from_pretrained(tiny_uncond_dir)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    eager = images()
    pipe.enable_feature_cache(interval=2)
    eager_cached = images()
    pipe.disable_feature_cache()
    assert pipe.compile() == ["unet", "vqvae"]
    assert "forward" in vars(pipe.unet) and "forward" in vars(pipe.vqvae)
    compiled = images()
    pipe.enable_feature_cache(interval=2)
    compiled_cached = images()
    pipe.disable_feature_cache()
    assert (compiled - eager).abs().max().item() <= 1e-4
    assert (compiled_cached - eager_cached).abs().max().item() <= 1e-4
    assert (eager_cached - eager).abs().max().item() > 0  # the cache did change the run
    pipe.uncompile()
    assert "forward" not in vars(pipe.unet)
    assert torch.equal(images(), eager)


def test_compile_names_a_missing_network(tiny_uncond_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_uncond_dir)
    with pytest.raises(LDMKitError, match="no network named 'bert'.*unet"):
        pipe.compile(("bert",))
