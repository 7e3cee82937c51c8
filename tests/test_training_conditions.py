"""Class-conditional and inpainting LDM training on toy shapes (labels: the colour), on a VQ first stage
trained here for a few seconds. Learning is judged in its latent space (cheaper than a decoder good enough to
judge pixels): a class sample must land nearest to the mean latent of its own class; inside an inpainting
hole the UNet's estimate must be far closer to the truth with the image's own context than with another's.
The exports load with ldmkit's ``from_pretrained`` (diffusers has neither pipeline for these layouts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldmkit import ClassEmbedder, DiffusionPipeline, LDMKitError, VQModel
from ldmkit.training import build_recipe, train_autoencoder, train_ldm
from ldmkit.training.data import ImageDataset, collate, scan_folder
from ldmkit.training.masks import box_mask, random_mask, seeded_masks, step_masks
from ldmkit.training.recipe import MaskConfig
from ldmkit.training.step_random import StepRandom
from training_utils import TRAIN_FAST, final_weights, ldm_dict, toy_data

# Training tests run on one torch thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """16 toy shapes with a ``label`` column (the colour: 4 classes), and a VQ f=4 trained on them briefly."""
    tmp = tmp_path_factory.mktemp("cond")
    data = toy_data(tmp / "toy", size=16, variants=2)
    ae = train_autoencoder(build_recipe("autoencoder", {
        "output_dir": str(tmp / "vq"), "data": {"root": str(data), "resolution": 16, "num_workers": 0},
        "model": {"type": "vq", "block_out_channels": [16, 16, 16], "layers_per_block": 1, "latent_channels": 3,
                  "norm_num_groups": 4, "num_vq_embeddings": 64, "mid_block_add_attention": False},
        "train": {"max_steps": 200, "batch_size": 8, "lr": 3e-3, "mixed_precision": "no", **TRAIN_FAST,
                  "ema": {"enabled": False}}}))
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["label"] = row["text"].split()[1]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, data, _standardised(ae, data)


@torch.no_grad()
def _standardised(folder, data):
    """Rescale the encoder's last 1x1 conv so that the toy latents have zero mean and unit std per channel,
    as a long-trained first stage's roughly have (this short run's are ~0.3 wide, too faint to learn from in
    a few hundred steps)."""
    model = VQModel.from_pretrained(folder)
    latents = _training_latents(model, data)[0]
    mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
    model.quant_conv.weight.div_(std[:, None, None, None])
    model.quant_conv.bias.sub_(mean).div_(std)
    model.save_pretrained(folder)
    return folder


def _recipe(toy, conditioning, steps, out=None, **extra):
    tmp, data, ae = toy
    d = ldm_dict(data, ae, out or tmp / conditioning, conditioning=conditioning, max_steps=steps, batch_size=16,
                 lr=2e-3, warmup_steps=20, lr_schedule="constant", log_every=50)
    d["data"].update(label_column="label", random_flip=False)
    d["unet"] = {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_levels": [False, True],
                 "num_attention_heads": 2, "attention_head_dim": 16, "norm_num_groups": 8}
    d["classes"] = {"embed_dim": 32, "class_dropout": 0.2}
    d["diffusion"] = {"prediction_type": "v_prediction"}
    d["train"]["ema"] = {"decay": 0.99}
    for key, value in extra.items():
        if isinstance(value, dict):
            d[key].update(value)
        else:
            d[key] = value
    return build_recipe("ldm", d)


@torch.no_grad()
def _training_latents(vqvae, data):
    folder = scan_folder(data, label_column="label")
    batch = collate([ImageDataset(folder.records, 16, 0, False, False)[i] for i in range(len(folder.records))])
    return vqvae.encode(batch["pixel_values"]).latents, batch["label"], batch["pixel_values"]


def test_class_ldm_learns_the_labels(toy):
    _, data, _ = toy
    pipe = DiffusionPipeline.from_pretrained(train_ldm(_recipe(toy, "class", 300)))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LDMClassConditionalPipeline"
    names = pipe.class_embedder.config.class_names
    assert names == ["blue", "green", "red", "yellow"] and pipe.class_embedder.config.n_classes == 5
    latents, labels, _ = _training_latents(pipe.vqvae, data)
    centroids = torch.stack([latents[labels == c].mean(0) for c in range(4)]).flatten(1)
    asked = [c for c in range(4) for _ in range(6)]
    out = pipe(asked, num_inference_steps=20, guidance_scale=3.0, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(len(asked))]).images
    found = torch.cdist(out.flatten(1), centroids).argmin(1).tolist()
    accuracy = np.mean([a == f for a, f in zip(asked, found)])
    assert accuracy >= 0.75, (asked, found)


def _hole_error(pipe, latents, condition, hole) -> float:
    """Mean squared error inside the hole of the z_0 the UNet estimates from pure noise (t > 900)."""
    alphas, errors = pipe.scheduler.alphas_cumprod, []
    for t in (901, 951, 991):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            v = pipe.unet(torch.cat([noise, condition], 1), t).sample
        estimate = alphas[t].sqrt() * noise - (1 - alphas[t]).sqrt() * v  # z_0 from a v-prediction
        errors.append((estimate - latents).pow(2)[hole.expand_as(latents)].mean().item())
    return float(np.mean(errors))


def test_inpaint_ldm_fills_the_hole_from_the_context(toy):
    """The denoiser's estimate of z_0 from pure noise (t > 900, where z_t tells nothing) and the condition:
    inside the hole it must be far closer to the truth with the image's own masked latent than with another
    colour's, so it reads the colour from around the hole."""
    _, data, _ = toy
    pipe = DiffusionPipeline.from_pretrained(train_ldm(_recipe(toy, "inpaint", 250)))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LDMInpaintPipeline" and pipe.unet.config.in_channels == 3 + 3 + 1
    latents, _, pixels = _training_latents(pipe.vqvae, data)
    images = (pixels + 1) / 2
    mask = torch.zeros(len(images), 1, 16, 16)
    mask[..., 4:12, 0:8] = 1  # the left half of the middle rows is to be repainted
    _, _, condition = pipe.prepare_inputs(images, mask)
    hole = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    hole[..., 1:3, 0:2] = True  # the mask at latent size
    # The same estimate with another colour's condition (rolled by 4 images: the next colour) is far worse.
    # (0.18 against 0.69 when written.)
    shuffled = condition.roll(4, dims=0)
    right, wrong = _hole_error(pipe, latents, condition, hole), _hole_error(pipe, latents, shuffled, hole)
    assert right < 0.5 * wrong, (right, wrong)
    composite = pipe(images[:2], mask[:2], num_inference_steps=2, output_type="pt").images
    assert torch.equal(composite * (1 - mask[:2]), images[:2] * (1 - mask[:2]))  # outside the hole: the input


def test_masks_are_seeded_by_step_and_row_only():
    cfg = MaskConfig()
    whole = step_masks(StepRandom(3, 7, 8), torch.arange(8), 32, cfg)
    half = step_masks(StepRandom(3, 7, 8), torch.arange(4, 8), 32, cfg)  # another process's rows
    assert torch.equal(whole[4:], half)
    assert not torch.equal(whole, step_masks(StepRandom(3, 8, 8), torch.arange(8), 32, cfg))
    assert set(whole.unique().tolist()) <= {0.0, 1.0} and whole.shape == (8, 1, 32, 32)
    many = seeded_masks(0, 200, 32).mean((1, 2, 3))
    assert 0.15 < many.mean() < 0.45 and (many > 0).all()  # LaMa's thick masks: about a third of the image
    boxes = np.stack([box_mask(np.random.default_rng(i), 32) for i in range(50)])
    assert boxes[:, :1].sum() == 0 and boxes[:, :, -1:].sum() == 0  # boxes keep LaMa's margin
    rng = np.random.default_rng(0)
    assert not random_mask(rng, 32, MaskConfig(box_probability=0.0)).all()


def test_class_and_inpaint_recipes_are_checked(toy, tmp_path):
    tmp, data, ae = toy
    unlabelled = toy_data(tmp_path / "plain", size=16, variants=1)
    d = ldm_dict(unlabelled, ae, tmp_path / "out", conditioning="class")
    d["data"]["label_column"] = "label"
    with pytest.raises(LDMKitError, match="no label column 'label'.*data.label_column"):
        train_ldm(build_recipe("ldm", d))
    del d["data"]["label_column"]
    with pytest.raises(LDMKitError, match="have no class label.*sub-folder"):
        train_ldm(build_recipe("ldm", d))
    with pytest.raises(LDMKitError, match="'purple' is not a class.*blue, green, red, yellow"):
        # a folder of its own: a fresh run where another run's checkpoints are is refused
        train_ldm(_recipe(toy, "class", 1, out=tmp_path / "purple", sampling={"classes": ["purple"]}))
    with pytest.raises(LDMKitError, match="latent_cache cannot serve inpainting"):
        _recipe(toy, "inpaint", 1, data={"latent_cache": True})
    with pytest.raises(LDMKitError, match="class_dropout must be in"):
        _recipe(toy, "class", 1, classes={"class_dropout": 1.0})
    with pytest.raises(LDMKitError, match="class_names has 2 names but n_classes=5"):
        ClassEmbedder(n_classes=5, embed_dim=4, class_names=["a", "b"])


def test_emoji_recipes_fit_the_bundle_budget():
    """The three bundled models share 25 MB in fp16 (issue 14), each folder with its own copy of the small VQ
    autoencoder (about 0.93 M parameters, recipes/emoji-vq32-autoencoder.yaml): the three UNets together hold
    at most (25 MB / 2 bytes) - 3 x 0.93 M parameters, on the 8x8x4 latents."""
    from pathlib import Path

    from ldmkit.training import load_recipe
    from ldmkit.training.ldm import build_unet

    total = 0
    for name, channels in [("emoji-uncond", 4), ("emoji-class", 4), ("emoji-inpaint", 4 + 4 + 1)]:
        recipe = load_recipe("ldm", Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
        assert recipe.autoencoder == "runs/emoji-vq32-autoencoder/final" and not recipe.data.random_flip
        unet = build_unet(recipe, channels=4, size=8)
        assert unet.config.in_channels == channels
        total += sum(p.numel() for p in unet.parameters())
    assert total <= 25e6 / 2 - 3 * 0.93e6


def test_init_from_fine_tunes_a_saved_pipeline(toy, tmp_path):
    """``init_from`` starts the denoiser from an exported pipeline (here with a learning rate too small to move
    it), and ``autoencoder:`` may name that pipeline instead of its vqvae/ folder; a recipe that builds another
    network, or a folder that is not a pipeline, is refused with the fix."""
    source = train_ldm(_recipe(toy, "inpaint", 6, out=tmp_path / "source", seed=1))  # other initial weights
    tiny = {"lr": 1e-9, "warmup_steps": 0, "ema": {"enabled": False}}
    tuned = train_ldm(_recipe(toy, "inpaint", 1, out=tmp_path / "tuned", init_from=str(source),
                              autoencoder=str(source), train=tiny))
    fresh = train_ldm(_recipe(toy, "inpaint", 1, out=tmp_path / "fresh", train=tiny))
    before, after, scratch = (final_weights(f / "unet") for f in (source, tuned, fresh))
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-6
    assert max((scratch[k] - before[k]).abs().max().item() for k in before) > 1e-2
    wider = _recipe(toy, "inpaint", 1, out=tmp_path / "wider", init_from=str(source),
                    unet={"block_out_channels": [48, 48]})
    with pytest.raises(LDMKitError, match=r"differs from the network.*block_out_channels: saved \[32, 32\], "
                                          r"recipe \[48, 48\].*Make the recipe match"):
        train_ldm(wider)
    with pytest.raises(LDMKitError, match="not a saved pipeline folder.*bundled name"):
        train_ldm(_recipe(toy, "inpaint", 1, out=tmp_path / "bad", init_from=str(source / "unet")))
