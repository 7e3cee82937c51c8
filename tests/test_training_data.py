"""Data: the imagefolder convention, bad input, corrupt images, SR inputs, the sampler and the latent cache."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import AutoencoderKL, LDMKitError
from ldmkit.training.data import ImageDataset, StepBatchSampler, collate, scan_folder, split_holdout
from ldmkit.training.degradations import degrade
from ldmkit.training.latent_cache import CachedLatentDataset, build_cache
from ldmkit.training.step_random import StepRandom
from training_utils import tiny_autoencoder, toy_data


def _image(path, colour=(200, 10, 10), size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path)


def test_captions_labels_and_templates(tmp_path):
    _image(tmp_path / "cats" / "a.png")
    _image(tmp_path / "dogs" / "b.jpg")
    _image(tmp_path / "dogs" / "c.png")
    (tmp_path / "dogs" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.jpg", "text": "a dog"}) + "\n")
    folder = scan_folder(tmp_path, caption_template="a photo of a {label}")
    assert folder.class_names == ["cats", "dogs"]
    got = [(r.path.name, r.caption, r.label) for r in folder.records]
    assert got == [("a.png", "a photo of a cats", 0), ("b.jpg", "a dog", 1), ("c.png", "a photo of a dogs", 1)]


def test_missing_captions_name_the_files_and_the_fix(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    with pytest.raises(LDMKitError, match=r"1 of 2 images .* no caption \(e.g. b.png\).*metadata.jsonl"):
        scan_folder(tmp_path, need_captions=True)
    assert scan_folder(tmp_path).records[1].caption is None  # fine without text conditioning


def test_empty_missing_and_malformed_folders(tmp_path):
    with pytest.raises(LDMKitError, match="is not a folder"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LDMKitError, match="holds no images"):
        scan_folder(tmp_path)
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{broken\n')
    with pytest.raises(LDMKitError, match=r"metadata.jsonl:2 is not valid JSON"):
        scan_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    with pytest.raises(LDMKitError, match="no caption column 'text'.*data.caption_column"):
        scan_folder(tmp_path)


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _image(tmp_path / "c.png", colour=(0, 0, 250))
    data = ImageDataset(scan_folder(tmp_path).records, resolution=8, seed=0)
    with caplog.at_level(logging.WARNING, logger="ldmkit.training"):
        item = data[(1, 0)]
    assert item["skipped"] == [1] and item["pixel_values"][2].mean() > 0.9  # c.png took b.png's place
    assert "Skipping unreadable image" in caplog.text and "b.png" in caplog.text
    assert collate([data[(0, 0)], data[(1, 0)]])["skipped"] == [1]


def test_crops_flips_and_sr_inputs(tmp_path):
    image = np.zeros((24, 40, 3), np.uint8)
    image[:, :20] = 255
    PIL.Image.fromarray(image).save(tmp_path / "a.png")
    records = scan_folder(tmp_path).records
    plain = ImageDataset(records, 16, seed=0, random_crop=False, random_flip=False, sr_scale=4)
    item = plain[(0, 0)]
    assert item["pixel_values"].shape == (3, 16, 16) and item["lowres"].shape == (3, 4, 4)
    assert item["pixel_values"].min() == -1 and item["pixel_values"].max() == 1
    flips = {ImageDataset(records, 16, seed=0, random_crop=True)[(0, e)]["pixel_values"][0, 0, 0].item()
             for e in range(12)}
    assert flips == {-1.0, 1.0}  # random flips and crops happen, and depend on the epoch
    crops = ImageDataset(records, 16, seed=0, random_crop=True, random_flip=False, crop_size=8)
    corners = {crops[(0, e)]["pixel_values"][0, 0, 0].item() for e in range(12)}
    assert crops[(0, 0)]["pixel_values"].shape == (3, 8, 8)
    assert min(corners) == -1.0 and max(corners) == 1.0  # crops of the resized image, from anywhere in it
    rng = np.random.default_rng(0)
    assert degrade(PIL.Image.new("RGB", (16, 16)), 4, "bsr", rng).size == (4, 4)
    a = np.asarray(degrade(PIL.Image.new("RGB", (16, 16), "red"), 4, "bsr", np.random.default_rng(3)))
    b = np.asarray(degrade(PIL.Image.new("RGB", (16, 16), "red"), 4, "bsr", np.random.default_rng(3)))
    assert (a == b).all()


def test_holdout_split_is_stable():
    train, held = split_holdout(list(range(20)), 0.25, seed=0)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert split_holdout(list(range(20)), 0.25, seed=0)[1] == held
    with pytest.raises(LDMKitError, match="leaving none to train on"):
        split_holdout([1, 2], 2, seed=0)


def test_sampler_is_layout_independent_and_resumable():
    one = StepBatchSampler(20, 8, 1, 1, 0, seed=3, start_step=0, max_steps=6)
    two = [StepBatchSampler(20, 8, 2, 2, r, seed=3, start_step=0, max_steps=6) for r in range(2)]
    for step in range(6):
        whole = one.keys(step, 0)
        parts = {int(row): key for s in two for m in range(2) for row, key in zip(s.rows(m), s.keys(step, m))}
        assert [parts[i] for i in range(8)] == whole
    resumed = list(StepBatchSampler(20, 8, 1, 1, 0, seed=3, start_step=4, max_steps=6))
    assert resumed == list(one)[4:]
    epochs = {key[1] for batch in one for key in batch}
    assert epochs == {0, 1, 2}  # 2 steps per epoch (20 // 8)
    with pytest.raises(LDMKitError, match="divisible by gradient_accumulation_steps x processes"):
        StepBatchSampler(20, 6, 2, 2, 0, 0, 0, 1)
    with pytest.raises(LDMKitError, match="fewer than train.batch_size"):
        StepBatchSampler(5, 8, 1, 1, 0, 0, 0, 1)


def test_step_random_rows_match_the_global_batch():
    whole = StepRandom(0, 5, 8).randn("noise", (2, 3), torch.arange(8))
    half = StepRandom(0, 5, 8).randn("noise", (2, 3), torch.arange(4, 8))
    assert torch.equal(whole[4:], half)
    assert not torch.equal(whole, StepRandom(0, 6, 8).randn("noise", (2, 3), torch.arange(8)))


class _Run(SimpleNamespace):
    def barrier(self):
        pass


def test_latent_cache_matches_the_encoder_and_is_reused(tmp_path):
    data = toy_data(tmp_path / "toy", size=16, variants=1)
    (data / "zz_broken.png").write_bytes(b"garbage")
    ae_dir = tiny_autoencoder(tmp_path / "ae", levels=3)
    ae = AutoencoderKL.from_pretrained(ae_dir)
    records = scan_folder(data).records
    run = _Run(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))  # 2 processes: distributed test
    folder = build_cache(run, ae, ae_dir, records, 16, True, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]
    cached = CachedLatentDataset(folder, records, seed=0, random_flip=False)
    images = ImageDataset(records, 16, seed=0, random_crop=False, random_flip=False)
    with torch.no_grad():
        expected = ae.encode(images[(2, 0)]["pixel_values"][None]).latent_dist.parameters[0]
    assert torch.allclose(cached[(2, 0)]["moments"], expected, atol=1e-5)
    broken = len(records) - 1
    assert cached[(broken, 0)]["skipped"] == [broken]  # the unreadable image falls through to the next one
    # Same weights and files: the same cache. New weights: a new key.
    assert build_cache(run, ae, ae_dir, records, 16, True, tmp_path / "cache") == folder
    tiny_autoencoder(tmp_path / "ae", levels=3, seed=1)
    assert build_cache(run, ae, ae_dir, records, 16, True, tmp_path / "cache") != folder
