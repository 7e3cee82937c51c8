"""The model API a diffusers user's script touches, run side by side with diffusers 0.42.1 (issue 16, items 7
and 8 and the model outputs): gradient checkpointing (same gradients, less memory, used by the trainer),
``num_parameters``, diffusers' config keys, outputs read every way, and diffusers' import path of LDMBert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import diffusers
import pytest
import torch
import torch.utils.checkpoint

import ldmkit
import ldmkit.models
from ldmkit.errors import LDMKitError
from ldmkit.outputs import BaseOutput
from ldmkit.training import build_recipe, train_ldm
from ldmkit.training.checkpoints import checkpoint_dir
from reference_models import save_diffusers
from training_utils import final_weights, ldm_dict, tiny_autoencoder, toy_data

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "ldmkit" / "bundled"

TINY = {
    "UNet2DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, num_class_embeds=3),
    "UNet2DModel": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8),
    "AutoencoderKL": dict(
        latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "VQModel": dict(
        latent_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.0),
}


def pair(name: str, folder: Path):
    """diffusers' tiny ``name`` and ours loaded from the folder diffusers saved it to."""
    theirs = save_diffusers(name, TINY[name], folder)
    return theirs, getattr(ldmkit.models, name).from_pretrained(folder)


def inputs(name: str) -> tuple:
    gen = torch.Generator().manual_seed(0)
    if name == "UNet2DConditionModel":
        return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=gen),
                torch.tensor([0, 2]))
    if name == "UNet2DModel":
        return torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([3, 700])
    return (torch.randn(2, 3, 16, 16, generator=gen).clamp(-1, 1),)


def gradients(model, args) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(*args)[0].square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextmanager
def counting_checkpoints(monkeypatch):
    """Counts the calls of torch.utils.checkpoint.checkpoint (ours and diffusers' both go through it)."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    yield calls
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", original)


# --- gradient checkpointing -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["UNet2DConditionModel", "UNet2DModel", "AutoencoderKL"])
def test_gradient_checkpointing_keeps_the_gradients_as_diffusers(name, tmp_path, monkeypatch):
    theirs, ours = pair(name, tmp_path)
    args = inputs(name)
    plain = gradients(ours, args)
    assert not ours.is_gradient_checkpointing and not theirs.is_gradient_checkpointing
    ours.enable_gradient_checkpointing()
    theirs.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    with counting_checkpoints(monkeypatch) as calls:
        checkpointed = gradients(ours, args)
        assert len(calls) >= 4  # every resnet / attention of every level, not just one block
        calls.clear()
        with torch.no_grad():
            ours(*args)
        assert not calls  # inference is unaffected
    reference = gradients(theirs, args)
    assert plain.keys() == checkpointed.keys() == reference.keys()
    for key in plain:
        assert (plain[key] - checkpointed[key]).abs().max() <= 1e-5, key
        scale = reference[key].abs().max().clamp_min(1e-3)
        assert (checkpointed[key] - reference[key]).abs().max() / scale <= 1e-4, key
    ours.disable_gradient_checkpointing()
    theirs.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing and not theirs.is_gradient_checkpointing


def test_gradient_checkpointing_custom_function_and_models_without_it(tmp_path):
    theirs, ours = pair("VQModel", tmp_path)
    # diffusers' VQModel refuses it (its encoder / decoder could); ours checkpoints the same blocks as the KL one.
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        theirs.enable_gradient_checkpointing()
    args = inputs("VQModel")
    plain = gradients(ours, args)
    seen = []

    def func(module, *module_args):  # diffusers' signature: the part, then its arguments
        seen.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *module_args, use_reentrant=False)

    ours.enable_gradient_checkpointing(func)
    assert ours.is_gradient_checkpointing
    checkpointed = gradients(ours, args)
    assert "ResnetBlock2D" in seen and "Attention" in seen
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    with pytest.raises(LDMKitError, match="does not support gradient checkpointing"):
        ldmkit.models.ClassEmbedder(4, 8).enable_gradient_checkpointing()


def _bench_child(case: str, checkpointing: bool) -> dict:
    script = ROOT / "benchmarks" / "bench_gradient_checkpointing.py"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "--child", case, "--threads", "1"]
    done = subprocess.run(cmd + (["--checkpointing"] if checkpointing else []), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
@pytest.mark.parametrize("case", ["unet2dcondition-emoji-text2img", "ldmbert-emoji-text2img"])
def test_gradient_checkpointing_uses_less_memory(case):
    """The benchmark's measurement on a bundled model's shape, each mode in a fresh process: the forward keeps
    a fraction of the activations for backward, and the whole step peaks lower."""
    plain, checkpointed = _bench_child(case, False), _bench_child(case, True)
    assert plain["grad_abs_sum"] == pytest.approx(checkpointed["grad_abs_sum"], rel=1e-6)
    assert checkpointed["kept_for_backward_mib"] < 0.5 * plain["kept_for_backward_mib"]
    assert checkpointed["peak_step_memory_mib"] < 0.8 * plain["peak_step_memory_mib"]


# --- num_parameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_num_parameters_as_diffusers(name, tmp_path):
    theirs, ours = pair(name, tmp_path)
    for model in (theirs, ours):  # a frozen part, as when fine-tuning
        (model.decoder if hasattr(model, "decoder") else model.time_embedding).requires_grad_(False)
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            kwargs = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    assert ours.num_parameters(only_trainable=True) < ours.num_parameters()
    if name in ("UNet2DConditionModel", "VQModel"):  # class embedding, codebook
        assert ours.num_parameters(exclude_embeddings=True) < ours.num_parameters()


# --- config keys ----------------------------------------------------------------------------------------

def _public(config) -> dict:
    # diffusers' config also holds _class_name / _diffusers_version / _name_or_path; tuples are lists in ours.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _bundled_configs() -> list[tuple[str, Path]]:
    found = []
    for config in sorted(BUNDLED.glob("*/*/config.json")):
        name = json.loads(config.read_text()).get("_class_name")  # LDMBert's is a transformers config
        if name is not None and hasattr(diffusers, name):  # ClassEmbedder is ldmkit's (diffusers has none)
            found.append((name, config))
    return found


CONFIGS = [(name, TINY[name]) for name in TINY] + [
    (name, {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})
    for name, path in _bundled_configs()]


@pytest.mark.parametrize(("name", "config"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_config_has_diffusers_keys_and_values(name, config, tmp_path):
    theirs = getattr(diffusers, name)(**config)
    ours = getattr(ldmkit.models, name)(**config)
    assert _public(ours.config) == _public(theirs.config)
    # diffusers' whole config, _class_name and all, builds the same network (a common diffusers idiom).
    assert getattr(ldmkit.models, name)(**theirs.config).config == ours.config
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert written.keys() == reference.keys()
    assert _public(written) == _public(reference)


@pytest.mark.parametrize("name", list(TINY))
def test_old_files_without_the_keys_still_load_and_get_them(name, tmp_path):
    """A config.json written before the keys joined the config (as the bundled ones were) loads, and the
    model's config then has diffusers' keys."""
    cls = getattr(ldmkit.models, name)
    cls(**TINY[name]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in written.items() if k not in cls._inert_config_keys}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert cls.from_pretrained(tmp_path).config == cls(**TINY[name]).config


@pytest.mark.parametrize(("name", "path"), _bundled_configs(),
                         ids=[f"{p.parent.parent.name}-{p.parent.name}" for _, p in _bundled_configs()])
def test_bundled_folders_load_with_diffusers_config(name, path):
    model = getattr(ldmkit.models, name).from_pretrained(path.parent)
    reference = getattr(diffusers, name).from_config(json.loads(path.read_text()))
    assert _public(model.config) == _public(reference.config)


@pytest.mark.parametrize(("name", "key", "value"), [
    ("UNet2DConditionModel", "class_embed_type", "timestep"),
    ("UNet2DConditionModel", "time_cond_proj_dim", 256),
    ("UNet2DConditionModel", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("UNet2DConditionModel", "addition_embed_type", "text_time"),
    ("UNet2DModel", "time_embedding_type", "fourier"),
    ("VQModel", "norm_type", "spatial"),
])
def test_a_feature_ldmkit_lacks_is_refused(name, key, value, tmp_path):
    cls = getattr(ldmkit.models, name)
    with pytest.raises(LDMKitError, match=key):
        cls(**TINY[name], **{key: value})
    cls(**TINY[name]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(LDMKitError, match=key):
        cls.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="not_a_diffusers_key"):
        cls(**TINY[name], not_a_diffusers_key=1)


# --- outputs --------------------------------------------------------------------------------------------

def _calls(name: str):
    """(label, call) pairs: ``call(model, **kwargs)`` returns a model output."""
    args = inputs(name)
    if name.startswith("UNet"):
        return [("forward", lambda m, **kw: m(*args, **kw))]
    latents = {"AutoencoderKL": torch.randn(2, 4, 8, 8), "VQModel": torch.randn(2, 3, 8, 8)}[name]
    return [("forward", lambda m, **kw: m(*args, **kw)), ("encode", lambda m, **kw: m.encode(*args, **kw)),
            ("decode", lambda m, **kw: m.decode(latents, **kw))]


@pytest.mark.parametrize("name", list(TINY))
def test_model_outputs_read_as_diffusers_outputs(name, tmp_path):
    theirs, ours = pair(name, tmp_path)
    for label, call in _calls(name):
        with torch.no_grad():
            a, b = call(ours), call(theirs)
            plain, their_plain = call(ours, return_dict=False), call(theirs, return_dict=False)
        assert isinstance(a, BaseOutput) and isinstance(a, OrderedDict), label
        assert type(a).__name__ == type(b).__name__ and list(a.keys()) == list(b.keys()), label
        assert len(a.to_tuple()) == len(b.to_tuple()) == len(a), label
        assert type(plain) is type(their_plain) is tuple and len(plain) == len(their_plain), label
        for index, key in enumerate(b.keys()):
            ours_value, their_value = a[key], b[key]
            assert a[index] is ours_value and getattr(a, key) is ours_value and a.to_tuple()[index] is ours_value
            if isinstance(their_value, torch.Tensor):
                assert (ours_value - their_value).abs().max() <= 1e-4, (label, key)
                assert (plain[index] - ours_value).abs().max() == 0, (label, key)
            else:  # the KL posterior
                assert (ours_value.mean - their_value.mean).abs().max() <= 1e-4, (label, key)


def test_ldmbert_output_reads_as_transformers_base_model_output(tiny_text2img_dir):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as TheirBert

    theirs = TheirBert.from_pretrained(tiny_text2img_dir / "bert").eval()
    ours = ldmkit.LDMBertModel.from_pretrained(tiny_text2img_dir / "bert")
    ids = torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
        assert list(a.keys()) == list(b.keys()) == ["last_hidden_state"] and len(a) == len(b) == 1
        assert (a[0] - b[0]).abs().max() <= 1e-4 and a["last_hidden_state"] is a.last_hidden_state is a[0]
        assert a.hidden_states is None is b.hidden_states and a.attentions is None is b.attentions
        with pytest.raises(KeyError):
            a["hidden_states"]
        assert list(a) == list(b) and len(a.to_tuple()) == len(b.to_tuple()) == 1
        plain, their_plain = ours(ids, return_dict=False), theirs(ids, return_dict=False)
        assert type(plain) is type(their_plain) is tuple and len(plain) == len(their_plain) == 1
        full, their_full = ours(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
        assert list(full.keys()) == list(their_full.keys()) == ["last_hidden_state", "hidden_states"]
        assert len(full.hidden_states) == len(their_full.hidden_states) == ours.config.encoder_layers + 1
        for x, y in zip(full.hidden_states, their_full.hidden_states, strict=True):
            assert (x - y).abs().max() <= 1e-4
    assert ours.num_parameters() == theirs.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)
    ours.gradient_checkpointing_enable()  # transformers' spelling, which diffusers' LDMBert inherits
    assert ours.is_gradient_checkpointing
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_latent_diffusion_import_path_is_diffusers():
    import diffusers.pipelines.latent_diffusion as theirs

    import ldmkit.pipelines.latent_diffusion as ours
    from ldmkit.pipelines.latent_diffusion import LDMBertModel, LDMSuperResolutionPipeline, LDMTextToImagePipeline
    from ldmkit.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as FromModule

    assert LDMBertModel is FromModule is ldmkit.LDMBertModel
    assert LDMTextToImagePipeline is ldmkit.LDMTextToImagePipeline
    assert LDMSuperResolutionPipeline is ldmkit.LDMSuperResolutionPipeline
    exported = {"LDMBertModel", "LDMTextToImagePipeline", "LDMSuperResolutionPipeline"}
    assert all(hasattr(theirs, n) for n in exported) and set(ours.__all__) == exported


# --- the trainer ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_gradient_checkpointing_changes_no_weight_and_resumes_bit_identically(tmp_path, monkeypatch):
    """``train.gradient_checkpointing: true`` checkpoints the UNet and LDMBert (with dropout, so the replayed
    RNG matters) and ends with exactly the weights of the same run without it; a run resumed from its
    checkpoint ends with exactly the same weights too."""
    data, ae = toy_data(tmp_path / "toy"), tiny_autoencoder(tmp_path / "ae", levels=3)

    def recipe(name: str, checkpointing: bool, tokenizer: Path | None = None):
        config = ldm_dict(data, ae, tmp_path / name, max_steps=4, checkpoint_every=2, warmup_steps=1)
        config["train"]["gradient_checkpointing"] = checkpointing
        config["unet"]["dropout"] = config["text"]["dropout"] = 0.1
        config["text"]["tokenizer"] = None if tokenizer is None else str(tokenizer)
        return build_recipe("ldm", config)

    with counting_checkpoints(monkeypatch) as calls:
        plain = final_weights(train_ldm(recipe("plain", False)))
        assert not calls
        vocabulary = tmp_path / "plain" / "tokenizer"  # the same vocabulary in every run
        checkpointed = final_weights(train_ldm(recipe("checkpointed", True, vocabulary)))
        assert calls
        calls.clear()
        step_2 = checkpoint_dir(tmp_path / "checkpointed", 2)
        resumed = final_weights(train_ldm(recipe("resumed", True, vocabulary), resume=str(step_2)))
        assert calls
    assert plain.keys() == checkpointed.keys() == resumed.keys()
    assert [k for k in plain if not torch.equal(plain[k], checkpointed[k])] == []
    assert [k for k in plain if not torch.equal(resumed[k], checkpointed[k])] == []
