"""Issue 16, item 6: saving as diffusers does (variant file names, sharded weights) and push_to_hub, side by
side with diffusers: the same files on disk, which both libraries load back to the same images; a push
that uploads one complete save_pretrained folder, and nothing at all when offline or without network."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError, UNet2DConditionModel
from ldmkit.loading.bundled import bundled_folder
from ldmkit.loading.weights import load_state_dict

BUNDLED = bundled_folder("ldmkit:emoji-text2img")
KW = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
MODELS = ("vqvae", "bert", "unet")


def _latents():
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))


def _weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name != "config.json" and p.is_file()}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny_pipes(tiny_text2img_dir):
    import diffusers

    theirs = diffusers.LDMTextToImagePipeline.from_pretrained(tiny_text2img_dir)
    theirs.set_progress_bar_config(disable=True)
    return DiffusionPipeline.from_pretrained(tiny_text2img_dir), theirs


@pytest.fixture(scope="module")
def bundled_unets():
    import diffusers

    return (UNet2DConditionModel.from_pretrained(BUNDLED, subfolder="unet"),
            diffusers.UNet2DConditionModel.from_pretrained(BUNDLED, subfolder="unet"))


# ----------------------------------------------------------------------------------------- variants
def test_variant_names_the_files_as_diffusers_and_both_load_them(tiny_pipes, tmp_path):
    import diffusers

    ours, theirs = tiny_pipes
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    theirs.save_pretrained(tmp_path / "theirs", variant="fp16")
    for name in MODELS:
        assert _weight_files(tmp_path / "ours" / name) == _weight_files(tmp_path / "theirs" / name), name
    assert _weight_files(tmp_path / "ours" / "unet") == {"diffusion_pytorch_model.fp16.safetensors"}
    assert _weight_files(tmp_path / "ours" / "bert") == {"model.fp16.safetensors"}
    ref = ours("a red square", latents=_latents(), **KW).images
    again = DiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    assert np.array_equal(again("a red square", latents=_latents(), **KW).images, ref)
    by_diffusers = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    by_diffusers.set_progress_bar_config(disable=True)
    assert np.abs(by_diffusers("a red square", latents=_latents(), **KW).images - ref).max() <= 1e-4
    with pytest.raises(LDMKitError, match=r"fp16\.safetensors: pass the variant="):
        DiffusionPipeline.from_pretrained(tmp_path / "ours")


def test_a_variant_saved_in_half_precision_loads_back_in_it(tiny_pipes, tmp_path):
    ours, _ = tiny_pipes
    half = DiffusionPipeline.from_pretrained(ours.name_or_path, dtype=torch.float16)
    half.save_pretrained(tmp_path / "half", variant="fp16")
    back = DiffusionPipeline.from_pretrained(tmp_path / "half", variant="fp16", dtype=torch.float16)
    assert all(_same_weights(getattr(back, n), getattr(half, n)) for n in MODELS)


# ----------------------------------------------------------------------------------------- shards
def test_max_shard_size_writes_diffusers_shards_that_both_load(bundled_unets, tmp_path):
    import diffusers

    ours, theirs = bundled_unets
    ours.save_pretrained(tmp_path / "ours", max_shard_size="10MB")
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="10MB")
    files = _weight_files(tmp_path / "ours")
    assert files == _weight_files(tmp_path / "theirs")
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) >= 3
    assert all(os.path.getsize(tmp_path / "ours" / f) <= 10_000_000 for f in files)
    index = json.loads((tmp_path / "ours" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    their_index = json.loads((tmp_path / "theirs" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    # The same keys and total size; which shard holds a key follows each library's parameter order.
    assert index["metadata"] == their_index["metadata"]
    assert index["weight_map"].keys() == their_index["weight_map"].keys()
    for shard in set(index["weight_map"].values()):
        held = {k for k, v in index["weight_map"].items() if v == shard}
        assert set(load_state_dict(tmp_path / "ours" / shard)) == held
    assert _same_weights(UNet2DConditionModel.from_pretrained(tmp_path / "ours"), ours)
    assert _same_weights(diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours"), theirs)


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_variants_and_pickles_are_named_as_diffusers(bundled_unets, tmp_path, safe):
    import diffusers

    ours, theirs = bundled_unets
    kw = {"max_shard_size": 10_000_000, "variant": "ema", "safe_serialization": safe}
    ours.save_pretrained(tmp_path / "ours", **kw)
    theirs.save_pretrained(tmp_path / "theirs", **kw)
    assert _weight_files(tmp_path / "ours") == _weight_files(tmp_path / "theirs")
    ext = "safetensors" if safe else "bin"
    assert f"diffusion_pytorch_model.{ext}.index.ema.json" in _weight_files(tmp_path / "ours")
    assert _same_weights(UNet2DConditionModel.from_pretrained(tmp_path / "ours", variant="ema"), ours)
    if safe:  # diffusers 0.42 cannot load sharded .bin variants, even its own
        assert _same_weights(diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours", variant="ema"), theirs)


def test_a_pipeline_saved_in_shards_matches_diffusers(tiny_pipes, tmp_path):
    import diffusers

    ours, theirs = tiny_pipes
    ours.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    shard = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")
    for name in ("unet", "vqvae"):  # how many shards depends on each library's parameter order; the layout does not
        for side in ("ours", "theirs"):
            files = _weight_files(tmp_path / side / name)
            assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 2
            assert all(shard.fullmatch(f) for f in files - {"diffusion_pytorch_model.safetensors.index.json"})
    ref = ours("a red square", latents=_latents(), **KW).images
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    assert np.abs(back("a red square", latents=_latents(), **KW).images - ref).max() <= 1e-4
    assert np.array_equal(DiffusionPipeline.from_pretrained(tmp_path / "ours")("a red square", latents=_latents(),
                                                                              **KW).images, ref)


def test_saving_again_replaces_the_old_weight_files(bundled_unets, tmp_path):
    """A stale single file would shadow new shards (and stale shards would be dead weight): a save leaves one
    set of weight files per variant, and a variant's files leave the plain ones alone."""
    ours, _ = bundled_unets
    folder = tmp_path / "unet"
    ours.save_pretrained(folder, variant="ema")
    ours.save_pretrained(folder)
    doubled = UNet2DConditionModel.from_config(ours.config)
    doubled.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    doubled.save_pretrained(folder, max_shard_size="10MB")
    assert "diffusion_pytorch_model.safetensors" not in _weight_files(folder)
    assert _same_weights(UNet2DConditionModel.from_pretrained(folder), doubled)
    ours.save_pretrained(folder, safe_serialization=False)
    assert _weight_files(folder) == {"diffusion_pytorch_model.bin", "diffusion_pytorch_model.ema.safetensors"}
    assert _same_weights(UNet2DConditionModel.from_pretrained(folder), ours)
    assert _same_weights(UNet2DConditionModel.from_pretrained(folder, variant="ema"), ours)


def test_bad_save_options_are_clear_errors(bundled_unets, tmp_path):
    ours, _ = bundled_unets
    with pytest.raises(LDMKitError, match="max_shard_size='10XB' is not a size"):
        ours.save_pretrained(tmp_path / "u", max_shard_size="10XB")
    with pytest.raises(LDMKitError, match="only mean something with push_to_hub=True"):
        ours.save_pretrained(tmp_path / "u", token="hf_x")
    with pytest.raises(LDMKitError, match="unexpected keyword.*'safe_serialisation'"):
        ours.save_pretrained(tmp_path / "u", safe_serialisation=False)


# ----------------------------------------------------------------------------------------- push_to_hub
class FakeHub:
    """huggingface_hub's HfApi calls, recorded; ``upload_folder`` keeps a copy of the folder it was given."""

    def __init__(self, monkeypatch, tmp_path, fail_upload: bool = False):
        import huggingface_hub

        self.calls, self.uploaded, self.root = [], [], tmp_path / "hub"
        self.fail_upload = fail_upload
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", self.upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda api, repo_id, filename, **kw: False)

    # Bound methods set on the class are not re-bound, so these do not receive the HfApi instance.
    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id, kw))
        if self.fail_upload:
            raise ConnectionError("connection reset")
        dest = self.root / f"commit{len(self.uploaded)}"
        shutil.copytree(folder_path, dest)
        self.uploaded.append(dest)
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_to_hub_uploads_one_complete_folder_that_diffusers_loads(tiny_pipes, tmp_path, monkeypatch):
    import diffusers

    ours, _ = tiny_pipes
    hub = FakeHub(monkeypatch, tmp_path)
    url = ours.push_to_hub("user/repo", private=True, variant="fp16")
    assert url.endswith("/commit/abc")
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    assert hub.calls[1][2]["commit_message"] == "Upload LDMTextToImagePipeline"
    (folder,) = hub.uploaded
    assert (folder / "README.md").is_file() and (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    back = diffusers.DiffusionPipeline.from_pretrained(folder, variant="fp16")
    back.set_progress_bar_config(disable=True)
    ref = ours("a red square", latents=_latents(), **KW).images
    assert np.abs(back("a red square", latents=_latents(), **KW).images - ref).max() <= 1e-4


def test_model_push_to_hub_and_save_pretrained_push(bundled_unets, tmp_path, monkeypatch):
    ours, _ = bundled_unets
    hub = FakeHub(monkeypatch, tmp_path)
    ours.push_to_hub("user/unet", subfolder="unet")
    assert hub.calls[1][2]["commit_message"] == "Upload model" and hub.calls[1][2]["path_in_repo"] == "unet"
    assert _weight_files(hub.uploaded[0]) == {"diffusion_pytorch_model.safetensors"}  # no card in a subfolder
    ours.save_pretrained(tmp_path / "my-unet", push_to_hub=True, commit_message="first")
    assert hub.calls[2][1] == "my-unet" and hub.calls[3][2]["commit_message"] == "first"
    assert _same_weights(UNet2DConditionModel.from_pretrained(hub.uploaded[1]), ours)
    assert (tmp_path / "my-unet" / "README.md").is_file()


def test_a_save_that_fails_creates_no_repository(tiny_pipes, tmp_path, monkeypatch):
    ours, _ = tiny_pipes
    hub = FakeHub(monkeypatch, tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    pipe = DiffusionPipeline.from_pretrained(ours.name_or_path)
    monkeypatch.setattr(pipe.unet, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe.push_to_hub("user/repo")
    assert hub.calls == []


def test_a_failed_upload_is_an_error_and_commits_nothing(tiny_pipes, tmp_path, monkeypatch):
    ours, _ = tiny_pipes
    hub = FakeHub(monkeypatch, tmp_path, fail_upload=True)
    with pytest.raises(LDMKitError, match="holds no part of this upload") as err:
        ours.push_to_hub("user/repo")
    assert isinstance(err.value.__cause__, ConnectionError) and hub.uploaded == []


def test_push_to_hub_offline_refuses_before_saving(tiny_pipes, bundled_unets, tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = FakeHub(monkeypatch, tmp_path)
    for obj in (tiny_pipes[0], bundled_unets[0]):
        with pytest.raises(LDMKitError, match="offline mode") as err:
            obj.push_to_hub("user/repo")
        assert isinstance(err.value.__cause__, OfflineModeIsEnabled)
        with pytest.raises(LDMKitError, match="Unset HF_HUB_OFFLINE"):
            obj.save_pretrained(tmp_path / "kept", push_to_hub=True)
    assert hub.calls == [] and not (tmp_path / "kept").exists()


def test_push_to_hub_without_network_uploads_nothing(tiny_pipes, tmp_path, monkeypatch, no_network):
    """The real huggingface_hub, with every connection refused (and then also HF_HUB_OFFLINE unset)."""
    ours, _ = tiny_pipes
    with pytest.raises(LDMKitError, match="offline mode"):
        ours.push_to_hub("user/repo")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    with pytest.raises(LDMKitError, match="Could not push to 'user/repo'.*holds no part of this upload"):
        ours.push_to_hub("user/repo")
