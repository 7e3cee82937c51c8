"""Loading original CompVis checkpoints: file kinds, EMA choice, scale factor, and every error naming its cause
(unknown / missing keys, unsupported targets, unsafe pickles and YAML)."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
import yaml

from compvis_fixtures import (
    assert_rel,
    checkpoint,
    config,
    load,
    model_call,
    reference,
    requires_fixtures,
    single_thread,
    tokenizer,
)
from ldmkit import DiffusionPipeline, LDMKitError, LDMPipeline, LDMTextToImagePipeline, LDMTokenizer
from ldmkit.loading.compvis_checkpoint import read_checkpoint

pytestmark = requires_fixtures
_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _yaml(family: str) -> dict:
    return yaml.safe_load(config(family).read_text())


def _state(family: str) -> dict:
    return dict(read_checkpoint(checkpoint(family)))


def _load(family: str, state=None, cfg=None, **kwargs):
    return DiffusionPipeline.from_single_file(state if state is not None else checkpoint(family),
                                              config=cfg if cfg is not None else config(family), **kwargs)


def _first_call(pipe, family: str) -> torch.Tensor:
    ref = reference(family)
    return model_call(pipe, family, ref["ddim_eta0.model_in_x"][0], ref["ddim_eta0.model_in_t"][0])


@pytest.mark.parametrize("legacy_format", [False, True])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path, legacy_format):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": Evil()}, "global_step": 0}
    if legacy_format:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(LDMKitError, match="Refused"):
        _load("uncond", str(path))
    assert not marker.exists()


def test_yaml_is_data_only(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(LDMKitError, match="safe_load"):
        _load("uncond", cfg=evil)
    assert not marker.exists()
    # A target is a name to look up, never something to import or call.
    cfg = _yaml("uncond")
    cfg["model"]["params"]["cond_stage_config"] = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    with pytest.raises(LDMKitError, match="'os.system' is not supported"):
        _load("uncond", cfg=cfg)
    assert not marker.exists()


@pytest.mark.parametrize("section,target", [
    ("cond_stage_config", "ldm.modules.encoders.modules.FrozenCLIPEmbedder"),
    ("first_stage_config", "ldm.models.autoencoder.VQModel"),
    ("unet_config", "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel"),
])
def test_unsupported_targets_are_named(section, target):
    cfg = _yaml("cin")
    cfg["model"]["params"][section]["target"] = target
    with pytest.raises(LDMKitError, match=target.replace(".", r"\.")):
        _load("cin", cfg=cfg)


def test_unsupported_options_are_named():
    cfg = _yaml("cin")
    cfg["model"]["target"] = "ldm.models.diffusion.ddpm.DDPM"
    with pytest.raises(LDMKitError, match=r"ddpm\.DDPM"):
        _load("cin", cfg=cfg)
    cfg = _yaml("cin")
    cfg["model"]["params"]["unet_config"]["params"]["fancy_option"] = 3
    with pytest.raises(LDMKitError, match="fancy_option"):
        _load("cin", cfg=cfg)
    cfg = _yaml("superres")
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "linear"
    with pytest.raises(LDMKitError, match="attn_type 'linear'"):
        _load("superres", cfg=cfg)


@pytest.mark.parametrize("family,key", [
    ("txt2img", "model.diffusion_model.input_blocks.1.0.extra.weight"),
    ("txt2img", "cond_stage_model.transformer.attn_layers.layers.9.0.weight"),
    ("superres", "first_stage_model.decoder.up.5.block.0.conv1.weight"),
    ("uncond", "something_else"),
])
def test_unknown_keys_are_named(family, key):
    state = _state(family)
    state[key] = torch.zeros(3)
    with pytest.raises(LDMKitError, match=key.replace(".", r"\.")):
        _load(family, state)


@pytest.mark.parametrize("family,key", [
    ("txt2img", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
    ("txt2img", "first_stage_model.decoder.mid.attn_1.q.weight"),
    ("txt2img", "cond_stage_model.transformer.attn_layers.layers.3.1.net.0.0.bias"),
    ("inpainting", "model.diffusion_model.input_blocks.2.0.emb_layers.1.weight"),
    ("superres", "model.diffusion_model.middle_block.1.qkv.weight"),
    ("cin", "cond_stage_model.embedding.weight"),
    ("uncond", "first_stage_model.quantize.embedding.weight"),
])
def test_missing_keys_are_named_as_in_the_checkpoint(family, key):
    state = _state(family)
    del state[key]
    with pytest.raises(LDMKitError, match=key.replace(".", r"\.")):
        _load(family, state, use_ema=False)


def test_missing_ema_copy_and_wrong_shape_are_named():
    state = _state("uncond")
    del state["model_ema.diffusion_modelout2weight"]
    with pytest.raises(LDMKitError, match=r"out\.2\.weight"):
        _load("uncond", state)
    # The live weights are complete: they load, and are the live weights of the recorded runs.
    live = _first_call(_load("uncond", state, use_ema=False), "uncond")
    assert_rel(live, reference("uncond")["live_weights.first_model_out"], "live weights")
    state = _state("uncond")
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    with pytest.raises(LDMKitError, match=r"model\.diffusion_model\.out\.2\.bias has shape \(4,\)"):
        _load("uncond", state, use_ema=False)


def test_stray_keys_are_ignored_and_logged(caplog):
    state = _state("superres")
    assert {"ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"} <= set(state)
    with caplog.at_level(logging.DEBUG, logger="ldmkit"):
        _load("superres", state)
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    for key in ("ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"):
        assert key in logged


def test_inpainting_cond_stage_must_equal_the_first_stage():
    state = _state("inpainting")
    state["cond_stage_model.quant_conv.bias"] = state["cond_stage_model.quant_conv.bias"] + 1
    with pytest.raises(LDMKitError, match="__is_first_stage__"):
        _load("inpainting", state)


def test_schedule_must_match_the_yaml():
    cfg = _yaml("uncond")
    cfg["model"]["params"]["linear_end"] = 0.012
    with pytest.raises(LDMKitError, match="noise schedule"):
        _load("uncond", cfg=cfg)


def test_scale_factor_comes_from_the_yaml():
    assert load("txt2img").vqvae.config.scaling_factor == 0.18215
    for family in ("superres", "uncond", "cin", "inpainting"):
        assert load(family).vqvae.config.scaling_factor == 1.0
    # scale_by_std: the factor was measured in training and saved as a buffer.
    cfg, state = _yaml("uncond"), _state("uncond")
    cfg["model"]["params"]["scale_by_std"] = True
    state["scale_factor"] = torch.tensor(0.5)
    assert _load("uncond", state, cfg).vqvae.config.scaling_factor == 0.5


def test_yaml_use_ema_false_means_live_weights():
    cfg = _yaml("uncond")
    cfg["model"]["params"]["use_ema"] = False
    ref = reference("uncond")
    torch.testing.assert_close(_first_call(_load("uncond", cfg=cfg), "uncond"), ref["live_weights.first_model_out"],
                               rtol=1e-5, atol=1e-5 * float(ref["live_weights.first_model_out"].abs().max()))
    assert torch.equal(_first_call(_load("uncond", cfg=cfg, use_ema=True), "uncond"),
                       _first_call(load("uncond"), "uncond"))


def test_bare_and_in_memory_state_dicts(tmp_path):
    state = _state("cin")
    torch.save(state, tmp_path / "bare.pt")  # no {"state_dict": ...} wrapper
    expected = _first_call(load("cin"), "cin")
    assert torch.equal(_first_call(_load("cin", str(tmp_path / "bare.pt")), "cin"), expected)
    assert torch.equal(_first_call(_load("cin", state), "cin"), expected)
    assert torch.equal(_first_call(_load("cin", {"state_dict": state}), "cin"), expected)


def test_dtype_and_pipeline_class():
    pipe = _load("uncond", torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vqvae.dtype == torch.bfloat16
    with pytest.raises(LDMKitError, match="LDMTextToImagePipeline"):
        LDMPipeline.from_single_file(checkpoint("txt2img"), config=config("txt2img"), tokenizer=tokenizer())
    assert isinstance(LDMTextToImagePipeline.from_single_file(checkpoint("txt2img"), config=config("txt2img"),
                                                              tokenizer=tokenizer()), LDMTextToImagePipeline)
    with pytest.raises(LDMKitError, match="config.yaml"):
        DiffusionPipeline.from_single_file(checkpoint("uncond"))


def test_text_to_image_tokenizer(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LDMKitError, match="tokenizer="):
        _load("txt2img")
    big = LDMTokenizer({f"t{i}": i for i in range(2000)} | {"[PAD]": 2000, "[UNK]": 2001, "[CLS]": 2002,
                                                            "[SEP]": 2003, "[MASK]": 2004})
    with pytest.raises(LDMKitError, match="not this model's tokenizer"):
        _load("txt2img", tokenizer=big)
    from compvis_fixtures import write_vocab

    pipe = _load("txt2img", tokenizer=str(write_vocab(tmp_path / "vocab")))
    assert pipe.tokenizer.vocab_size == 1000
