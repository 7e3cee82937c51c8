"""UNet2DConditionModel and UNet2DModel: parity with diffusers, file compatibility, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit.errors import LDMKitError
from ldmkit.models import UNet2DConditionModel, UNet2DModel
from ldmkit.models.resnet import Upsample2D, upsample_conv_by_phases
from reference_models import save_diffusers

TOL = 1e-5

TINY_COND = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8)

# Exercises the less common options: per-block heads, linear projections, 2 transformer layers per block,
# spatial-attention blocks, class embeddings, another sinusoid layout.
RICH_COND = dict(
    sample_size=16, in_channels=4, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    attention_head_dim=(2, 4, 8), norm_num_groups=8, use_linear_projection=True,
    transformer_layers_per_block=2, num_class_embeds=5, flip_sin_to_cos=False, freq_shift=1,
    center_input_sample=True, mid_block_scale_factor=2.0)

TINY_UNET2D = dict(
    sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)

RICH_UNET2D = dict(
    TINY_UNET2D, attention_head_dim=None, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
    upsample_type="resnet", num_class_embeds=3, mid_block_scale_factor=1.5)


@pytest.fixture(scope="module")
def tiny_cond(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_cond")
    theirs = save_diffusers("UNet2DConditionModel", TINY_COND, folder)
    return folder, theirs, UNet2DConditionModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_unet2d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet2d")
    theirs = save_diffusers("UNet2DModel", TINY_UNET2D, folder)
    return folder, theirs, UNet2DModel.from_pretrained(folder)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --- UNet2DConditionModel ----------------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [500, torch.tensor(999), torch.tensor([3, 640]), torch.tensor([17.5])])
def test_condition_unet_matches_diffusers(tiny_cond, timestep):
    _, theirs, ours = tiny_cond
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 24, generator=gen)  # non-square
    context = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        ref = theirs(sample, timestep, context).sample
        got = ours(sample, timestep, context)
    assert max_diff(got.sample, ref) <= TOL
    with torch.no_grad():
        (as_tuple,) = ours(sample, timestep, context, return_dict=False)
    assert torch.equal(as_tuple, got.sample)


def test_condition_unet_attention_mask_matches_diffusers(tiny_cond):
    _, theirs, ours = tiny_cond
    gen = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = theirs(sample, 10, context, encoder_attention_mask=mask).sample
        got = ours(sample, 10, context, encoder_attention_mask=mask).sample
        unmasked = ours(sample, 10, context).sample
    assert max_diff(got, ref) <= TOL
    assert max_diff(got[1], unmasked[1]) <= TOL and max_diff(got[0], unmasked[0]) > 1e-4


@pytest.mark.parametrize("phase_split", [False, True])
def test_condition_unet_rich_config_matches_diffusers(tmp_path, monkeypatch, phase_split):
    if phase_split:  # the low-resolution upsample+conv path, whatever the input size
        monkeypatch.setattr(Upsample2D, "PHASE_SPLIT_MIN_PIXELS", 1)
    theirs = save_diffusers("UNet2DConditionModel", RICH_COND, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, 3, 24, generator=gen)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        ref = theirs(sample, 42, context, class_labels=labels).sample
        got = ours(sample, 42, context, class_labels=labels).sample
    assert max_diff(got, ref) <= TOL


def test_condition_unet_saved_by_ldmkit_loads_in_diffusers(tiny_cond, tmp_path):
    import diffusers

    _, _, ours = tiny_cond
    ours.save_pretrained(tmp_path)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 32, generator=gen)
    with torch.no_grad():
        assert max_diff(ours(sample, 7, context).sample, theirs(sample, 7, context).sample) <= TOL
    assert UNet2DConditionModel.from_pretrained(tmp_path).config == ours.config


def test_condition_unet_diffusers_config_loads_without_warning(tiny_cond, caplog):
    folder, _, _ = tiny_cond
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        UNet2DConditionModel.from_pretrained(folder)
    assert not [r for r in caplog.records if r.name.startswith("ldmkit")]


def test_published_text2img_unet_has_diffusers_keys_and_shapes():
    """The CompVis/ldm-text2im-large-256 UNet, built on the meta device by both libraries."""
    import diffusers

    config = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, cross_attention_dim=1280, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    assert_same_parameters(diffusers.UNet2DConditionModel, UNet2DConditionModel, config)


@pytest.mark.parametrize("key, value", [("addition_embed_type", "text"), ("time_cond_proj_dim", 8),
                                        ("class_embed_type", "timestep"), ("attention_type", "gated"),
                                        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")])
def test_condition_unet_unsupported_feature_raises(tiny_cond, tmp_path, key, value):
    folder, _, _ = tiny_cond
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    with pytest.raises(LDMKitError, match=key):
        UNet2DConditionModel.from_config(config)


def test_condition_unet_weights_config_mismatch_raises(tiny_cond, tmp_path):
    folder, _, _ = tiny_cond
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(LDMKitError, match="shape"):
        UNet2DConditionModel.from_state_dict({**config, "cross_attention_dim": 16}, state)
    with pytest.raises(LDMKitError, match="missing"):
        UNet2DConditionModel.from_state_dict({**config, "layers_per_block": 2}, state)


def test_condition_unet_bad_inputs_raise(tiny_cond):
    _, _, ours = tiny_cond
    sample, context = torch.zeros(2, 4, 16, 16), torch.zeros(2, 7, 32)
    cases = [
        ((torch.zeros(2, 3, 16, 16), 1, context), "4 channels"),
        ((torch.zeros(2, 4, 16, 15), 1, context), "multiples of 2"),
        ((torch.zeros(4, 16, 16), 1, context), "4-D"),
        ((sample, 1, torch.zeros(2, 7, 64)), "cross_attention_dim"),
        ((sample, 1, torch.zeros(2, 32)), "batch, tokens, features"),
        ((sample, 1, torch.zeros(3, 7, 32)), "batch size"),
        ((sample, torch.tensor([1, 2, 3]), context), "timestep"),
    ]
    for args, message in cases:
        with pytest.raises(LDMKitError, match=message):
            ours(*args)
    with pytest.raises(LDMKitError, match="no class embedding"):
        ours(sample, 1, context, class_labels=torch.tensor([0, 1]))


def test_condition_unet_class_labels_required(tmp_path):
    model = UNet2DConditionModel(**{**TINY_COND, "num_class_embeds": 3})
    with pytest.raises(LDMKitError, match="class_labels"):
        model(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 2, 32))


# --- UNet2DModel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [5, torch.tensor(250), torch.tensor([1, 999])])
def test_unet2d_matches_diffusers(tiny_unet2d, timestep):
    _, theirs, ours = tiny_unet2d
    sample = torch.randn(2, 6, 16, 24, generator=torch.Generator().manual_seed(0))  # non-square
    with torch.no_grad():
        ref = theirs(sample, timestep).sample
        got = ours(sample, timestep).sample
    assert max_diff(got, ref) <= TOL


@pytest.mark.parametrize("phase_split", [False, True])
def test_unet2d_rich_config_matches_diffusers(tmp_path, monkeypatch, phase_split):
    if phase_split:
        monkeypatch.setattr(Upsample2D, "PHASE_SPLIT_MIN_PIXELS", 1)
    theirs = save_diffusers("UNet2DModel", RICH_UNET2D, tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        ref = theirs(sample, 30, class_labels=labels).sample
        got = ours(sample, 30, class_labels=labels).sample
    assert max_diff(got, ref) <= TOL


def test_unet2d_saved_by_ldmkit_loads_in_diffusers(tiny_unet2d, tmp_path, caplog):
    import diffusers

    folder, _, ours = tiny_unet2d
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        UNet2DModel.from_pretrained(folder)
    assert not [r for r in caplog.records if r.name.startswith("ldmkit")]
    ours.save_pretrained(tmp_path)
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    sample = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours(sample, 3).sample, theirs(sample, 3).sample) <= TOL


def test_unet2d_loads_legacy_attention_keys(tiny_unet2d, tmp_path):
    """Old checkpoints name the spatial attention's projections query/key/value/proj_attn."""
    folder, _, ours = tiny_unet2d
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = UNet2DModel.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("config", [
    # CompVis/ldm-super-resolution-4x-openimages
    dict(in_channels=6, out_channels=3, block_out_channels=(160, 320, 320, 640), layers_per_block=2,
         down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
         up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, attention_head_dim=32),
    # CompVis/ldm-celebahq-256
    dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
         layers_per_block=2,
         down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
         up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=32),
])
def test_published_unet2d_configs_have_diffusers_keys_and_shapes(config):
    import diffusers

    assert_same_parameters(diffusers.UNet2DModel, UNet2DModel, config)


def test_unet2d_bad_inputs_raise(tiny_unet2d):
    _, _, ours = tiny_unet2d
    with pytest.raises(LDMKitError, match="6 channels"):
        ours(torch.zeros(1, 3, 16, 16), 1)
    with pytest.raises(LDMKitError, match="multiples of 4"):
        ours(torch.zeros(1, 6, 18, 16), 1)
    with pytest.raises(LDMKitError, match="time_embedding_type"):
        UNet2DModel.from_config({**TINY_UNET2D, "time_embedding_type": "fourier"})
    with pytest.raises(LDMKitError, match="Unknown down block type 'SkipDownBlock2D'.*DownBlock2D"):
        UNet2DModel(**{**TINY_UNET2D, "down_block_types": ("SkipDownBlock2D",) * 3})


def assert_same_parameters(diffusers_cls, ldmkit_cls, config: dict) -> None:
    with torch.device("meta"):
        theirs = diffusers_cls(**config)
        ours = ldmkit_cls(**config)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected


# --- shared blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 4, 1, 1)])
def test_upsample_conv_by_phases_equals_upsample_then_conv(shape):
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    weight = torch.randn(6, shape[1], 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(6, generator=gen, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    got = upsample_conv_by_phases(x, weight, bias)
    assert max_diff(got, ref) <= 1e-4 * ref.abs().max().item()
    grad = torch.randn(ref.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(ref, (x, weight, bias), grad),
                    torch.autograd.grad(got, (x, weight, bias), grad)):
        assert max_diff(a, b) <= 1e-4 * a.abs().max().item()
    channels_last = upsample_conv_by_phases(x.detach().contiguous(memory_format=torch.channels_last), weight, bias)
    assert max_diff(channels_last, ref) <= 1e-4 * ref.abs().max().item()


def test_channels_last_models_give_the_same_output(tiny_cond, tiny_unet2d, monkeypatch):
    """Converting a model with .to(memory_format=torch.channels_last) (faster convolutions on CPU) is safe."""
    monkeypatch.setattr(Upsample2D, "PHASE_SPLIT_MIN_PIXELS", 64)  # both upsampling paths in one model
    _, _, cond = tiny_cond
    _, _, unet2d = tiny_unet2d
    gen = torch.Generator().manual_seed(4)
    sample, context, sr_input = (torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 3, 32, generator=gen),
                                 torch.randn(1, 6, 16, 16, generator=gen))
    with torch.no_grad():
        ref_cond, ref_sr = cond(sample, 5, context).sample, unet2d(sr_input, 5).sample
        for model in (cond, unet2d):
            model.to(memory_format=torch.channels_last)
        try:
            assert max_diff(cond(sample, 5, context).sample, ref_cond) <= TOL
            assert max_diff(unet2d(sr_input, 5).sample, ref_sr) <= TOL
        finally:
            for model in (cond, unet2d):
                model.to(memory_format=torch.contiguous_format)
