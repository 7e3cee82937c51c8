"""``ldmkit sample`` (unconditional and class-conditional) and ``ldmkit inpaint``, run in-process on tiny random
pipelines saved to folders, and the class names of LDMClassConditionalPipeline."""

from __future__ import annotations

import inspect
import json

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import (
    ClassEmbedder,
    DDIMScheduler,
    DiffusionPipeline,
    LDMClassConditionalPipeline,
    LDMInpaintPipeline,
    LDMKitError,
    LDMPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from ldmkit.cli import main, read_png_metadata
from ldmkit.configuration import FrozenDict
from ldmkit.hardware import auto_dtype

NAMES = ["animal-mammal", "food-fruit", "smileys"]  # class ids 0, 1, 2; 3 is the null class
# Until ClassEmbedder takes class_names (the training branch adds it), a saved folder cannot keep them.
STORES_NAMES = "class_names" in inspect.signature(ClassEmbedder.__init__).parameters
needs_names = pytest.mark.skipif(not STORES_NAMES, reason="ClassEmbedder has no class_names config key yet")
UNET2D = {"sample_size": 8, "out_channels": 3, "block_out_channels": (16, 32), "layers_per_block": 1,
          "norm_num_groups": 8, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
          "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8}


def _vq():
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 16, 32),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=64)


def _scheduler():
    return DDIMScheduler(beta_start=0.0015, beta_end=0.0205, beta_schedule="scaled_linear", clip_sample=False)


def _embedder(names=NAMES):
    embedder = ClassEmbedder(n_classes=4, embed_dim=32, **({"class_names": names} if STORES_NAMES else {}))
    if not STORES_NAMES:  # the config dict the constructor would make
        embedder._internal_config = FrozenDict({**embedder.config, "class_names": names})
    return embedder


def _class_pipe(names=NAMES):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    return LDMClassConditionalPipeline(vqvae=_vq(), class_embedder=_embedder(names), unet=unet,
                                       scheduler=_scheduler())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny saved pipelines: 32x32 images through a factor-4 VQ first stage."""
    root = tmp_path_factory.mktemp("cli-models")
    torch.manual_seed(0)
    LDMPipeline(vqvae=_vq(), unet=UNet2DModel(in_channels=3, **UNET2D), scheduler=_scheduler()).save_pretrained(
        root / "uncond")
    _class_pipe().save_pretrained(root / "class")
    _class_pipe(names=None).save_pretrained(root / "class-ids")
    torch.manual_seed(0)
    LDMInpaintPipeline(vqvae=_vq(), unet=UNet2DModel(in_channels=7, **UNET2D), scheduler=_scheduler()
                       ).save_pretrained(root / "inpaint")
    return {name: str(root / name) for name in ("uncond", "class", "class-ids", "inpaint")}


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    """A 32x32 RGB image with varied pixels and a mask of its centre, as files."""
    root = tmp_path_factory.mktemp("face")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(root / "face.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 10:26] = 255
    PIL.Image.fromarray(mask).save(root / "mask.png")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


FAST = ["--steps", "2", "--quiet"]


# ------------------------------------------------------------------------------------------ pipeline API
def test_labels_and_get_label_ids():
    pipe = _class_pipe()
    assert pipe.labels == {"animal-mammal": 0, "food-fruit": 1, "smileys": 2}
    assert pipe.get_label_ids("food-fruit") == [1]
    assert pipe.get_label_ids(["smileys", "Animal-Mammal"]) == [2, 0]  # case is ignored
    with pytest.raises(LDMKitError, match="did you mean 'food-fruit'"):
        pipe.get_label_ids("food-fruits")
    with pytest.raises(LDMKitError, match="class name or a list"):
        pipe.get_label_ids(3)
    kw = {"num_inference_steps": 2, "output_type": "np"}
    by_name = pipe(["smileys", 0], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    by_id = pipe([2, 0], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    assert np.array_equal(by_name, by_id)
    no_names = _class_pipe(names=None)
    assert no_names.labels == {}
    with pytest.raises(LDMKitError, match="stores no class names"):
        no_names.get_label_ids("smileys")
    with pytest.raises(LDMKitError, match="distinct non-empty names|duplicate"):
        _class_pipe(names=["a", "a", "b"]).get_label_ids("a")


# ------------------------------------------------------------------------------------------------ sample
def test_sample_unconditional_grid_and_replay(capsys, folders, tmp_path):
    code, out, _ = run(capsys, "sample", "--model", folders["uncond"], "--n", "3", "--seed", "5", "--grid", *FAST,
                       "-o", tmp_path)
    assert code == 0 and len(out) == 4 and out[-1].endswith("sample-grid.png")
    assert PIL.Image.open(out[-1]).size == (96, 32)  # three 32x32 images in a row
    meta = read_png_metadata(out[1])
    assert meta["command"] == "sample" and meta["seed"] == 6 and meta["class_id"] is None
    code, alone, _ = run(capsys, "sample", "--model", folders["uncond"], "--seed", "9", *FAST, "-o", tmp_path / "a")
    code, again, _ = run(capsys, "sample", "--from-png", alone[0], "-o", tmp_path / "a", "--quiet")
    assert code == 0 and again[0] != alone[0]  # a new name: nothing is overwritten
    assert np.array_equal(pixels(alone[0]), pixels(again[0]))
    code, forced, _ = run(capsys, "sample", "--from-png", alone[0], "-o", tmp_path / "a", "--quiet", "--force")
    assert forced[0] == alone[0]


def test_fast_preset_is_recorded_and_replayed(capsys, folders, tmp_path):
    argv = ["sample", "--model", folders["uncond"], "--seed", "2", *FAST]
    code, fast, _ = run(capsys, *argv, "--fast", "-o", tmp_path)
    meta = read_png_metadata(fast[0])
    assert code == 0 and meta["preset"] == "fast" and meta["steps"] == 2
    assert meta["dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[auto_dtype("cpu")]  # fast: auto
    code, exact, _ = run(capsys, *argv, "--exact", "-o", tmp_path / "exact")
    assert read_png_metadata(exact[0])["preset"] == "exact"
    assert not np.array_equal(pixels(fast[0]), pixels(exact[0]))  # another sampler: the preset was applied
    code, again, _ = run(capsys, "sample", "--from-png", fast[0], "-o", tmp_path, "--quiet")
    assert np.array_equal(pixels(fast[0]), pixels(again[0]))


@needs_names
def test_sample_classes_list_grid_and_replay(capsys, folders, tmp_path):
    code, out, _ = run(capsys, "sample", "--list-classes", "--model", folders["class"])
    assert code == 0 and out == ["0 animal-mammal", "1 food-fruit", "2 smileys"]
    code, out, _ = run(capsys, "sample", "--model", folders["class"], "--class", "smileys", "--class", "1",
                       "--n", "2", "--seed", "0", "--grid", *FAST, "-o", tmp_path)
    assert code == 0 and len(out) == 5 and out[-1].endswith("classes-grid.png")
    assert PIL.Image.open(out[-1]).size == (64, 64)  # a row per class, --n images in each
    assert [read_png_metadata(p)["class_id"] for p in out[:4]] == [2, 2, 1, 1]
    assert out[0].endswith("smileys-0.png") and read_png_metadata(out[2])["class_name"] == "food-fruit"
    assert read_png_metadata(out[0])["guidance"] == 3.0
    code, alone, _ = run(capsys, "sample", "--model", folders["class"], "--class", "Food-Fruit", "--seed", "4",
                         "--guidance", "2", *FAST, "-o", tmp_path / "a")
    code, again, _ = run(capsys, "sample", "--from-png", alone[0], "-o", tmp_path / "a", "--quiet")
    assert code == 0 and read_png_metadata(again[0])["guidance"] == 2.0
    assert np.array_equal(pixels(alone[0]), pixels(again[0]))
    code, other, _ = run(capsys, "sample", "--model", folders["class"], "--class", "0", "--seed", "4",
                         "--guidance", "2", *FAST, "-o", tmp_path / "b")
    assert not np.array_equal(pixels(alone[0]), pixels(other[0]))  # the class changes the image


def test_sample_class_ids_without_names(capsys, folders, tmp_path):
    code, out, _ = run(capsys, "sample", "--model", folders["class-ids"], "--class", "2", *FAST, "-o", tmp_path)
    assert code == 0 and out[0].split("/")[-1].startswith("class-2-") and read_png_metadata(out[0])["class_id"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--class", "smiley"], "did you mean 'smileys'? `ldmkit sample --list-classes` lists all 3"),
    (["--class", "zzzzqqq"], "no class name is close"),
    (["--class", "4"], "go from 0 to 3"),
    ([], "is class-conditional: give --class"),
])
@needs_names
def test_sample_class_errors(capsys, folders, tmp_path, argv, message):
    code, _, err = run(capsys, "sample", "--model", folders["class"], *argv, *FAST, "-o", tmp_path)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("model, argv, message", [
    ("uncond", ["--class", "smileys"], "--class needs a class-conditional model"),
    ("uncond", ["--guidance", "2"], "--guidance needs a class-conditional model"),
    ("uncond", ["--list-classes"], "not a class-conditional pipeline: it has no classes"),
    ("class-ids", ["--class", "smileys"], "stores no class names"),
    ("class-ids", ["--list-classes"], "its classes are the ids 0 to 2"),
    ("inpaint", [], "use `ldmkit inpaint` with it"),
    ("uncond", ["--n", "0"], "at least one image"),
])
def test_sample_user_errors(capsys, folders, tmp_path, model, argv, message):
    code, _, err = run(capsys, "sample", "--model", folders[model], *argv, *FAST, "-o", tmp_path)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_sample_replay_refuses_grids_and_other_commands(capsys, folders, face, tmp_path):
    code, out, _ = run(capsys, "sample", "--model", folders["uncond"], "--n", "2", "--grid", *FAST, "-o", tmp_path)
    code, _, err = run(capsys, "sample", "--from-png", out[-1], "-o", tmp_path)
    assert code == 2 and len(err) == 1 and "is a grid" in err[0]
    code, _, err = run(capsys, "inpaint", "--from-png", out[0], "-o", tmp_path)
    assert code == 2 and len(err) == 1 and "replay it with `ldmkit sample --from-png" in err[0]


@pytest.mark.parametrize("argv, model", [
    (["sample"], "ldmkit:emoji-uncond"),
    (["sample", "--class", "smileys"], "ldmkit:emoji-class"),
    (["sample", "--list-classes"], "ldmkit:emoji-class"),
    (["inpaint", "IMAGE", "--box", "0,0,8,8"], "ldmkit:emoji-inpaint"),
])
def test_defaults_are_the_bundled_models(capsys, monkeypatch, face, tmp_path, argv, model):
    asked = []

    def refuse(name, *args, **kwargs):  # stands in for loading: records which model would be loaded
        asked.append(name)
        raise LDMKitError("stop")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(refuse))
    code, _, _ = run(capsys, *[face / "face.png" if a == "IMAGE" else a for a in argv], "-o", tmp_path)
    assert code == 2 and asked == [model]


# ----------------------------------------------------------------------------------------------- inpaint
def test_inpaint_keeps_the_outside_exactly_and_replays(capsys, folders, face, tmp_path):
    original = pixels(face / "face.png")
    hole = pixels(face / "mask.png")[..., 0] > 127
    code, out, _ = run(capsys, "inpaint", face / "face.png", "--mask", face / "mask.png", "--model",
                       folders["inpaint"], "--n", "2", "--seed", "3", "--grid", *FAST, "-o", tmp_path)
    assert code == 0 and len(out) == 3 and out[0].endswith("face-inpaint-3.png")
    for path in out[:2]:
        result = pixels(path)
        assert np.array_equal(result[~hole], original[~hole])  # exactly the input outside the mask
        assert not np.array_equal(result[hole], original[hole])  # and repainted inside it
    assert PIL.Image.open(out[2]).size == (96, 32)  # the masked input, then the two results
    code, alone, _ = run(capsys, "inpaint", face / "face.png", "--box", "4,4,12,20", "--model", folders["inpaint"],
                         "--seed", "1", *FAST, "-o", tmp_path / "a")
    result = pixels(alone[0])
    box = np.zeros((32, 32), dtype=bool)
    box[4:20, 4:12] = True
    assert np.array_equal(result[~box], original[~box]) and not np.array_equal(result[box], original[box])
    assert read_png_metadata(alone[0])["box"] == "4,4,12,20"
    code, again, _ = run(capsys, "inpaint", "--from-png", alone[0], "-o", tmp_path / "a", "--quiet")
    assert code == 0 and again[0] != alone[0] and np.array_equal(result, pixels(again[0]))


def test_inpaint_replay_refuses_a_changed_source(capsys, folders, face, tmp_path):
    src = tmp_path / "src.png"
    PIL.Image.open(face / "face.png").save(src)
    code, out, _ = run(capsys, "inpaint", src, "--box", "0,0,8,8", "--model", folders["inpaint"], *FAST,
                       "-o", tmp_path)
    PIL.Image.new("RGB", (32, 32), (9, 9, 9)).save(src)
    code, _, err = run(capsys, "inpaint", "--from-png", out[0], "-o", tmp_path)
    assert code == 2 and len(err) == 1 and "changed since" in err[0]


def _save(path, array):
    PIL.Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--mask", "big"], "is 40x32 but"),
    (["--mask", "black"], "nothing to inpaint"),
    (["--mask", "white"], "nothing of it is kept; for a new image use `ldmkit sample`"),
    (["--box", "0,0,32,32"], "nothing of it is kept"),
    (["--box", "8,8,40,24"], "reaches outside the 32x32 image"),
    (["--box", "8,8,8,24"], "x0 < x1 and y0 < y1"),
    (["--box", "8,8,24"], "four integer pixel coordinates"),
    (["--box=-1,0,8,8"], "reaches outside"),
    ([], "give --mask FILE"),
    (["--box", "0,0,8,8", "--prompt", "a cat"], "is not text-conditioned"),
    (["--box", "0,0,8,8", "--model", "uncond"], "use `ldmkit sample` with it"),
])
def test_inpaint_user_errors(capsys, folders, face, tmp_path, args, message):
    masks = {"big": _save(tmp_path / "big.png", np.full((32, 40), 255, np.uint8)),
             "black": _save(tmp_path / "black.png", np.zeros((32, 32), np.uint8)),
             "white": _save(tmp_path / "white.png", np.full((32, 32), 255, np.uint8)), "uncond": folders["uncond"]}
    argv = [masks.get(a, a) for a in args]
    model = [] if "--model" in args else ["--model", folders["inpaint"]]
    code, _, err = run(capsys, "inpaint", face / "face.png", *argv, *model, *FAST, "-o", tmp_path / "o")
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_inpaint_needs_an_image(capsys):
    code, _, err = run(capsys, "inpaint", "--box", "1,1,2,2")
    assert code == 2 and len(err) == 1 and "give an image" in err[0]


@needs_names
def test_saved_class_names_survive_loading(folders):
    config = json.loads(open(folders["class"] + "/class_embedder/config.json", encoding="utf-8").read())
    assert config["class_names"] == NAMES
    assert DiffusionPipeline.from_pretrained(folders["class"]).labels == {name: i for i, name in enumerate(NAMES)}
