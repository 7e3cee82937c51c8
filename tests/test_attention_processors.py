"""Attention processors: diffusers' names and API (attn_processors, set_attn_processor, set_default_attn_processor,
set_attention_slice, fuse_qkv_projections), side by side with diffusers, and what each processor changes: the same
outputs, the memory (slicing) and the projections (fusing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit.errors import LDMKitError
from ldmkit.models import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from ldmkit.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
)
from memory_probe import PeakMemory

TOL = 1e-5
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unets(tiny_text2img_dir):
    ours = UNet2DConditionModel.from_pretrained(tiny_text2img_dir, subfolder="unet")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tiny_text2img_dir, subfolder="unet").eval()
    return ours, theirs


@pytest.fixture(scope="module")
def vaes(tiny_text2img_dir):
    ours = AutoencoderKL.from_pretrained(tiny_text2img_dir, subfolder="vqvae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tiny_text2img_dir, subfolder="vqvae").eval()
    return ours, theirs


@pytest.fixture
def unet_inputs():
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    mask = torch.ones(2, 77)
    mask[:, 20:] = 0  # padding the cross-attention must ignore: exercises the mask in every processor
    return sample, context, mask


def run_unet(unet, inputs):
    sample, context, mask = inputs
    with torch.no_grad():
        return unet(sample, 7, context, encoder_attention_mask=mask).sample


def processor_types(model) -> set[type]:
    return {type(p) for p in model.attn_processors.values()}


def test_processor_names_are_diffusers(unets, vaes):
    for ours, theirs in (unets, vaes):
        # The same names (the modules are registered in another order, so the dicts' orders differ).
        assert sorted(ours.attn_processors) == sorted(theirs.attn_processors)
        assert processor_types(ours) == {AttnProcessor2_0}
    assert len(unets[0].attn_processors) == 8 and len(vaes[0].attn_processors) == 2


def test_default_processor_matches_diffusers_default(unets, vaes, unet_inputs):
    ours, theirs = unets
    sdpa = run_unet(ours, unet_inputs)
    try:
        ours.set_default_attn_processor()
        theirs.set_default_attn_processor()
        assert processor_types(ours) == {AttnProcessor}
        explicit = run_unet(ours, unet_inputs)
        assert (explicit - run_unet(theirs, unet_inputs)).abs().max() <= TOL
        assert (explicit - sdpa).abs().max() <= TOL
        image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        vae, ref = vaes
        vae.set_default_attn_processor()
        ref.set_default_attn_processor()
        with torch.no_grad():
            assert (vae(image).sample - ref(image).sample).abs().max() <= TOL
    finally:
        ours.set_attn_processor(AttnProcessor2_0())
        vaes[0].set_attn_processor(AttnProcessor2_0())


def test_every_attention_goes_through_its_processor(unets, unet_inputs):
    ours, _ = unets
    expected = run_unet(ours, unet_inputs)
    seen = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            seen.append((attn, encoder_hidden_states is not None, attention_mask is not None))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    try:
        ours.set_attn_processor({name: Recording() for name in ours.attn_processors})
        assert torch.equal(run_unet(ours, unet_inputs), expected)
    finally:
        ours.set_attn_processor(AttnProcessor2_0())
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    assert [attn for attn, _, _ in seen] == layers
    # attn1 is self-attention, attn2 cross-attention with the padding mask.
    assert [(cross, masked) for _, cross, masked in seen] == [(False, False), (True, True)] * 4


def test_processors_written_for_diffusers_run_unchanged(unets, vaes, unet_inputs):
    from diffusers.models import attention_processor as dap

    ours, _ = unets
    expected = run_unet(ours, unet_inputs)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_image = vaes[0](image).sample
    try:
        for processor in (dap.AttnProcessor2_0(), dap.AttnProcessor()):
            ours.set_attn_processor(processor)
            vaes[0].set_attn_processor(processor)
            assert (run_unet(ours, unet_inputs) - expected).abs().max() <= TOL
            with torch.no_grad():
                assert (vaes[0](image).sample - expected_image).abs().max() <= TOL
    finally:
        ours.set_attn_processor(AttnProcessor2_0())
        vaes[0].set_attn_processor(AttnProcessor2_0())


def test_set_attn_processor_by_name_and_its_errors(unets):
    ours, _ = unets
    names = list(ours.attn_processors)
    chosen = {name: AttnProcessor() if i % 2 else SlicedAttnProcessor(1) for i, name in enumerate(names)}
    try:
        ours.set_attn_processor(chosen)
        assert ours.attn_processors == chosen
        with pytest.raises(LDMKitError, match="each of the 8 attention layers"):
            ours.set_attn_processor({names[0]: AttnProcessor()})
        with pytest.raises(LDMKitError, match="unknown"):
            ours.set_attn_processor({**{n: AttnProcessor() for n in names[1:]}, "attn9.processor": AttnProcessor()})
        with pytest.raises(LDMKitError, match="callable"):
            ours.set_attn_processor("sdpa")
        with pytest.raises(LDMKitError, match="fuse_qkv_projections"):
            ours.set_attn_processor(FusedAttnProcessor2_0())
            run_unet(ours, (torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.ones(1, 77)))
    finally:
        ours.set_attn_processor(AttnProcessor2_0())


def test_attention_slice_sizes(unets):
    ours, _ = unets
    try:
        ours.set_attention_slice("auto")  # half of the 4 heads
        assert {p.slice_size for p in ours.attn_processors.values()} == {2}
        ours.set_attention_slice("max")
        assert {p.slice_size for p in ours.attn_processors.values()} == {1}
        ours.set_attention_slice([1, 2, 3, 4, 4, 3, 2, 1])  # one per layer, in attn_processors' order
        assert [p.slice_size for p in ours.attn_processors.values()] == [1, 2, 3, 4, 4, 3, 2, 1]
        for bad, message in ((5, "larger than this layer's 4 heads"), ([1, 2], "2 sizes for 8"), (0, "slice_size")):
            with pytest.raises(LDMKitError, match=message):
                ours.set_attention_slice(bad)
        ours.set_attention_slice(None)
        assert processor_types(ours) == {AttnProcessor2_0}
    finally:
        ours.set_attn_processor(AttnProcessor2_0())


def test_sliced_attention_same_numbers_bounded_memory():
    torch.manual_seed(0)
    attn = Attention(64, heads=8, dim_head=8, norm_num_groups=8, residual_connection=True).eval()
    image = torch.randn(2, 64, 32, 32)  # 1024 positions: one score matrix is 4 MiB, all 16 of them 64 MiB
    scores = 1024 * 1024 * 4

    def measure(processor):
        attn.set_processor(processor)
        # The math kernel is SDPA's fall-back that writes the scores out; the fused kernels never do.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), PeakMemory() as probe:
            out = attn(image)
        return out, probe.peak

    full, full_peak = measure(AttnProcessor2_0())
    explicit, explicit_peak = measure(AttnProcessor())
    for size in (1, 4):
        sliced, sliced_peak = measure(SlicedAttnProcessor(size))
        assert (sliced - full).abs().max() <= TOL and (explicit - full).abs().max() <= TOL
        assert full_peak >= 16 * scores and explicit_peak >= 16 * scores
        # The scores of `size` rows (twice: the scores and their softmax) plus the activations (4 MiB).
        assert sliced_peak <= 2 * size * scores + 6 * 2**20, (size, sliced_peak)


def test_unet_slicing_bounds_its_attention_memory(unets, unet_inputs):
    ours, _ = unets
    sample = torch.randn(2, 4, 32, 32)  # 1024 positions in the first level's self-attention
    inputs = (sample, *unet_inputs[1:])

    def measure():
        with sdpa_kernel(SDPBackend.MATH), PeakMemory() as probe:
            out = run_unet(ours, inputs)
        return out, probe.largest

    full, full_largest = measure()
    try:
        ours.set_attention_slice("max")
        sliced, sliced_largest = measure()
    finally:
        ours.set_attention_slice(None)
    assert (sliced - full).abs().max() <= TOL
    one_score_matrix = 1024 * 1024 * 4
    assert full_largest >= 8 * one_score_matrix and sliced_largest <= one_score_matrix


def test_fused_projections_are_one_linear_and_keys_match_diffusers(unets, vaes, unet_inputs):
    ours, theirs = unets
    original_keys = list(ours.state_dict())
    expected = run_unet(ours, unet_inputs)
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
               for name, m in ours.named_modules() if isinstance(m, nn.Linear)]
    try:
        ours.fuse_qkv_projections()
        handles += [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
                    for name, m in ours.named_modules() if name.endswith(("to_qkv", "to_kv"))]
        assert (run_unet(ours, unet_inputs) - expected).abs().max() <= TOL
        assert processor_types(ours) == {FusedAttnProcessor2_0}
        self_attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert isinstance(self_attn.to_qkv, nn.Linear) and self_attn.to_qkv.weight.shape == (3 * 32, 32)
        prefix = "down_blocks.0.attentions.0.transformer_blocks.0."
        assert calls[prefix + "attn1.to_qkv"] == 1 and calls[prefix + "attn2.to_kv"] == 1
        assert calls[prefix + "attn2.to_q"] == 1
        assert not any(calls.get(prefix + f"attn1.to_{p}") for p in "qkv")
        assert not any(calls.get(prefix + f"attn2.to_{p}") for p in "kv")
        theirs.fuse_qkv_projections()
        assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
        with torch.no_grad():  # a change made to the fused weights survives unfusing
            self_attn.to_qkv.weight[:32].add_(1.0)
        ours.unfuse_qkv_projections()
        assert list(ours.state_dict()) == original_keys
        assert processor_types(ours) == {AttnProcessor2_0}
        assert (run_unet(ours, unet_inputs) - expected).abs().max() > 1e-3
    finally:
        for handle in handles:
            handle.remove()
        theirs.unfuse_qkv_projections()
        with torch.no_grad():
            ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.sub_(1.0)
    assert (run_unet(ours, unet_inputs) - expected).abs().max() <= TOL


def test_fused_autoencoder_matches(vaes):
    ours, theirs = vaes
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(image).sample
        ours.fuse_qkv_projections()
        theirs.fuse_qkv_projections()
        try:
            assert (ours(image).sample - expected).abs().max() <= TOL
            assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
        finally:
            ours.unfuse_qkv_projections()
            theirs.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())


@pytest.mark.parametrize("upcast", [False, True])
def test_every_processor_in_half_precision(upcast):
    torch.manual_seed(0)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, upcast_attention=upcast).eval()
    tokens, context = torch.randn(2, 100, 64), torch.randn(2, 7, 32)
    mask = torch.zeros(2, 1, 1, 7)
    mask[..., 5:] = -10000.0
    with torch.no_grad():
        expected = attn(tokens, context, mask)
        attn.to(torch.bfloat16)
        for processor in (AttnProcessor2_0(), AttnProcessor(), SlicedAttnProcessor(3)):
            attn.set_processor(processor)
            out = attn(tokens.bfloat16(), context.bfloat16(), mask.bfloat16())
            assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() <= 1e-2


def test_unet2d_processors(tiny_uncond_dir):
    ours = UNet2DModel.from_pretrained(tiny_uncond_dir, subfolder="unet")
    theirs = diffusers.UNet2DModel.from_pretrained(tiny_uncond_dir, subfolder="unet").eval()
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(sample, 5).sample
        assert all(name.endswith(".processor") for name in ours.attn_processors) and ours.attn_processors
        for change in (ours.set_default_attn_processor, lambda: ours.set_attention_slice("max"),
                       ours.fuse_qkv_projections):
            change()
            assert (ours(sample, 5).sample - expected).abs().max() <= TOL


def test_xformers_switch_warns_and_keeps_sdpa(unets):
    ours, _ = unets
    ours.set_default_attn_processor()
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        ours.enable_xformers_memory_efficient_attention()
    assert processor_types(ours) == {AttnProcessor2_0}
    ours.set_attention_slice("max")
    ours.disable_xformers_memory_efficient_attention()
    assert processor_types(ours) == {AttnProcessor2_0}
