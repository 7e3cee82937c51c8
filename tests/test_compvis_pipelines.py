"""The class-conditional and inpainting pipelines' inputs, outputs and errors; the UNet pieces that original
configs need (resblock_updown blocks, per-level head sizes)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from compvis_fixtures import SEED, load, reference, requires_fixtures, single_thread
from ldmkit import LDMKitError, UNet2DModel
from ldmkit.loading.compvis_unet import diffusers_unet_config, parse_unet, unet_rules

_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _generator():
    return torch.Generator().manual_seed(SEED)


@requires_fixtures
def test_class_conditional_outputs_and_guidance():
    pipe = load("cin")
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        for output_type, check in (("pil", lambda x: x[0].size == (32, 32) and len(x) == 2),
                                   ("np", lambda x: x.shape == (2, 32, 32, 3)),
                                   ("pt", lambda x: x.shape == (2, 3, 32, 32) and 0 <= x.min() <= x.max() <= 1),
                                   ("latent", lambda x: x.shape == (2, 3, 8, 8))):
            images = pipe([25, 992], num_inference_steps=2, generator=_generator(), output_type=output_type).images
            assert check(images), output_type
        assert calls == [2] * 8  # guidance_scale 1: the conditional pass only
        calls.clear()
        pipe(torch.tensor([3]), num_inference_steps=2, guidance_scale=3.0, output_type="latent")
        pipe(7, num_inference_steps=2, guidance_scale=0.0, output_type="latent")
        assert calls == [2, 2, 1, 1]
    finally:
        hook.remove()
    # guidance 0 samples the null class
    null = pipe(1000, num_inference_steps=2, generator=_generator(), output_type="latent").images
    uncond = pipe(5, num_inference_steps=2, generator=_generator(), guidance_scale=0.0, output_type="latent").images
    assert torch.equal(null, uncond)


@requires_fixtures
@pytest.mark.parametrize("labels", [1001, -1, [], [1.5], True, [[1, 2]], "cat"])
def test_class_conditional_bad_labels(labels):
    with pytest.raises(LDMKitError, match="class_labels"):
        load("cin")(labels, num_inference_steps=1)


@requires_fixtures
def test_class_conditional_bad_arguments():
    pipe = load("cin")
    with pytest.raises(LDMKitError, match="guidance_scale"):
        pipe([1], guidance_scale=-1)
    with pytest.raises(LDMKitError, match="latents"):
        pipe([1, 2], latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(LDMKitError, match="generators"):
        pipe([1, 2], generator=[_generator()])
    per_image = pipe([1, 2], num_inference_steps=2, generator=[_generator(), _generator()], output_type="latent")
    alone = pipe([2], num_inference_steps=2, generator=[_generator()], output_type="latent")
    torch.testing.assert_close(per_image.images[1:], alone.images)


def _image_and_mask():
    ref = reference("inpainting")
    image = PIL.Image.fromarray(ref["input.image_uint8_hwc"][0].numpy())
    mask = PIL.Image.fromarray(ref["input.mask_uint8_hw"][0].numpy())
    return image, mask


@requires_fixtures
def test_inpainting_keeps_the_known_pixels():
    pipe = load("inpainting")
    image, mask = _image_and_mask()
    out = pipe(image, mask, num_inference_steps=2, generator=_generator()).images[0]
    known = np.asarray(mask) < 128
    assert 0 < known.sum() < known.size
    assert np.array_equal(np.asarray(out)[known], np.asarray(image)[known])
    assert not np.array_equal(np.asarray(out)[~known], np.asarray(image)[~known])
    # An all-zero mask repaints nothing.
    kept = pipe(image, np.zeros((32, 32), np.uint8), num_inference_steps=1, output_type="np").images
    assert np.array_equal((kept[0] * 255).round().astype(np.uint8), np.asarray(image))


@requires_fixtures
def test_inpainting_input_kinds_agree():
    pipe = load("inpainting")
    image, mask = _image_and_mask()
    image_t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mask_t = torch.from_numpy(np.array(mask)).float() / 255
    results = []
    for img, msk in ((image, mask), (image_t, mask_t), (image_t[None], mask_t[None, None]), ([image], [mask]),
                     (np.asarray(image), np.asarray(mask))):
        results.append(pipe(img, msk, num_inference_steps=2, generator=_generator(), output_type="pt").images)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])
    # One mask for two images.
    two = pipe([image, image], mask, num_inference_steps=2, generator=_generator(), output_type="latent").images
    assert two.shape == (2, 3, 8, 8)


@requires_fixtures
def test_inpainting_errors():
    pipe = load("inpainting")
    image, mask = _image_and_mask()
    with pytest.raises(LDMKitError, match="mask_image"):
        pipe(image, None)
    with pytest.raises(LDMKitError, match="multiples of 8"):
        pipe(image.resize((36, 36)), mask.resize((36, 36)))
    with pytest.raises(LDMKitError, match="same size"):
        pipe(image, mask.resize((16, 16)))
    with pytest.raises(LDMKitError, match="one channel"):
        pipe(image, torch.zeros(1, 3, 32, 32))


def test_adm_heads_per_level_and_resblock_updown():
    """inpainting_big-like: fixed num_heads over growing widths needs one head size per level."""
    params = {"image_size": 8, "in_channels": 7, "out_channels": 3, "model_channels": 32, "num_res_blocks": 1,
              "attention_resolutions": [1, 2], "channel_mult": [1, 2], "num_heads": 8, "resblock_updown": True}
    layout = parse_unet({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params})
    name, config = diffusers_unet_config(layout)
    assert name == "UNet2DModel" and config["attention_head_dim"] == [4, 8]
    assert config["down_block_types"] == ["AttnDownBlock2D", "AttnDownBlock2D"]
    unet = UNet2DModel.from_config(config)
    assert unet.down_blocks[1].attentions[0].heads == unet.mid_block.attentions[0].heads == 8
    assert unet.up_blocks[1].attentions[0].heads == 8
    rules = {r.source: r.target for r in unet_rules(layout)}
    assert rules["input_blocks.2.0"] == "down_blocks.0.downsamplers.0"  # a ResBlock with down=True
    assert rules["output_blocks.1.2"] == "up_blocks.0.upsamplers.0"
    assert set(unet.state_dict()) >= {f"{t}.norm1.weight" for t in ("down_blocks.0.downsamplers.0",
                                                                     "up_blocks.0.upsamplers.0")}


def test_resnet_up_and_downsample_blocks_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    config = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 32],
              "layers_per_block": 1, "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"], "attention_head_dim": 8,
              "downsample_type": "resnet", "upsample_type": "resnet", "resnet_time_scale_shift": "scale_shift",
              "attn_norm_num_groups": 32}
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = UNet2DModel.from_state_dict(config, theirs.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 10).sample, theirs(x, 10).sample, rtol=1e-5, atol=1e-5)


def _adm_attention_block(x, norm, qkv_weight, qkv_bias, proj_weight, proj_bias, heads: int, new_order: bool):
    """openaimodel.AttentionBlock written out: QKVAttentionLegacy splits heads before q/k/v, QKVAttention
    after; q and k are each scaled by ch ** -1/4."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    qkv = torch.nn.functional.conv1d(norm(flat), qkv_weight, qkv_bias)
    ch = c // heads
    if new_order:
        q, k, v = (t.reshape(b * heads, ch, -1) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, h * w)
    return (flat + torch.nn.functional.conv1d(out, proj_weight, proj_bias)).reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [False, True])
def test_adm_attention_block_conversion(new_order):
    from functools import partial

    from ldmkit.loading.compvis_keys import KeyTable, Rule
    from ldmkit.loading.compvis_unet import ATTENTION_BLOCK, split_qkv
    from ldmkit.models import Attention

    torch.manual_seed(0)
    channels, heads = 64, 4
    norm = torch.nn.GroupNorm(32, channels)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    original = {"norm.weight": norm.weight.detach(), "norm.bias": torch.randn(channels) * 0.1,
                "qkv.weight": torch.randn(3 * channels, channels, 1) / 8, "qkv.bias": torch.randn(3 * channels) * 0.1,
                "proj_out.weight": torch.randn(channels, channels, 1) / 8, "proj_out.bias": torch.randn(channels)}
    norm.bias.data = original["norm.bias"]
    ours = Attention(channels, heads=heads, dim_head=channels // heads, bias=True, norm_num_groups=32, eps=1e-5,
                     residual_connection=True)
    rule = Rule("block", "block", ATTENTION_BLOCK, split=partial(split_qkv, heads=heads, new_order=new_order),
                to_linear=True)
    state = KeyTable("attention", "", [rule]).convert(
        {f"block.{k}": v for k, v in original.items()}, {f"block.{k}": v for k, v in ours.state_dict().items()})
    ours.load_state_dict({k.removeprefix("block."): v for k, v in state.items()})
    x = torch.randn(2, channels, 4, 4)
    expected = _adm_attention_block(x, norm, original["qkv.weight"], original["qkv.bias"],
                                    original["proj_out.weight"], original["proj_out.bias"], heads, new_order)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected.detach(), rtol=1e-5, atol=1e-5)
