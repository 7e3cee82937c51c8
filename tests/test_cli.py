"""The ldmkit command line, run in-process on the tiny pipelines."""

from __future__ import annotations

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import DiffusionPipeline
from ldmkit.cli import main, read_png_metadata


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def test_txt2img_metadata_round_trip_and_no_overwrite(capsys, tiny_text2img_dir, tmp_path):
    # --exact: the batch-vs-alone bound below is float32's (the --fast replay: tests/test_cli_presets.py)
    base = ["txt2img", "a red square", "--model", tiny_text2img_dir, "--steps", "2", "--seed", "3", "--quiet",
            "--eta", "0.5", "--exact", "-o", tmp_path]
    code, out, _ = run(capsys, *base, "--n", "2", "--grid")
    assert code == 0 and len(out) == 3  # two images and the grid
    first = out[0]
    meta = read_png_metadata(first)
    assert meta["prompt"] == "a red square" and meta["seed"] == 3 and meta["steps"] == 2
    assert "ldmkit_version" in meta
    code, again, _ = run(capsys, "txt2img", "--from-png", first, "-o", tmp_path, "--quiet")
    assert code == 0 and again[0] != first  # a new name: nothing is overwritten
    a, b = (np.asarray(PIL.Image.open(p), dtype=np.int16) for p in (first, again[0]))
    # The first image was made in a batch of 2 and replayed alone: CPU kernels block a batch differently, so the
    # floats differ by ~1e-6 and a rare pixel may round to the next 8-bit level; never more than that.
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    code, single, _ = run(capsys, *base[:-2], "-o", tmp_path / "single")
    code, replay, _ = run(capsys, "txt2img", "--from-png", single[0], "-o", tmp_path / "single", "--quiet")
    a, b = (np.asarray(PIL.Image.open(p)) for p in (single[0], replay[0]))
    assert np.array_equal(a, b)  # made alone, replayed alone: the same pixels
    code, forced, _ = run(capsys, *base, "--force")
    assert code == 0 and forced[0] == first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "/no/such/folder"], "No folder"),
        (["txt2img", "a cat", "--model", "ldmkit:no-such-model"], "not a bundled model"),
        (["txt2img", "--model", "x"], "give a prompt"),
        (["txt2img", "a cat", "--model", "/no/such/folder"], "No folder"),
        (["info", "/no/such/folder"], "No folder"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code != 0 and len(err) == 1 and message in err[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_gpu_is_one_line(capsys):
    code, _, err = run(capsys, "txt2img", "a cat", "--device", "cuda")
    assert code == 2 and len(err) == 1 and "no CUDA GPU" in err[0]


def test_bad_sizes_are_one_line(capsys, tiny_text2img_dir, tmp_path):
    code, _, err = run(capsys, "txt2img", "a cat", "--model", tiny_text2img_dir, "--height", "60", "-o", tmp_path,
                       "--quiet")
    assert code == 2 and len(err) == 1 and "multiples of 8" in err[0]


def test_upscale_and_missing_image(capsys, tiny_superres_dir, tmp_path):
    src = tmp_path / "small.png"
    PIL.Image.new("RGB", (9, 7), (200, 30, 30)).save(src)
    code, out, _ = run(capsys, "upscale", src, "--model", tiny_superres_dir, "--steps", "2", "-o", tmp_path / "o",
                       "--quiet")
    assert code == 0 and PIL.Image.open(out[0]).size == (36, 28)
    code, _, err = run(capsys, "upscale", tmp_path / "nope.png", "--model", tiny_superres_dir, "--quiet")
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_sample_and_scheduler_choice(capsys, tiny_uncond_dir, tmp_path):
    code, out, _ = run(capsys, "sample", "--model", tiny_uncond_dir, "--n", "2", "--steps", "3", "--seed", "1",
                       "--scheduler", "dpm++2m", "-o", tmp_path, "--quiet")
    assert code == 0 and len(out) == 2
    assert read_png_metadata(out[1])["seed"] == 2 and read_png_metadata(out[1])["scheduler"] == "dpm++2m"


def test_info(capsys, tiny_text2img_dir):
    code, out, _ = run(capsys, "info", tiny_text2img_dir)
    assert code == 0 and out[0].startswith("LDMTextToImagePipeline")
    assert any("UNet2DConditionModel" in line and "M params" in line for line in out)
    assert any(line.strip().startswith("scheduler:") for line in out)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_quiet_silences_only_the_pipelines_it_loads(capsys, tiny_text2img_dir, tmp_path):
    argv = ["txt2img", "a red square", "--model", tiny_text2img_dir, "--steps", "2", "--seed", "0", "-o", tmp_path]
    code, _, err = run(capsys, *argv, "--quiet")
    assert code == 0 and not any("2/2" in line for line in err)
    code, _, err = run(capsys, *argv)
    assert code == 0 and any("2/2" in line for line in err)  # the CLI's own progress bar, without --quiet
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)  # no global was left set by --quiet
    pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert "2/2" in capsys.readouterr().err


def test_train_without_the_extra_names_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec reports a module set to None as missing
    code, _, err = run(capsys, "train", "ldm", "--config", tmp_path / "r.yaml")
    assert code == 2 and len(err) == 1 and "pip install 'ldmkit[train]'" in err[0]


def _png_with_text(path, text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("ldmkit", text)
    PIL.Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**70)], "--seed 1180591620717411303424 is out of range"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
])
def test_bad_numbers_are_one_line_before_any_work(capsys, tiny_text2img_dir, tmp_path, extra, message):
    code, _, err = run(capsys, "txt2img", "a cat", "--model", tiny_text2img_dir, "--steps", "1", "-o", tmp_path,
                       "--quiet", *extra)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not list(tmp_path.glob("*.png"))


def test_output_that_is_a_file_or_cannot_be_made_is_refused_before_the_work(capsys, tiny_text2img_dir, tmp_path,
                                                                             monkeypatch):
    target = tmp_path / "some_file"
    target.write_text("x")
    called = []
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: called.append(1)))
    code, _, err = run(capsys, "txt2img", "a cat", "--model", tiny_text2img_dir, "-o", target)
    assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
    code, _, err = run(capsys, "txt2img", "a cat", "--model", tiny_text2img_dir, "-o", target / "sub")
    assert code == 2 and len(err) == 1 and "cannot create the folder" in err[0]
    monkeypatch.setattr("ldmkit.cli.generate.os.access", lambda *a: False)  # root ignores mode bits: ask politely
    code, _, err = run(capsys, "upscale", target, "--model", tiny_text2img_dir, "-o", tmp_path / "ro")
    assert code == 2 and len(err) == 1 and "not writable" in err[0]
    assert not called  # no model was loaded for any of them


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"prompt": "a cat", "seed": "x"}', "metadata seed='x' should be int"),
    ('{"prompt": "a cat", "steps": true}', "metadata steps=True should be int"),
])
def test_damaged_png_metadata_is_one_line(capsys, tmp_path, text, message):
    png = _png_with_text(tmp_path / "edited.png", text)
    code, _, err = run(capsys, "txt2img", "--from-png", png, "-o", tmp_path)
    assert code == 2 and len(err) == 1 and message in err[0]
