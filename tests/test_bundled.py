"""The bundled emoji models: offline loading by name, determinism, parity with diffusers, and quality.

These use the real shipped weights (src/ldmkit/bundled/), so they also catch a broken or missing package-data
file. The retrieval check renders the emoji gallery and so needs the Noto Color Emoji font (skips without it).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import DiffusionPipeline
from ldmkit.cli import main, read_png_metadata
from ldmkit.datasets import emoji as ed
from ldmkit.errors import LDMKitError
from ldmkit.loading.bundled import BUNDLED, DEFAULT_SUPERRES, DEFAULT_TEXT2IMG, bundled_folder
from ldmkit.loading.hub import looks_like_hub_id
from ldmkit.training.metrics import retrieval_ranks

# A caption of the training set that the model draws recognisably (checked against all 3,789 emoji).
RETRIEVAL_PROMPT = "red apple"
RETRIEVAL_SEED = 0


@pytest.fixture(scope="module")
def text2img():
    pipe = DiffusionPipeline.from_pretrained(DEFAULT_TEXT2IMG)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def superres():
    pipe = DiffusionPipeline.from_pretrained(DEFAULT_SUPERRES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, seed, steps=10):
    return pipe([prompt], num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_names_cannot_be_hub_ids_and_unknown_names_are_clear():
    for key in BUNDLED:
        assert not looks_like_hub_id("ldmkit:" + key)
        assert (bundled_folder("ldmkit:" + key) / "model_index.json").is_file()
    with pytest.raises(LDMKitError, match="ldmkit:emoji-text2img"):
        DiffusionPipeline.from_pretrained("ldmkit:emoji")


def test_shipped_weights_are_small_fp16_safetensors():
    files = [p for key in BUNDLED for p in bundled_folder("ldmkit:" + key).rglob("*") if p.is_file()]
    first = ("emoji-text2img", "emoji-superres-4x")
    size = {k: sum(p.stat().st_size for p in bundled_folder("ldmkit:" + k).rglob("*") if p.is_file()) for k in BUNDLED}
    assert sum(size[k] for k in first) <= 40 * 2**20
    assert sum(v for k, v in size.items() if k not in first) <= 25e6  # issue 14: the three later ones, 25 MB
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]
    from safetensors import safe_open

    for path in weights:
        with safe_open(path, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), path


def test_text2img_offline_shapes_and_determinism(no_network):
    pipe = DiffusionPipeline.from_pretrained(DEFAULT_TEXT2IMG)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LDMTextToImagePipeline"
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, fp32 in memory unless asked
    a = generate(pipe, "grinning face", 1)
    b = generate(pipe, "grinning face", 1)
    c = generate(pipe, "grinning face", 2)
    assert a.shape == (1, 32, 32, 3)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_superres_offline_shapes_and_determinism(no_network):
    pipe = DiffusionPipeline.from_pretrained(DEFAULT_SUPERRES)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LDMSuperResolutionPipeline"
    small = PIL.Image.new("RGB", (32, 24), (220, 40, 40))
    outs = [pipe(small, num_inference_steps=5, eta=1.0, generator=torch.Generator().manual_seed(s),
                 output_type="np").images for s in (0, 0, 1)]
    assert outs[0].shape == (1, 96, 128, 3)
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_diffusers_loads_the_bundled_text2img_folder_and_agrees(text2img):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LDMTextToImagePipeline.from_pretrained(str(bundled_folder(DEFAULT_TEXT2IMG)),
                                                          torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = generate(text2img, "thumbs up", 5, steps=8)
    # diffusers 0.42.1 makes latents of height // 8 whatever the autoencoder's factor; this one is f=4, so
    # asking diffusers for 64x64 gives the 8x8 latents (and the 32x32 image) that ldmkit makes by default.
    theirs = ref(["thumbs up"], num_inference_steps=8, guidance_scale=3.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(5), output_type="np").images
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-4


def test_diffusers_loads_the_bundled_superres_folder_and_agrees(superres):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LDMSuperResolutionPipeline.from_pretrained(str(bundled_folder(DEFAULT_SUPERRES)),
                                                               torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    small = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ours = superres(small, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(3),
                    output_type="np").images
    theirs = ref(small, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(3),
                 output_type="np").images
    assert theirs.shape == ours.shape == (1, 128, 128, 3)
    assert np.abs(theirs - ours).max() <= 1e-4


@pytest.fixture(scope="module")
def emoji_gallery(tmp_path_factory):
    """Every emoji at 32x32 (the training data's size), rendered by ``ldmkit data emoji``."""
    for module in ("emoji", "fontTools"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install 'ldmkit[data]'")
    try:
        ed.find_font()
    except LDMKitError:
        pytest.skip("Noto Color Emoji is not installed: apt-get install fonts-noto-color-emoji")
    out = tmp_path_factory.mktemp("emoji") / "emoji-32"
    assert main(["data", "emoji", "--size", "32", "--out", str(out)]) == 0
    import json

    rows = []
    for split in ("train", "test"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append((row["text"], out / split / row["file_name"]))
    images = np.stack([np.asarray(PIL.Image.open(p).convert("RGB"), dtype=np.float32) / 255 for _, p in rows])
    return [c for c, _ in rows], torch.from_numpy(images).permute(0, 3, 1, 2)


def test_a_fixed_prompt_lands_nearest_its_own_emoji(text2img, emoji_gallery):
    captions, gallery = emoji_gallery
    assert len(captions) > 3000
    image = text2img([RETRIEVAL_PROMPT], num_inference_steps=50, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(RETRIEVAL_SEED)).images[0]
    generated = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    rank = retrieval_ranks(generated, gallery, torch.tensor([captions.index(RETRIEVAL_PROMPT)]))
    assert rank.item() == 1


def test_retrieval_ranks_count_strictly_nearer_images():
    gallery = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0, 0.5)])
    generated = torch.full((2, 3, 2, 2), 0.45)
    ranks = retrieval_ranks(generated, gallery, torch.tensor([1, 2]))
    assert ranks.tolist() == [1, 4]  # a tie (index 3) does not push index 1 down; 1.0 is the farthest
    with pytest.raises(ValueError, match="differ in size"):
        retrieval_ranks(generated[:, :, :1], gallery, torch.tensor([0, 0]))


def test_cli_defaults_to_the_bundled_models_and_chains_the_upscaler(capsys, tmp_path, no_network):
    code = main(["txt2img", "red apple", "--steps", "4", "--seed", "1", "--upscale", "--upscale-steps", "3",
                 "--quiet", "-o", str(tmp_path)])
    out = capsys.readouterr().out.split()
    assert code == 0 and len(out) == 1
    assert PIL.Image.open(out[0]).size == (128, 128)
    meta = read_png_metadata(out[0])
    assert meta["model"] == DEFAULT_TEXT2IMG and meta["upscale_model"] == DEFAULT_SUPERRES
    assert main(["txt2img", "--from-png", out[0], "--quiet", "-o", str(tmp_path)]) == 0
    again = capsys.readouterr().out.split()[0]
    assert again != out[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out[0])), np.asarray(PIL.Image.open(again)))


def test_cli_info_on_the_bundled_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "LDMTextToImagePipeline" in out and "ldmkit:emoji-text2img" in out
    assert "LDMBertModel" in out and "UNet2DConditionModel" in out and "M params" in out
    assert "stored F16" in out and "prediction_type=v_prediction" in out


def test_cli_upscale_defaults_to_the_bundled_upscaler(capsys, tmp_path, no_network):
    src = tmp_path / "small.png"
    PIL.Image.new("RGB", (16, 12), (30, 160, 40)).save(src)
    assert main(["upscale", str(src), "--steps", "2", "--quiet", "-o", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out.split()
    assert PIL.Image.open(out[0]).size == (64, 48)
    assert read_png_metadata(out[0])["model"] == DEFAULT_SUPERRES


# ------------------------------------------------------------------ the unconditional, class and inpainting models
def test_uncond_offline_deterministic_and_same_in_diffusers(no_network):
    import diffusers

    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-uncond")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LDMPipeline"

    def run(p, seed):
        return p(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(seed),
                 output_type="np").images

    a, b, c = run(pipe, 0), run(pipe, 0), run(pipe, 1)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b) and not np.allclose(a, c)
    ref = diffusers.LDMPipeline.from_pretrained(str(bundled_folder("ldmkit:emoji-uncond")), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    assert np.abs(run(ref, 0) - a).max() <= 1e-4


def test_class_model_names_its_classes_and_is_deterministic(no_network):
    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-class")
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.labels) == 45 and "animal-mammal" in pipe.labels and "country-flag" in pipe.labels

    def run(label, seed):
        return pipe([label], num_inference_steps=5, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images

    a = run("country-flag", 0)
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, run("country-flag", 0))
    assert np.array_equal(a, run(pipe.labels["country-flag"], 0)) and not np.allclose(a, run("heart", 0))


def test_inpaint_model_keeps_the_known_pixels(no_network):
    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-inpaint")
    pipe.set_progress_bar_config(disable=True)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16] = (220, 40, 40)
    image[:, 16:] = (40, 40, 220)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe(image=PIL.Image.fromarray(image), mask_image=PIL.Image.fromarray(mask), num_inference_steps=5,
               generator=torch.Generator().manual_seed(0)).images[0]
    out = np.asarray(out)
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - image[keep]).max() <= 1
    assert out.shape == (32, 32, 3)
