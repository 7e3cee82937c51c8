"""The converted-weights cache (``ldmkit.loading.converted``): a load into another dtype keeps the converted
tensors on disk, and the next load maps them instead of converting, giving the same model bit for bit."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ldmkit.loading import converted
from ldmkit.loading.weights import LazyTensor
from ldmkit.models import UNet2DConditionModel

# block_out_channels[0] >= 128: a bf16 load on the CPU stores the convolutions channels-last (hardware.py)
CONFIG = dict(in_channels=4, out_channels=4, layers_per_block=1, attention_head_dim=8, sample_size=8,
              block_out_channels=(128, 128), cross_attention_dim=32, norm_num_groups=32,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LDMKIT_CONVERTED_CACHE", str(root))
    return root


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    UNet2DConditionModel(**CONFIG).save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def load(folder, **kwargs):
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16, **kwargs)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].stride() == sb[key].stride(), key
        assert torch.equal(sa[key], sb[key]), key


def refuse_source_reads(monkeypatch):
    def refuse(self, regroup=True):
        raise AssertionError(f"{self.key} was read from the source file")

    monkeypatch.setattr(LazyTensor, "load", refuse)


def test_the_second_load_maps_the_cached_conversion_and_gives_the_same_model(folder, cache, monkeypatch):
    plain = load(folder)
    first = load(folder, cache_converted=True)
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 1
    refuse_source_reads(monkeypatch)
    second = load(folder, cache_converted=True)
    assert_same_model(plain, first)
    assert_same_model(plain, second)
    conv = second.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t, text = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([10]), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(plain(x, t, text.bfloat16()).sample, second(x, t, text.bfloat16()).sample)


def test_a_changed_source_is_converted_again_and_its_entry_replaced(folder, cache):
    load(folder, cache_converted=True)
    torch.manual_seed(1)
    UNet2DConditionModel(**CONFIG).save_pretrained(folder)  # new weights, same path
    again = load(folder, cache_converted=True)
    assert_same_model(again, load(folder))
    assert len(list(cache.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("how", ["default", "float32", "off"])
def test_nothing_is_cached_unless_asked_and_converting(folder, cache, monkeypatch, how):
    if how == "default":
        load(folder)
    elif how == "float32":
        UNet2DConditionModel.from_pretrained(folder, cache_converted=True)  # the file's own dtype: mapped
    else:
        monkeypatch.setenv("LDMKIT_CONVERTED_CACHE", "off")
        load(folder, cache_converted=True)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_damaged_entry_is_converted_again(folder, cache, caplog):
    load(folder, cache_converted=True)
    entry = next(cache.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="ldmkit.loading.converted"):
        again = load(folder, cache_converted=True)
    assert "damaged converted-weights cache entry" in caplog.text
    assert_same_model(again, load(folder))
    assert entry.stat().st_size > 1000  # written again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_cache_that_cannot_be_written_only_costs_the_speed_up(folder, cache, caplog):
    cache.mkdir()
    cache.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="ldmkit.loading.converted"):
            model = load(folder, cache_converted=True)
    finally:
        cache.chmod(0o700)
    assert "could not cache converted weights" in caplog.text
    assert_same_model(model, load(folder))


def test_a_cache_that_cannot_be_created_only_costs_the_speed_up(folder, tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("LDMKIT_CONVERTED_CACHE", str(tmp_path / "a-file" / "cache"))
    with caplog.at_level(logging.WARNING, logger="ldmkit.loading.converted"):
        model = load(folder, cache_converted=True)
    assert "could not cache converted weights" in caplog.text
    assert_same_model(model, load(folder))


def test_the_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LDMKIT_CONVERTED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert converted.cache_root() == tmp_path / "ldmkit" / "converted"


def test_the_cli_loader_caches_the_bundled_model_and_replays_the_same_pixels(cache, monkeypatch):
    from ldmkit.pipelines.presets import load_pipeline

    def run():
        pipe = load_pipeline("ldmkit:emoji-text2img", torch.device("cpu"), "bf16")
        pipe.set_progress_bar_config(disable=True)
        return pipe(["a red apple"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    first = run()
    assert len(list(cache.glob("*.safetensors"))) >= 2  # the text encoder, the UNet, the autoencoder
    refuse_source_reads(monkeypatch)
    assert (run() == first).all()
