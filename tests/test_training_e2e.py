"""End to end on generated toy shapes: train a KL autoencoder (400 steps, the default bf16 autocast) and a text
LDM (600 steps), export, load with ldmkit and with diffusers, and check that it learned: "a red square" comes
out red, "a blue circle" blue, and the losses fell. One corrupt image is skipped and counted.

The LDM predicts v (Salimans & Ho 2022): with epsilon-prediction a toy image's colour can be read from z_t
at most noise levels, so the prompt barely lowers the loss and is learnt only after thousands of steps;
v asks for z_0 where the noise dominates, and there only the prompt tells the colour.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldmkit import AutoencoderKL, DiffusionPipeline
from ldmkit.datasets.toy import make_toy_dataset
from ldmkit.training import build_recipe, train_autoencoder, train_ldm
from ldmkit.training.autoencoder import EVAL_BATCH, SCALE_ESTIMATE_IMAGES
from ldmkit.training.data import ImageDataset, collate, scan_folder, split_holdout
from training_utils import metrics

FAST = {"progress_bar": False, "log_every": 10, "checkpoint_every": 1000, "sample_every": 0, "eval_every": 0}


# Training tests run on one torch thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _autoencoder_recipe(tmp):
    """The autoencoder's recipe (the fixture trains it on tmp / "toy"; the scaling-factor test reads its data)."""
    return build_recipe("autoencoder", {
        "output_dir": str(tmp / "ae"), "seed": 0,
        "data": {"root": str(tmp / "toy"), "resolution": 16, "random_crop": False, "holdout": 2, "num_workers": 0},
        "model": {"type": "kl", "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1,
                  "latent_channels": 4, "norm_num_groups": 8, "mid_block_add_attention": False},
        "train": {"max_steps": 400, "batch_size": 8, "lr": 3e-3, "warmup_steps": 10, "adam_betas": [0.9, 0.99],
                  "ema": {"enabled": False}, **FAST},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = make_toy_dataset(tmp / "toy", size=16, variants=4)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a red square"}) + "\n")

    ae = train_autoencoder(_autoencoder_recipe(tmp))
    pipe = train_ldm(build_recipe("ldm", {
        "conditioning": "text", "autoencoder": str(ae), "output_dir": str(tmp / "ldm"), "seed": 0,
        "data": {"root": str(data), "resolution": 16, "random_crop": False, "num_workers": 0, "latent_cache": True,
                 "latent_cache_dir": str(tmp / "cache")},
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_levels": [True, True],
                 "num_attention_heads": 4, "norm_num_groups": 8},
        "text": {"vocab_size": 64, "d_model": 32, "layers": 2, "heads": 2, "head_dim": 16, "ffn_dim": 64},
        "diffusion": {"prediction_type": "v_prediction"},
        "sampling": {"prompts": ["a red square", "a blue circle"], "num_inference_steps": 10},
        # fp32: for a text model this small bf16's casts cost more than they save (benchmarks/results).
        "train": {"max_steps": 600, "batch_size": 16, "lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 20,
                  "mixed_precision": "no", "ema": {"decay": 0.999}, **FAST},
    }))
    return tmp, ae, pipe


@torch.no_grad()
def _latent_scale(model: AutoencoderKL, recipe) -> float:
    """1 / std of posterior samples of the training images, drawn as the trainer's export draws them (the same
    images, batches and noise), here in fp32 where training ran under bf16 autocast (3e-4 apart)."""
    records, _ = split_holdout(scan_folder(recipe.data.root).records, recipe.data.holdout, recipe.seed)
    data = ImageDataset(records, recipe.data.resolution, recipe.seed, recipe.data.random_crop, recipe.data.random_flip,
                        crop_size=recipe.data.crop_size)
    count = min(len(data), SCALE_ESTIMATE_IMAGES)
    latents = []
    for start in range(0, count, EVAL_BATCH):
        images = collate([data[(i, 0)] for i in range(start, min(start + EVAL_BATCH, count))])["pixel_values"]
        posterior = model.encode(images).latent_dist
        latents.append(posterior.sample(generator=torch.Generator().manual_seed(start)))
    return 1.0 / torch.cat(latents).flatten().std().item()


def _dominant_colour(images: np.ndarray) -> list[str]:
    """The colour channel that dominates the lit pixels of each (N, H, W, 3) image in [0, 1]."""
    out = []
    for image in images:
        lit = image[image.max(-1) > 0.25]
        r, g, b = lit.mean(0) if len(lit) else (0, 0, 0)
        out.append("red" if r > g + 0.15 and r > b + 0.15 else "blue" if b > r + 0.15 and b > g + 0.15 else "other")
    return out


def test_the_autoencoder_reconstructs(trained):
    tmp, ae_dir, _ = trained
    log = metrics(tmp / "ae")
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert log[-1]["psnr_heldout"] > 14, log[-1]
    assert [r["unreadable_images"] for r in log if "loss" in r][-1] == 1  # broken.png, counted once
    model = AutoencoderKL.from_pretrained(ae_dir)
    # Measured from the latents, not the default 0.18215: 1 / std of the training images' latents.
    assert model.config.scaling_factor == pytest.approx(_latent_scale(model, _autoencoder_recipe(tmp)), rel=5e-3)
    assert model.config.scaling_factor != pytest.approx(0.18215, rel=0.1)
    assert (tmp / "ae" / "loss.png").is_file() and list((tmp / "ae" / "samples").glob("*.png"))


def test_text_ldm_learned_the_colours(trained):
    tmp, _, folder = trained
    losses = [r["loss"] for r in metrics(tmp / "ldm") if "loss" in r]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
    assert max(r.get("unreadable_images", 0) for r in metrics(tmp / "ldm")) == 1  # broken.png, skipped

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.bert.config.max_position_embeddings == 77
    prompts = ["a red square"] * 4 + ["a blue circle"] * 4
    images = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, output_type="np",
                  generator=[torch.Generator().manual_seed(i) for i in range(8)]).images
    colours = _dominant_colour(images)
    assert colours[:4].count("red") >= 3 and colours[4:].count("blue") >= 3, colours


def test_diffusers_loads_and_runs_the_export(trained):
    import diffusers

    _, _, folder = trained
    theirs = diffusers.LDMTextToImagePipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a blue circle"]
    a = theirs(prompts, latents=latents.clone(), num_inference_steps=20, guidance_scale=3.0, output_type="np").images
    b = ours(prompts, latents=latents.clone(), num_inference_steps=20, guidance_scale=3.0, output_type="np").images
    assert a.shape == (2, 16, 16, 3) and np.abs(a - b).max() < 1e-4
    assert _dominant_colour(a) == ["red", "blue"]
