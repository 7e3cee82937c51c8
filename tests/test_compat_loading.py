"""Issue 16, items 1 and 4: diffusers' loading keywords and pipeline attributes, run side by side with
diffusers on the same folders (the bundled text-to-image model and the tiny fixtures), checking the effect:
the dtypes, devices and weights each keyword gives, the files it downloads, the error a wrong one gives."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from compvis_fixtures import checkpoint as compvis_checkpoint
from compvis_fixtures import config as compvis_config
from compvis_fixtures import requires_fixtures
from ldmkit import (
    DDIMScheduler,
    DiffusionPipeline,
    LDMClassConditionalPipeline,
    LDMKitError,
    LDMPipeline,
    LDMTextToImagePipeline,
    PNDMScheduler,
    UNet2DConditionModel,
)
from ldmkit.loading.bundled import bundled_folder
from ldmkit.loading.weights import load_state_dict

BUNDLED = bundled_folder("ldmkit:emoji-text2img")
KW = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
MODELS = ("vqvae", "bert", "unet")


def _latents(shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _diffusers(folder, **kw):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_copy(tiny_text2img_dir, tmp_path):
    dest = tmp_path / "pipe"
    shutil.copytree(tiny_text2img_dir, dest)
    return dest


# ----------------------------------------------------------------------------------------- dtype keywords
def test_dtype_is_torch_dtype_and_both_is_an_error_as_in_diffusers(tiny_text2img_dir):
    ours = DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype=torch.float16)
    theirs = _diffusers(tiny_text2img_dir, dtype=torch.float16)
    for name in MODELS:
        assert getattr(ours, name).dtype == getattr(theirs, name).dtype == torch.float16
        assert _same_weights(getattr(ours, name), getattr(theirs, name))
    with pytest.raises(ValueError, match="both"):
        _diffusers(tiny_text2img_dir, dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(LDMKitError, match="both dtype= and torch_dtype="):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype=torch.float16, torch_dtype=torch.float16)


@pytest.mark.parametrize("spec", [{"unet": torch.bfloat16, "default": torch.float16}, {"unet": torch.bfloat16}])
def test_per_component_dtype_dict_follows_diffusers(tiny_text2img_dir, spec):
    ours = DiffusionPipeline.from_pretrained(tiny_text2img_dir, torch_dtype=spec)
    theirs = _diffusers(tiny_text2img_dir, dtype=spec)
    for name in MODELS:  # the named component, then "default", then float32
        assert getattr(ours, name).dtype == getattr(theirs, name).dtype == spec.get(name, spec.get("default",
                                                                                                  torch.float32))
        assert _same_weights(getattr(ours, name), getattr(theirs, name))


def test_a_dtype_dict_naming_no_component_is_an_error_naming_the_nearest(tiny_text2img_dir):
    with pytest.raises(LDMKitError, match="names 'unte'.*Did you mean 'unet'"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype={"unte": torch.float16})


# ----------------------------------------------------------------------------------------- weight files
PICKLES = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
           "vqvae": ("diffusion_pytorch_model", "diffusion_pytorch_model.bin"), "bert": ("model", "pytorch_model.bin")}


def _pickle_twins(folder, subs=("unet",), scale: float = 2.0) -> dict:
    """Give models a .bin beside their .safetensors, with weights times ``scale``, to see which one loads;
    returns the UNet's safetensors state."""
    for sub in subs:
        stem, pickle_name = PICKLES[sub]
        state = load_state_dict(folder / sub / f"{stem}.safetensors")
        torch.save({k: v * scale if v.is_floating_point() else v for k, v in state.items()}, folder / sub / pickle_name)
    return load_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("use_safetensors", [None, True, False])
def test_use_safetensors_picks_the_format_diffusers_picks(tiny_copy, use_safetensors):
    safe = _pickle_twins(tiny_copy, subs=MODELS)
    ours = DiffusionPipeline.from_pretrained(tiny_copy, use_safetensors=use_safetensors)
    theirs = _diffusers(tiny_copy, use_safetensors=use_safetensors)
    assert _same_weights(ours.unet, theirs.unet)
    key = "conv_in.weight"
    expected = safe[key] * (2.0 if use_safetensors is False else 1.0)
    assert torch.equal(ours.unet.state_dict()[key], expected)


def test_use_safetensors_is_an_error_where_the_format_is_missing(tiny_copy):
    with pytest.raises(LDMKitError, match=r"diffusion_pytorch_model\.bin.*holds diffusion_pytorch_model.safetensors"):
        DiffusionPipeline.from_pretrained(tiny_copy, use_safetensors=False)
    state = load_state_dict(tiny_copy / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save(state, tiny_copy / "unet" / "diffusion_pytorch_model.bin")
    (tiny_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LDMKitError, match="No weight file"):
        DiffusionPipeline.from_pretrained(tiny_copy, use_safetensors=True)
    assert _same_weights(DiffusionPipeline.from_pretrained(tiny_copy).unet, _diffusers(tiny_copy).unet)


def test_variant_loads_where_a_component_has_it_and_plain_weights_elsewhere(tiny_copy):
    """As diffusers: with variant="ema" only the UNet has, the UNet loads it and the others their own."""
    from safetensors.torch import save_file

    state = load_state_dict(tiny_copy / "unet" / "diffusion_pytorch_model.safetensors")
    half = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(tiny_copy / "unet" / "diffusion_pytorch_model.ema.safetensors"))
    ours = DiffusionPipeline.from_pretrained(tiny_copy, variant="ema")
    theirs = _diffusers(tiny_copy, variant="ema")
    assert torch.equal(ours.unet.state_dict()["conv_in.weight"], half["conv_in.weight"])
    for name in MODELS:
        assert _same_weights(getattr(ours, name), getattr(theirs, name))
    with pytest.raises(ValueError, match="variant=fp16"):
        _diffusers(tiny_copy, variant="fp16")
    with pytest.raises(LDMKitError, match="No component .* has 'fp16' weights"):
        DiffusionPipeline.from_pretrained(tiny_copy, variant="fp16")


def test_disable_mmap_and_low_cpu_mem_usage_load_the_same_weights_as_diffusers(tiny_text2img_dir):
    theirs = _diffusers(tiny_text2img_dir)
    ref = theirs("a red square", latents=_latents(), **KW).images
    for kw in ({"disable_mmap": True}, {"low_cpu_mem_usage": False}, {"low_cpu_mem_usage": True}):
        ours = DiffusionPipeline.from_pretrained(tiny_text2img_dir, **kw)
        assert all(_same_weights(getattr(ours, n), getattr(theirs, n)) for n in ("unet", "vqvae"))
        assert np.abs(ours("a red square", latents=_latents(), **KW).images - ref).max() <= 1e-4
    with pytest.raises(LDMKitError, match="low_cpu_mem_usage must be"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, low_cpu_mem_usage="no")


# ----------------------------------------------------------------------------------------- device_map
def test_device_map_places_the_components(tiny_text2img_dir):
    for device_map in ("cpu", "balanced"):  # one device here: "balanced" is the accelerator, or the CPU
        pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, device_map=device_map)
        want = "cuda" if device_map == "balanced" and torch.cuda.is_available() else "cpu"
        assert {getattr(pipe, n).device.type for n in MODELS} == {want}
    theirs = _diffusers(tiny_text2img_dir, device_map="cpu")
    assert {getattr(theirs, n).device.type for n in MODELS} == {"cpu"}
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        _diffusers(tiny_text2img_dir, device_map="cpu", low_cpu_mem_usage=False)
    with pytest.raises(LDMKitError, match="low_cpu_mem_usage=False cannot be combined"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, device_map="cpu", low_cpu_mem_usage=False)
    with pytest.raises(LDMKitError, match="Did you mean 'balanced'"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, device_map="balance")
    if not torch.cuda.is_available():
        with pytest.raises(LDMKitError, match="no CUDA GPU"):
            DiffusionPipeline.from_pretrained(tiny_text2img_dir, device_map="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_map_cuda_loads_onto_the_gpu_and_runs(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, device_map="cuda")
    assert {getattr(pipe, n).device.type for n in MODELS} == {"cuda"}
    ref = DiffusionPipeline.from_pretrained(tiny_text2img_dir)("a red square", latents=_latents(), **KW).images
    got = pipe("a red square", latents=_latents().cuda(), **KW).images
    assert np.abs(got - ref).max() <= 1e-3


# ----------------------------------------------------------------------------------------- other keywords
def test_hub_keywords_are_passed_to_huggingface_hub(tiny_text2img_dir, monkeypatch):
    """force_download and token reach huggingface_hub, and use_safetensors decides which files are fetched."""
    import huggingface_hub

    calls = []

    def snapshot(repo_id, **kw):
        calls.append(kw)
        return str(tiny_text2img_dir)

    def one_file(repo_id, filename, **kw):
        calls.append(kw)
        return str(tiny_text2img_dir / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", one_file)

    def fetched() -> set[str]:
        return {p.rsplit(".", 1)[1] for c in calls[1:] for p in c["allow_patterns"] if "/*." in p}

    for use_safetensors in (None, True):
        calls.clear()
        DiffusionPipeline.from_pretrained("someone/tiny", force_download=True, token="hf_test",
                                          use_safetensors=use_safetensors)
        assert all(c["force_download"] is True and c["token"] == "hf_test" for c in calls)
        assert fetched() == {"json", "txt", "safetensors"}
    calls.clear()
    with pytest.raises(LDMKitError, match="No weight file"):  # the tiny folder has no pickles to load
        DiffusionPipeline.from_pretrained("someone/tiny", use_safetensors=False)
    assert fetched() == {"json", "txt", "bin"}


def test_local_loading_with_hub_keywords_needs_no_network(tiny_text2img_dir, no_network):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, force_download=True, token="hf_x", revision="main")
    assert isinstance(pipe, LDMTextToImagePipeline)


@pytest.mark.parametrize("kw, match", [
    ({"custom_pipeline": "lpw_stable_diffusion"}, "runs no code from repositories"),
    ({"trust_remote_code": True}, "nothing to trust"),
    ({"quantization_config": object()}, "does not quantize"),
    ({"use_onnx": True}, "not ONNX"),
    ({"max_memory": {0: "1GB"}}, "one device"),
    ({"subfolder": "unet"}, "takes no subfolder"),
])
def test_diffusers_keywords_without_a_meaning_here_are_clear_errors(tiny_text2img_dir, kw, match):
    with pytest.raises(LDMKitError, match=match):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, **kw)


def test_the_off_values_of_unsupported_features_are_accepted(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, custom_pipeline=None, trust_remote_code=False,
                                             use_onnx=False, quantization_config=None, load_connected_pipeline=False)
    assert isinstance(pipe, LDMTextToImagePipeline)


def test_an_unknown_keyword_names_the_nearest_option_or_component(tiny_text2img_dir):
    with pytest.raises(LDMKitError, match="Did you mean 'use_safetensors'"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, use_safetensor=True)
    with pytest.raises(LDMKitError, match="no component 'unte'.*Did you mean 'unet'"):
        LDMTextToImagePipeline.from_pretrained(tiny_text2img_dir, unte=None)
    with pytest.raises(LDMKitError, match="Did you mean 'device_map'"):
        DiffusionPipeline.from_pretrained(tiny_text2img_dir, devicemap="cpu")


def test_a_misspelt_keyword_is_refused_before_anything_is_downloaded(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(LDMKitError, match="Did you mean 'use_safetensors'"):
        LDMTextToImagePipeline.from_pretrained("someone/tiny", use_safetensor=True)


# ----------------------------------------------------------------------------------------- models
def test_model_from_pretrained_takes_the_same_keywords_as_diffusers(tiny_copy):
    import diffusers

    _pickle_twins(tiny_copy)
    for kw in ({"torch_dtype": torch.float16, "use_safetensors": True}, {"dtype": torch.bfloat16},
               {"use_safetensors": False, "disable_mmap": True}, {"low_cpu_mem_usage": False, "variant": None},
               {"device_map": "auto"}, {"device_map": {"": "cpu"}}):
        ours = UNet2DConditionModel.from_pretrained(tiny_copy, subfolder="unet", **kw)
        theirs = diffusers.UNet2DConditionModel.from_pretrained(tiny_copy, subfolder="unet", **kw)
        assert ours.dtype == theirs.dtype and ours.device == theirs.device and _same_weights(ours, theirs), kw
    ours, info = UNet2DConditionModel.from_pretrained(tiny_copy, subfolder="unet", output_loading_info=True)
    _, their_info = diffusers.UNet2DConditionModel.from_pretrained(tiny_copy, subfolder="unet",
                                                                   output_loading_info=True)
    assert info == their_info


def test_model_from_pretrained_refuses_what_has_no_meaning(tiny_text2img_dir):
    folder = tiny_text2img_dir / "unet"
    with pytest.raises(LDMKitError, match="Did you mean 'use_safetensors'"):
        UNet2DConditionModel.from_pretrained(folder, use_safetensor=True)
    with pytest.raises(LDMKitError, match="loads strictly"):
        UNet2DConditionModel.from_pretrained(folder, ignore_mismatched_sizes=True)
    with pytest.raises(LDMKitError, match="places submodules on different devices"):
        UNet2DConditionModel.from_pretrained(folder, device_map={"conv_in": "cpu", "": "cpu"})
    with pytest.raises(LDMKitError, match="a model takes one dtype"):
        UNet2DConditionModel.from_pretrained(folder, dtype={"unet": torch.float16})
    with pytest.raises(LDMKitError, match="variant="):
        UNet2DConditionModel.from_pretrained(folder, variant="fp16")


# ----------------------------------------------------------------------------------------- attributes
def test_config_and_name_or_path_are_diffusers(no_network):
    ours = DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img")
    theirs = _diffusers(str(BUNDLED))
    assert ours.name_or_path == "ldmkit:emoji-text2img" and theirs.name_or_path == str(BUNDLED)
    assert {k: v for k, v in ours.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in theirs.config.items() if k != "_name_or_path"}
    assert ours.config.unet == theirs.config.unet == ("diffusers", "UNet2DConditionModel")
    same = DiffusionPipeline.from_pretrained(str(BUNDLED))
    assert dict(same.config) == dict(theirs.config) and same.name_or_path == theirs.name_or_path
    import diffusers

    ours.scheduler = PNDMScheduler.from_config(ours.scheduler.config)  # the config follows a swap, as diffusers'
    theirs.scheduler = diffusers.PNDMScheduler.from_config(theirs.scheduler.config)
    assert ours.config.scheduler == theirs.config.scheduler == ("diffusers", "PNDMScheduler")
    with pytest.raises(TypeError):
        ours.config["unet"] = ("diffusers", "UNet2DModel")
    built = LDMTextToImagePipeline(**ours.components)
    assert built.name_or_path is None and "_name_or_path" not in built.config


# ----------------------------------------------------------------------------------------- from_pipe
def test_from_pipe_shares_the_components_and_gives_the_same_images(tiny_text2img_dir):
    import diffusers

    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    new = LDMTextToImagePipeline.from_pipe(pipe)
    assert all(getattr(new, n) is getattr(pipe, n) for n in pipe.component_names())
    assert new.name_or_path == pipe.name_or_path and dict(new.config) == dict(pipe.config)
    got = new("a red square", latents=_latents(), **KW).images
    assert np.array_equal(got, pipe("a red square", latents=_latents(), **KW).images)
    theirs = diffusers.LDMTextToImagePipeline.from_pipe(_diffusers(tiny_text2img_dir))
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(got - theirs("a red square", latents=_latents(), **KW).images).max() <= 1e-4


def test_from_pipe_overrides_components_and_casts_as_diffusers(tiny_text2img_dir):
    import diffusers

    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype=torch.float16)
    other = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    new = LDMTextToImagePipeline.from_pipe(pipe, scheduler=other)
    assert new.scheduler is other and pipe.scheduler is not other and new.unet is pipe.unet
    # diffusers casts the new pipeline to float32 unless told otherwise, and the models are shared.
    theirs = _diffusers(tiny_text2img_dir, dtype=torch.float16)
    their_new = diffusers.LDMTextToImagePipeline.from_pipe(theirs)
    assert new.unet.dtype == pipe.unet.dtype == their_new.unet.dtype == theirs.unet.dtype == torch.float32
    half = LDMTextToImagePipeline.from_pipe(pipe, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == diffusers.LDMTextToImagePipeline.from_pipe(theirs, dtype=torch.bfloat16).unet.dtype


def test_from_pipe_between_classes_needs_fitting_components(tiny_text2img_dir, tiny_uncond_dir):
    import diffusers

    text = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    with pytest.raises(ValueError, match="expected"):  # diffusers refuses the text-to-image UNet too
        diffusers.LDMPipeline.from_pipe(_diffusers(tiny_text2img_dir))
    with pytest.raises(LDMKitError, match="unet is a UNet2DConditionModel, where LDMPipeline needs a UNet2DModel"):
        LDMPipeline.from_pipe(text)
    with pytest.raises(LDMKitError, match="has no class_embedder"):
        LDMClassConditionalPipeline.from_pipe(text)
    uncond = DiffusionPipeline.from_pretrained(tiny_uncond_dir)
    fitted = LDMPipeline.from_pipe(text, unet=uncond.unet, vqvae=uncond.vqvae)
    assert fitted.unet is uncond.unet and fitted.scheduler is text.scheduler
    image = fitted(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()
    with pytest.raises(LDMKitError, match="Did you mean 'scheduler'"):
        LDMTextToImagePipeline.from_pipe(text, schedular=text.scheduler)
    with pytest.raises(LDMKitError, match="call it on one"):
        DiffusionPipeline.from_pipe(text)


# ----------------------------------------------------------------------------------------- from_single_file
@requires_fixtures
def test_from_single_file_takes_diffusers_spellings_and_records_the_path():
    path = compvis_checkpoint("uncond")
    pipe = DiffusionPipeline.from_single_file(path, original_config=compvis_config("uncond"), dtype=torch.float16)
    assert isinstance(pipe, LDMPipeline) and pipe.unet.dtype == torch.float16
    assert pipe.name_or_path == path and pipe.config["_name_or_path"] == path
    with pytest.raises(LDMKitError, match="both dtype= and torch_dtype="):
        DiffusionPipeline.from_single_file(path, config=compvis_config("uncond"), dtype=torch.float16,
                                           torch_dtype=torch.float16)
    with pytest.raises(LDMKitError, match="both config= and original_config="):
        DiffusionPipeline.from_single_file(path, config=compvis_config("uncond"),
                                           original_config=compvis_config("uncond"))
