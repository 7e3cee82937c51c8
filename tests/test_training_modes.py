"""Each kind of run for a few tiny steps: VQ autoencoder with EMA codebook and patch GAN, super-resolution
(concat), unconditional with v-prediction and gradient accumulation; exports load in ldmkit and diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError, VQModel
from ldmkit.training import build_recipe, train_autoencoder, train_ldm
from training_utils import TRAIN_FAST, ldm_dict, metrics, tiny_autoencoder, toy_data

# Training tests run on one torch thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("toy"), size=16, variants=1)


def test_vq_autoencoder_with_ema_codebook_and_gan(toy, tmp_path):
    recipe = build_recipe("autoencoder", {
        "output_dir": str(tmp_path / "vq"),
        "data": {"root": str(toy), "resolution": 16, "holdout": 2, "num_workers": 0},
        "model": {"type": "vq", "block_out_channels": [8, 8, 8], "layers_per_block": 1, "latent_channels": 3,
                  "norm_num_groups": 4, "num_vq_embeddings": 16, "mid_block_add_attention": False},
        "loss": {"codebook": "ema", "disc_start": 2, "disc_channels": 8, "disc_layers": 2},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "mixed_precision": "no", **TRAIN_FAST,
                  "ema": {"enabled": False}},
    })
    final = train_autoencoder(recipe)
    model = VQModel.from_pretrained(final)
    assert model.config.scaling_factor == 1.0
    logged = metrics(tmp_path / "vq")
    steps = [r for r in logged if "loss" in r]
    assert "d_loss" not in steps[1] and "d_loss" in steps[2] and steps[2]["d_weight"] > 0  # GAN from step 2
    assert any("psnr_heldout" in r for r in logged)
    assert (tmp_path / "vq" / "loss.png").is_file() and list((tmp_path / "vq" / "samples").glob("*.png"))
    checkpoint = torch.load(next((tmp_path / "vq" / "checkpoints").iterdir()) / "models.pt", weights_only=True)
    assert set(checkpoint) == {"autoencoder", "discriminator", "codebook_ema"}


def test_dead_codes_are_restarted_at_encoder_outputs():
    from ldmkit.training.autoencoder import CodebookEMA

    torch.manual_seed(0)
    codebook = torch.nn.Parameter(torch.randn(8, 3) + 100.0, requires_grad=False)  # far from every latent
    latents = torch.randn(2, 3, 4, 4)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 3)
    indices = torch.zeros(32, dtype=torch.long)  # everything picked code 0
    never = CodebookEMA(codebook.detach().clone(), decay=0.99, restart_threshold=0.0)
    restarting = CodebookEMA(codebook.detach().clone(), decay=0.99, restart_threshold=0.03)
    for ema in (never, restarting):
        book = torch.nn.Parameter(codebook.detach().clone(), requires_grad=False)
        ema.accumulate(latents, indices)
        ema.update(book)
        ema.book = book
    assert (never.book[1:] > 50).all()  # unused codes stay where nobody will ever pick them
    moved = restarting.book[1:]
    assert all(any(torch.allclose(row, f, atol=1e-5) for f in flat) for row in moved)  # restarted at latents
    assert int(restarting.num_updates) == 1 and restarting.cluster_size[1:].eq(1.0).all()


def test_autoencoder_crop_size_trains_on_crops_and_is_checked(toy, tmp_path):
    data = {"output_dir": str(tmp_path / "kl"),
            "data": {"root": str(toy), "resolution": 16, "crop_size": 8, "holdout": 2, "num_workers": 0},
            "model": {"type": "kl", "block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 4,
                      "norm_num_groups": 4, "mid_block_add_attention": False},
            "train": {"max_steps": 2, "batch_size": 2, "mixed_precision": "no", **TRAIN_FAST,
                      "ema": {"enabled": False}}}
    train_autoencoder(build_recipe("autoencoder", data))
    assert any("psnr_heldout" in r for r in metrics(tmp_path / "kl"))  # evaluated on whole 16x16 images
    with pytest.raises(LDMKitError, match="crop_size"):
        build_recipe("autoencoder", data, ["data.crop_size=7"])


@pytest.fixture(scope="module")
def vq_f4(tmp_path_factory):
    return tiny_autoencoder(tmp_path_factory.mktemp("vq") / "ae", kind="vq", levels=3)


def _image_pipelines(folder):
    import diffusers

    ours = DiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def test_super_resolution_concat(toy, vq_f4, tmp_path):
    data = ldm_dict(toy, vq_f4, tmp_path / "sr", conditioning="concat", max_steps=3)
    data["data"].update(sr_scale=4, degradation="bsr")
    final = train_ldm(build_recipe("ldm", data))
    ours, theirs = _image_pipelines(final)
    assert type(ours).__name__ == type(theirs).__name__ == "LDMSuperResolutionPipeline"
    assert ours.unet.config.in_channels == 3 + 3
    low = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # diffusers' SR pipeline takes no latents: it draws x_T first from its generator. Ours gets that x_T.
    latents = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = ours(image=low * 2 - 1, latents=latents, generator=torch.Generator().manual_seed(1), num_inference_steps=2,
               output_type="np").images
    ref = theirs(image=low * 2 - 1, generator=torch.Generator().manual_seed(1), num_inference_steps=2,
                 output_type="np").images  # both read tensors in [-1, 1]
    assert out.shape == ref.shape == (1, 16, 16, 3)
    assert np.abs(out - ref).max() <= 1e-4


def test_unconditional_bf16_v_prediction_with_accumulation(toy, vq_f4, tmp_path):
    data = ldm_dict(toy, vq_f4, tmp_path / "uncond", conditioning="none", max_steps=3,
                    gradient_accumulation_steps=2, mixed_precision="bf16")
    data["diffusion"] = {"schedule": "celebahq-256", "prediction_type": "v_prediction"}
    data["data"]["latent_cache"] = True
    data["data"]["latent_cache_dir"] = str(tmp_path / "cache")
    final = train_ldm(build_recipe("ldm", data))
    ours, theirs = _image_pipelines(final)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    assert ours.scheduler.config.beta_end == 0.0195
    # diffusers' LDMPipeline takes no latents: the same generator draws the same noise in both.
    a = ours(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    b = theirs(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    assert a.shape == (1, 16, 16, 3) and np.abs(a - b).max() < 1e-4
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "uncond") if "loss" in r)


def test_run_level_errors(toy, vq_f4, tmp_path):
    with pytest.raises(LDMKitError, match="fp16 needs a GPU"):
        train_ldm(build_recipe("ldm", ldm_dict(toy, vq_f4, tmp_path / "a", mixed_precision="fp16")))
    with pytest.raises(LDMKitError, match="not a checkpoint folder"):
        train_ldm(build_recipe("ldm", ldm_dict(toy, vq_f4, tmp_path / "b")), resume=str(tmp_path))
    with pytest.raises(LDMKitError, match="not a saved autoencoder"):
        train_ldm(build_recipe("ldm", ldm_dict(toy, tmp_path / "nothing", tmp_path / "c")))
    with pytest.raises(LDMKitError, match="fewer than train.batch_size"):
        train_ldm(build_recipe("ldm", ldm_dict(toy, vq_f4, tmp_path / "d", batch_size=64)))
    with pytest.raises(LDMKitError, match="data.sr_scale .* must equal the autoencoder's factor"):
        train_ldm(build_recipe("ldm", ldm_dict(toy, vq_f4, tmp_path / "e", conditioning="concat"),
                               ["data.sr_scale=2"]))
