"""AutoencoderKL and VQModel: parity with diffusers, file compatibility, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldmkit.models
from ldmkit.errors import LDMKitError
from ldmkit.models import AutoencoderKL, DiagonalGaussianDistribution, VQModel
from ldmkit.models.resnet import Upsample2D
from ldmkit.models.vae import VectorQuantizer
from reference_models import save_diffusers

TOL = 1e-5

TINY_KL = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
               layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8)
TINY_VQ = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 32),
               layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, num_vq_embeddings=32)


@pytest.fixture(scope="module")
def tiny_kl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kl")
    theirs = save_diffusers("AutoencoderKL", TINY_KL, folder)
    return folder, theirs, AutoencoderKL.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq")
    theirs = save_diffusers("VQModel", TINY_VQ, folder)
    return folder, theirs, VQModel.from_pretrained(folder)


def images(batch: int = 2, height: int = 32, width: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --- AutoencoderKL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase_split", [False, True])
def test_kl_encode_sample_decode_match_diffusers(tiny_kl, monkeypatch, phase_split):
    if phase_split:  # the low-resolution upsample+conv path, whatever the input size
        monkeypatch.setattr(Upsample2D, "PHASE_SPLIT_MIN_PIXELS", 1)
    _, theirs, ours = tiny_kl
    x = images()  # non-square
    with torch.no_grad():
        ref, got = theirs.encode(x).latent_dist, ours.encode(x).latent_dist
        for name in ("mean", "std", "var", "logvar"):
            assert max_diff(getattr(got, name), getattr(ref, name)) <= TOL, name
        assert max_diff(got.kl(), ref.kl()) <= 1e-4
        z_ref = ref.sample(generator=torch.Generator().manual_seed(5))
        z_got = got.sample(generator=torch.Generator().manual_seed(5))
        assert z_got.shape == (2, 4, 8, 6) and max_diff(z_got, z_ref) <= TOL
        per_sample = [torch.Generator().manual_seed(s) for s in (1, 2)]
        ref_list = ref.sample(generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
        assert max_diff(got.sample(generator=per_sample), ref_list) <= TOL
        assert max_diff(ours.decode(z_ref).sample, theirs.decode(z_ref).sample) <= TOL
        assert max_diff(ours(x).sample, theirs(x).sample) <= TOL


def test_kl_slicing_gives_the_same_result(tiny_kl):
    _, _, ours = tiny_kl
    x = images(batch=3, height=16, width=16)
    with torch.no_grad():
        whole_mean = ours.encode(x).latent_dist.mean
        whole_image = ours.decode(whole_mean).sample
        ours.enable_slicing()
        try:
            sliced_mean = ours.encode(x).latent_dist.mean
            sliced_image = ours.decode(whole_mean).sample
        finally:
            ours.disable_slicing()
    assert max_diff(sliced_mean, whole_mean) <= TOL and max_diff(sliced_image, whole_image) <= TOL


def test_kl_without_quant_convs_and_mid_attention_matches_diffusers(tmp_path):
    config = {**TINY_KL, "use_quant_conv": False, "use_post_quant_conv": False,
              "mid_block_add_attention": False}
    theirs = save_diffusers("AutoencoderKL", config, tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = images(batch=1, height=16, width=16)
    with torch.no_grad():
        assert max_diff(ours(x).sample, theirs(x).sample) <= TOL


def test_kl_saved_by_ldmkit_loads_in_diffusers(tiny_kl, tmp_path, caplog):
    import diffusers

    folder, _, ours = tiny_kl
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        AutoencoderKL.from_pretrained(folder)
    assert not [r for r in caplog.records if r.name.startswith("ldmkit")]
    ours.save_pretrained(tmp_path)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = images(batch=1, height=16, width=16)
    with torch.no_grad():
        assert max_diff(ours(x).sample, theirs(x).sample) <= TOL
    assert theirs.config.scaling_factor == ours.config.scaling_factor == 0.18215


def test_kl_loads_legacy_attention_keys(tiny_kl, tmp_path):
    folder, _, ours = tiny_kl
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_kl_bad_inputs_and_configs_raise(tiny_kl):
    folder, _, ours = tiny_kl
    with pytest.raises(LDMKitError, match="3 channels"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(LDMKitError, match="multiples of 4"):
        ours.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(LDMKitError, match="4 channels"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LDMKitError, match="does not fit AutoencoderKL"):
        AutoencoderKL.from_state_dict({**config, "use_quant_conv": False}, state)
    with pytest.raises(LDMKitError, match="shape"):
        AutoencoderKL.from_state_dict({**config, "latent_channels": 3}, state)
    with pytest.raises(LDMKitError, match="Unknown up block type"):
        AutoencoderKL(**{**TINY_KL, "up_block_types": ("AttnUpDecoderBlock2D",) * 3})


def test_diagonal_gaussian_kl_and_nll():
    params = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    dist = DiagonalGaussianDistribution(params)
    mean, logvar = params.chunk(2, dim=1)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])
    assert torch.allclose(dist.kl(), expected, atol=1e-5)
    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-5)
    normal = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    assert torch.allclose(dist.nll(mean), -normal.log_prob(mean).sum(dim=[1, 2, 3]), atol=1e-4)
    clamped = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 50.0)], dim=1))
    assert clamped.logvar.max().item() == 20.0
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).sample(), mean)


# --- VQModel ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase_split", [False, True])
def test_vq_encode_quantize_decode_match_diffusers(tiny_vq, monkeypatch, phase_split):
    if phase_split:
        monkeypatch.setattr(Upsample2D, "PHASE_SPLIT_MIN_PIXELS", 1)
    _, theirs, ours = tiny_vq
    x = images()  # non-square
    with torch.no_grad():
        latents = theirs.encode(x).latents
        assert max_diff(ours.encode(x).latents, latents) <= TOL
        z_ref, loss_ref, (_, _, idx_ref) = theirs.quantize(latents)
        z_got, loss_got, idx_got = ours.quantize(latents)
        assert idx_got.shape == (2, 16, 12)
        assert torch.equal(idx_got.reshape(-1), idx_ref.reshape(-1))
        assert max_diff(z_got, z_ref) <= TOL and abs(loss_got.item() - loss_ref.item()) <= TOL
        for force in (False, True):
            ref = theirs.decode(latents, force_not_quantize=force)
            got = ours.decode(latents, force_not_quantize=force)
            assert max_diff(got.sample, ref.sample) <= TOL
            assert max_diff(got.commit_loss.reshape(-1), ref.commit_loss.reshape(-1)) <= TOL
        assert max_diff(ours(x).sample, theirs(x).sample) <= TOL
        codes = ours.quantize.get_codebook_entry(idx_got, (2, 16, 12, 3))
        assert max_diff(codes, z_got) <= TOL


def test_vq_saved_by_ldmkit_loads_in_diffusers(tiny_vq, tmp_path, caplog):
    import diffusers

    folder, _, ours = tiny_vq
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        VQModel.from_pretrained(folder)
    assert not [r for r in caplog.records if r.name.startswith("ldmkit")]
    ours.save_pretrained(tmp_path)
    theirs = diffusers.VQModel.from_pretrained(tmp_path).eval()
    x = images(batch=1, height=16, width=16)
    with torch.no_grad():
        assert max_diff(ours(x).sample, theirs(x).sample) <= TOL


def test_vq_scaling_factor_defaults_to_one_for_old_configs(tiny_vq):
    """Published CompVis VQ configs state no scaling_factor; their latents were trained unscaled."""
    folder, _, _ = tiny_vq
    config = json.loads((folder / "config.json").read_text())
    assert config["scaling_factor"] == 0.18215  # diffusers writes its default explicitly: obeyed
    assert VQModel.from_config(config).config.scaling_factor == 0.18215
    del config["scaling_factor"]
    assert VQModel.from_config(config).config.scaling_factor == 1.0


def test_vq_unsupported_features_and_bad_inputs_raise(tiny_vq):
    folder, _, ours = tiny_vq
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(LDMKitError, match="norm_type"):
        VQModel.from_config({**config, "norm_type": "spatial"})
    with pytest.raises(LDMKitError, match="lookup_from_codebook"):
        VQModel.from_config({**config, "lookup_from_codebook": True})
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LDMKitError, match="shape"):
        VQModel.from_state_dict({**config, "num_vq_embeddings": 64}, state)
    with pytest.raises(LDMKitError, match="3 channels"):
        ours.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(LDMKitError, match="multiples of 2"):
        ours.encode(torch.zeros(1, 3, 15, 16))


@pytest.mark.parametrize("cls_name, config", [
    # CompVis/ldm-text2im-large-256 "vqvae" (an AutoencoderKL, f=8)
    ("AutoencoderKL", dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                           down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4)),
    # CompVis/ldm-super-resolution-4x-openimages / ldm-celebahq-256 VQ-f4
    ("VQModel", dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
                     num_vq_embeddings=8192, down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3)),
])
def test_published_autoencoders_have_diffusers_keys_and_shapes(cls_name, config):
    import diffusers

    with torch.device("meta"):
        theirs = getattr(diffusers, cls_name)(**config)
        ours = getattr(ldmkit.models, cls_name)(**config)
    expected = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected


def test_quantizer_blocks_distances_without_changing_codes():
    """Large latents are quantized in blocks of rows (bounded memory) with the codes of one full argmin."""
    quantizer = VectorQuantizer(64, 3)
    torch.nn.init.normal_(quantizer.embedding.weight, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(1)) * 2
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    full = torch.argmin(torch.cdist(flat, quantizer.embedding.weight), dim=1)
    quantizer.distance_block = 7  # many blocks, the last one partial
    z_q, _, indices = quantizer(z)
    assert torch.equal(indices.reshape(-1), full)
    expected = quantizer.embedding.weight[full].view(2, 9, 11, 3).permute(0, 3, 1, 2)
    assert torch.allclose(z_q, expected, atol=1e-6)  # straight-through z + (e - z) rounds in the last bit
