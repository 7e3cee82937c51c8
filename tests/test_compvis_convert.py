"""``ldmkit convert``: an original CompVis checkpoint written in the diffusers layout. The folder loads back in
ldmkit with the same images, and (text-to-image, super-resolution, unconditional) in diffusers too."""

from __future__ import annotations

import json

import pytest
import torch

from compvis_fixtures import (
    FAMILIES,
    SEED,
    assert_rel,
    call_pipeline,
    checkpoint,
    config,
    expected_images,
    model_call,
    prompts,
    reference,
    requires_fixtures,
    single_thread,
    write_vocab,
)
from ldmkit import DiffusionPipeline, LDMKitError
from ldmkit.cli import main

pytestmark = requires_fixtures
_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
PIPELINE_NAMES = {"txt2img": "LDMTextToImagePipeline", "superres": "LDMSuperResolutionPipeline",
                  "uncond": "LDMPipeline", "cin": "LDMClassConditionalPipeline", "inpainting": "LDMInpaintPipeline"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every family converted once with the command line."""
    root = tmp_path_factory.mktemp("converted")
    vocab = write_vocab(root / "bert-vocab")
    for family in FAMILIES:
        args = ["convert", str(checkpoint(family)), "--config", str(config(family)), "-o", str(root / family)]
        assert main(args + (["--tokenizer", str(vocab)] if family == "txt2img" else [])) == 0
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_folder_gives_the_reference_images(converted, family):
    index = json.loads((converted / family / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_NAMES[family]
    pipe = DiffusionPipeline.from_pretrained(converted / family)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == PIPELINE_NAMES[family]
    for run, eta in (("ddim_eta0", 0.0), ("ddim_eta1", 1.0)):
        assert_rel(call_pipeline(pipe, family, eta, output_type="pt").images, expected_images(family, run), run)


@pytest.mark.parametrize("family", ["txt2img", "superres", "uncond"])
def test_converted_folder_loads_in_diffusers(converted, family):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.DiffusionPipeline.from_pretrained(converted / family)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == PIPELINE_NAMES[family]
    ref = reference(family)
    assert_rel(model_call(pipe, family, ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0]),
               ref["ddim_eta0.first_model_out"], "diffusers UNet")
    with torch.no_grad():
        decoded = pipe.vqvae.decode(ref["ddim_eta0.samples"] / pipe.vqvae.config.scaling_factor).sample
    assert_rel(decoded, ref["ddim_eta0.decoded"], "diffusers decode")

    # The whole diffusers pipeline gives the same images as ldmkit's (eta 0: diffusers draws eta > 0 noise
    # from the global RNG).
    ours = DiffusionPipeline.from_pretrained(converted / family)
    ours.set_progress_bar_config(disable=True)
    if family == "txt2img":  # diffusers takes x_T: compare with the original's images directly
        images = pipe(prompts(ref["cond.token_ids"]), guidance_scale=3.0, num_inference_steps=5, eta=0.0,
                      latents=ref["x_T"], output_type="np").images
        assert_rel(torch.from_numpy(images).permute(0, 3, 1, 2), expected_images(family, "ddim_eta0"), "diffusers")
        return
    kwargs = {"num_inference_steps": 5, "eta": 0.0, "output_type": "np"}
    if family == "superres":
        theirs = pipe(ref["cond.lr_image"], generator=torch.Generator().manual_seed(SEED), **kwargs).images
        mine = ours(ref["cond.lr_image"], generator=torch.Generator().manual_seed(SEED), **kwargs).images
    else:
        theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(SEED), **kwargs).images
        mine = ours(batch_size=2, generator=torch.Generator().manual_seed(SEED), **kwargs).images
    assert_rel(torch.from_numpy(mine), torch.from_numpy(theirs), "ldmkit vs diffusers images")


def test_inpainting_unet_loads_in_diffusers(converted):
    """resblock_updown maps onto diffusers' ResnetDownsampleBlock2D / resnet down- and upsamplers."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel.from_pretrained(converted / "inpainting" / "unet")
    ref = reference("inpainting")
    with torch.no_grad():
        out = unet(torch.cat([ref["ddim_eta0.model_in_x"][0], ref["cond.c"]], 1), ref["ddim_eta0.model_in_t"][0])
    assert_rel(out.sample, ref["ddim_eta0.first_model_out"], "diffusers inpainting UNet")


def test_convert_with_and_without_ema(tmp_path):
    ref = reference("uncond")
    x, t = ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0]
    for flag, expected in (("--use-ema", "ddim_eta0.first_model_out"), ("--no-ema", "live_weights.first_model_out")):
        out = tmp_path / flag.strip("-")
        assert _convert(out, flag) == 0
        assert_rel(model_call(DiffusionPipeline.from_pretrained(out), "uncond", x, t), ref[expected], flag)


def _convert(out, *extra, family="uncond"):
    return main(["convert", str(checkpoint(family)), "--config", str(config(family)), "-o", str(out), *extra])


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_output_folder_rules(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _convert(out) == 2
    assert "not empty" in capsys.readouterr().err
    assert _convert(out, "--force") == 2  # --force replaces only a pipeline folder
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    assert _convert(out) == 0  # an empty folder is fine
    assert _convert(out) == 2
    assert _convert(out, "--force", family="superres") == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "LDMSuperResolutionPipeline"
    assert _leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    assert _convert(out, "--use-ema", family="superres") == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert not out.exists()

    def broken_save(self, folder, safe_serialization=True):
        (folder / "model_index.json").write_text("{}")
        raise LDMKitError("disk full")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", broken_save)
    assert _convert(out) == 2
    assert not out.exists()
    assert _leftovers(tmp_path) == []
