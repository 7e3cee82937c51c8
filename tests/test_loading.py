"""Loading and saving pipelines in the diffusers layout: folders, the Hub cache, bad files."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError, LDMTextToImagePipeline
from ldmkit.loading.weights import load_state_dict

KW = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}


def _latents():
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def copy_dir(tiny_text2img_dir, tmp_path):
    dest = tmp_path / "pipe"
    shutil.copytree(tiny_text2img_dir, dest)
    return dest


def test_round_trip_into_diffusers(tiny_text2img_dir, tmp_path):
    import diffusers

    ours = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"]
    assert index["tokenizer"] == ["transformers", "BertTokenizer"]
    theirs = diffusers.LDMTextToImagePipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    ref = theirs("a red square", latents=_latents(), **KW).images
    got = ours("a red square", latents=_latents(), **KW).images
    assert np.abs(got - ref).max() <= 1e-4
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert np.abs(again("a red square", latents=_latents(), **KW).images - got).max() == 0


def test_bin_weights_load_with_weights_only(copy_dir):
    """Old Hub repos ship pytorch_model.bin / diffusion_pytorch_model.bin pickles."""
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("bert", "model")):
        st = copy_dir / sub / f"{stem}.safetensors"
        state = load_state_dict(st)
        name = "pytorch_model.bin" if sub == "bert" else f"{stem}.bin"
        torch.save(state, copy_dir / sub / name)
        st.unlink()
    pipe = DiffusionPipeline.from_pretrained(copy_dir)
    assert pipe.unet.config.cross_attention_dim == 32


def test_malicious_pickle_is_refused_without_running(copy_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (copy_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with open(copy_dir / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(LDMKitError, match="Refused"):
        DiffusionPipeline.from_pretrained(copy_dir)
    assert not marker.exists()


def test_missing_model_index(copy_dir):
    (copy_dir / "model_index.json").unlink()
    with pytest.raises(LDMKitError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_missing_weight_file(copy_dir):
    (copy_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LDMKitError, match="No weight file"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_truncated_safetensors(copy_dir):
    path = copy_dir / "vqvae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LDMKitError, match="corrupt or truncated"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_garbage_safetensors(copy_dir):
    weights = copy_dir / "bert" / "model.safetensors"
    weights.write_bytes(b"\x93\x07\xff garbage bytes, not a safetensors header \x00\x01")
    with pytest.raises(LDMKitError, match="corrupt or truncated"):
        DiffusionPipeline.from_pretrained(copy_dir)
    weights.write_bytes(b"not a safetensors file at all")  # text where weights should be: say so
    with pytest.raises(LDMKitError, match="is a text file"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_unknown_pipeline_class(copy_dir):
    index = json.loads((copy_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (copy_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LDMKitError, match="does not implement"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_unknown_component_class(copy_dir):
    index = json.loads((copy_dir / "model_index.json").read_text())
    index["unet"] = ["diffusers", "FluxTransformer2DModel"]
    (copy_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LDMKitError, match="FluxTransformer2DModel"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_corrupt_config(copy_dir):
    (copy_dir / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(LDMKitError, match="not valid JSON"):
        DiffusionPipeline.from_pretrained(copy_dir)


def test_bad_path_and_file(tmp_path):
    with pytest.raises(LDMKitError, match="No folder"):
        DiffusionPipeline.from_pretrained(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "file.ckpt").write_bytes(b"x")
    with pytest.raises(LDMKitError, match="from_single_file"):
        DiffusionPipeline.from_pretrained(tmp_path / "file.ckpt")


def _fake_hub_cache(cache, repo_id, source):
    """Lay out ``source`` as huggingface_hub's cache would after a download of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_offline_from_cache(tiny_text2img_dir, tmp_path, no_network):
    _fake_hub_cache(tmp_path / "hub", "CompVis/ldm-text2im-large-256", tiny_text2img_dir)
    pipe = DiffusionPipeline.from_pretrained("CompVis/ldm-text2im-large-256", cache_dir=tmp_path / "hub")
    assert isinstance(pipe, LDMTextToImagePipeline)
    image = pipe("a red square", latents=_latents(), **KW).images
    assert image.shape == (1, 64, 64, 3)


def test_hub_id_not_cached_offline(tmp_path, no_network):
    with pytest.raises(LDMKitError, match="not in the local Hugging Face cache"):
        DiffusionPipeline.from_pretrained("CompVis/ldm-text2im-large-256", cache_dir=tmp_path / "empty")


def test_components_are_shared(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    other = LDMTextToImagePipeline(**pipe.components)
    assert other.unet is pipe.unet
    reused = DiffusionPipeline.from_pretrained(tiny_text2img_dir, unet=pipe.unet)
    assert reused.unet is pipe.unet
    with pytest.raises(LDMKitError, match="no component"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, text_encoder=pipe.bert)


def test_dtype_and_device(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.bert.dtype == torch.bfloat16
    image = pipe("a red square", num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()
    with pytest.raises(LDMKitError, match="floating"):
        pipe.to(dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(LDMKitError, match="CUDA"):
            pipe.to("cuda")
    with pytest.raises(LDMKitError, match="Unknown dtype"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, torch_dtype="float13")


def test_registries_hold_every_class_by_its_on_disk_name():
    import ldmkit
    from ldmkit import registry
    from ldmkit.loading.compvis_config import FAMILIES

    for name in [n for n in ldmkit.pipelines.__all__ if n.startswith("LDM")]:
        assert registry.PIPELINES.get(name) is getattr(ldmkit, name)
    for name in ("AutoencoderKL", "VQModel", "UNet2DModel", "UNet2DConditionModel", "DDIMScheduler", "PNDMScheduler"):
        assert registry.COMPONENTS.get(("diffusers", name)) is getattr(ldmkit, name)
    assert registry.COMPONENTS.get(("ldmkit", "ClassEmbedder")) is ldmkit.ClassEmbedder
    assert registry.COMPONENTS.get(("latent_diffusion", "LDMBertModel")) is ldmkit.LDMBertModel
    assert registry.COMPONENTS.get(("transformers", "BertTokenizerFast")) is ldmkit.LDMTokenizer
    assert registry.COMPONENTS.key_of(ldmkit.LDMTokenizer) == ("transformers", "BertTokenizer")
    assert registry.COMPONENTS.get(("diffusers", "SchedulerMixin")) is None  # bases are not components
    assert sorted(registry.COMPVIS_FAMILIES.keys()) == sorted(FAMILIES)


def test_a_pipeline_subclass_loads_back_by_its_own_name(tiny_text2img_dir, tmp_path):
    class MyTextToImagePipeline(LDMTextToImagePipeline):
        pass

    pipe = MyTextToImagePipeline(**DiffusionPipeline.from_pretrained(tiny_text2img_dir).components)
    pipe.save_pretrained(tmp_path / "mine")
    assert json.loads((tmp_path / "mine" / "model_index.json").read_text())["_class_name"] == "MyTextToImagePipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "mine")) is MyTextToImagePipeline


def test_a_name_two_classes_claim_is_refused_on_lookup():
    from ldmkit.registry import Registry

    reg = Registry("test")
    first, again, other = type("Thing", (), {}), type("Thing", (), {}), type("Thing", (), {"__module__": "elsewhere"})
    reg.add("Thing", first)
    reg.add("Thing", again)  # the same class statement run again replaces the first
    assert reg.get("Thing") is again
    reg.add("Thing", other)
    with pytest.raises(LDMKitError, match="Several test classes"):
        reg.get("Thing")


def test_a_missing_loader_is_a_broken_invariant(tiny_text2img_dir, tmp_path, monkeypatch):
    from ldmkit import registry

    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    monkeypatch.delitem(registry._LOADERS, "save_pretrained")
    with pytest.raises(AssertionError, match="no 'save_pretrained' loader"):
        pipe.save_pretrained(tmp_path / "saved")
