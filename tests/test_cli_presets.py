"""--fast (the CLI's default) and --exact on the tiny pipelines: the metadata replays the same pixels, --exact is
the behaviour from before presets, and --steps / --scheduler / --dtype apply on top of a preset."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import DiffusionPipeline, hardware
from ldmkit.cli import main, read_png_metadata
from ldmkit.cli.generate import save_png
from ldmkit.pipelines.presets import PRESETS


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def pixels(path):
    return np.asarray(PIL.Image.open(path))


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Play a CPU with native bf16, so that --fast runs in bf16 on every test machine."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)


def test_fast_is_the_default_and_its_metadata_replays_the_same_pixels(capsys, tiny_text2img_dir, tmp_path,
                                                                      bf16_cpu, monkeypatch):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "5", "--quiet",
                       "-o", tmp_path)
    assert code == 0
    meta = read_png_metadata(out[0])
    fast = PRESETS["fast"]
    assert meta["preset"] == "fast" and meta["dtype"] == "bf16" and meta["scheduler"] == fast.sampler
    assert meta["steps"] == fast.num_inference_steps and meta["cache_interval"] == fast.cache_interval
    assert meta["cache_schedule"] == fast.cache_schedule and meta["guidance_interval"] == list(fast.guidance_interval)
    code, again, _ = run(capsys, "txt2img", "--from-png", out[0], "-o", tmp_path, "--quiet")
    assert code == 0 and again[0] != out[0]
    assert np.array_equal(pixels(out[0]), pixels(again[0]))
    # The replay restores what was recorded, not what this machine's "auto" would pick now.
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    code, third, _ = run(capsys, "txt2img", "--from-png", out[0], "-o", tmp_path, "--quiet")
    assert read_png_metadata(third[0])["dtype"] == "bf16" and np.array_equal(pixels(out[0]), pixels(third[0]))


def test_fast_replay_does_not_depend_on_the_presets_definition(capsys, tiny_text2img_dir, tmp_path, monkeypatch):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "2", "--steps", "6",
                       "--quiet", "-o", tmp_path)
    monkeypatch.setitem(PRESETS, "fast", replace(PRESETS["fast"], cache_interval=3, guidance_interval=None))
    code, again, _ = run(capsys, "txt2img", "--from-png", out[0], "-o", tmp_path, "--quiet")
    assert code == 0 and np.array_equal(pixels(out[0]), pixels(again[0]))
    code, changed, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "2", "--steps",
                           "6", "--quiet", "-o", tmp_path)
    assert not np.array_equal(pixels(out[0]), pixels(changed[0]))  # the preset's change does change a new run


def test_exact_is_the_model_in_float32_as_the_python_api_runs_it(capsys, tiny_text2img_dir, tmp_path, bf16_cpu):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "4", "--steps", "3",
                       "--exact", "--quiet", "-o", tmp_path)
    meta = read_png_metadata(out[0])
    assert meta["preset"] == "exact" and meta["dtype"] == "fp32" and meta["scheduler"] is None
    assert meta["cache_interval"] == 1 and meta["guidance_interval"] is None
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=3, guidance_scale=3.0, eta=0.0,
                 generator=[torch.Generator().manual_seed(4)]).images[0]
    assert np.array_equal(pixels(out[0]), np.asarray(image))


def test_steps_scheduler_and_dtype_apply_on_top_of_a_preset(capsys, tiny_text2img_dir, tmp_path, bf16_cpu):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "1", "--steps", "4",
                       "--scheduler", "ddim", "--dtype", "fp32", "--quiet", "-o", tmp_path / "fast")
    meta = read_png_metadata(out[0])
    assert (meta["preset"], meta["steps"], meta["scheduler"], meta["dtype"]) == ("fast", 4, "ddim", "fp32")
    assert meta["cache_interval"] == PRESETS["fast"].cache_interval  # the rest of the preset stays
    code, replay, _ = run(capsys, "txt2img", "--from-png", out[0], "-o", tmp_path / "fast", "--quiet")
    assert np.array_equal(pixels(out[0]), pixels(replay[0]))
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "1", "--steps", "2",
                       "--exact", "--dtype", "auto", "--quiet", "-o", tmp_path / "exact")
    meta = read_png_metadata(out[0])
    assert (meta["preset"], meta["dtype"], meta["cache_interval"], meta["scheduler"]) == ("exact", "bf16", 1, None)


def test_a_png_from_before_presets_replays_as_exact(capsys, tiny_text2img_dir, tmp_path):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "9", "--steps", "2",
                       "--exact", "--quiet", "-o", tmp_path)
    meta = read_png_metadata(out[0])
    old = {k: v for k, v in meta.items() if k not in ("preset", "dtype", "cache_interval", "cache_schedule",
                                                       "guidance_interval")}
    legacy = save_png(PIL.Image.open(out[0]).copy(), tmp_path / "legacy.png", old)
    code, again, _ = run(capsys, "txt2img", "--from-png", legacy, "-o", tmp_path, "--quiet")
    assert code == 0 and read_png_metadata(again[0])["preset"] == "exact"
    assert np.array_equal(pixels(out[0]), pixels(again[0]))


@pytest.mark.parametrize("edit, message", [
    ({"preset": "turbo"}, "unknown preset 'turbo'"),
    ({"dtype": "int8"}, "metadata dtype='int8' is not one of"),
    ({"dtype": {"unet": "fp64"}}, "metadata dtype={'unet': 'fp64'}"),
    ({"cache_interval": "2"}, "metadata cache_interval='2' should be int"),
])
def test_edited_preset_metadata_is_one_line(capsys, tmp_path, edit, message):
    png = tmp_path / "edited.png"
    save_png(PIL.Image.new("RGB", (4, 4)), png, {"prompt": "a cat", "steps": 2, **edit})
    code, _, err = run(capsys, "txt2img", "--from-png", png, "-o", tmp_path)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_upscale_and_sample_take_the_presets(capsys, tiny_superres_dir, tiny_uncond_dir, tmp_path, bf16_cpu):
    src = tmp_path / "small.png"
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(src)
    code, out, _ = run(capsys, "upscale", src, "--model", tiny_superres_dir, "--steps", "3", "-o", tmp_path / "u",
                       "--quiet")
    meta = read_png_metadata(out[0])
    assert code == 0 and (meta["preset"], meta["dtype"], meta["steps"]) == ("fast", "bf16", 3)
    code, out, _ = run(capsys, "upscale", src, "--model", tiny_superres_dir, "--exact", "-o", tmp_path / "e",
                       "--quiet")
    meta = read_png_metadata(out[0])
    assert (meta["preset"], meta["dtype"], meta["steps"], meta["scheduler"]) == ("exact", "fp32", 100, None)
    code, out, _ = run(capsys, "sample", "--model", tiny_uncond_dir, "--seed", "1", "-o", tmp_path / "s", "--quiet")
    meta = read_png_metadata(out[0])
    assert code == 0 and meta["steps"] == PRESETS["fast"].num_inference_steps and meta["dtype"] == "bf16"
    assert json.loads(json.dumps(meta)) == meta


def test_txt2img_upscale_records_and_replays_its_second_pass(capsys, tiny_text2img_dir, tiny_superres_dir, tmp_path,
                                                             bf16_cpu):
    code, out, _ = run(capsys, "txt2img", "a red square", "--model", tiny_text2img_dir, "--seed", "3", "--steps", "2",
                       "--upscale", "--upscale-model", tiny_superres_dir, "--upscale-steps", "2", "--quiet",
                       "-o", tmp_path)
    meta = read_png_metadata(out[0])
    assert code == 0 and (meta["upscale_steps"], meta["upscale_dtype"]) == (2, "bf16")
    assert meta["upscale_scheduler"] == PRESETS["fast"].sampler
    code, again, _ = run(capsys, "txt2img", "--from-png", out[0], "-o", tmp_path, "--quiet")
    assert code == 0 and np.array_equal(pixels(out[0]), pixels(again[0]))
