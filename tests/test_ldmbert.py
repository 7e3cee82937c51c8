"""LDMBertModel loads diffusers' LDMBert folders, matches its outputs and writes folders it reads."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ldmkit.errors import LDMKitError
from ldmkit.models.ldmbert import LDMBertModel

latent_diffusion = pytest.importorskip("diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion")

TINY = dict(d_model=32, encoder_attention_heads=2, head_dim=16, encoder_ffn_dim=37, encoder_layers=2,
            vocab_size=100)


def diffusers_bert(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return latent_diffusion.LDMBertModel(latent_diffusion.LDMBertConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    diffusers_bert().save_pretrained(str(folder))
    return folder


def token_ids(batch: int = 3, length: int = 77, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=generator)


def reference_output(folder, ids, **kwargs) -> torch.Tensor:
    model = latent_diffusion.LDMBertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(ids, **kwargs)[0]


def test_matches_diffusers(reference_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        ours = LDMBertModel.from_pretrained(reference_folder)
    assert caplog.text == ""  # transformers' generic config keys are accepted silently
    assert not ours.training and ours.dtype == torch.float32
    ids = token_ids()
    with torch.no_grad():
        out = ours(ids)
    expected = reference_output(reference_folder, ids)
    assert out.last_hidden_state.shape == (3, 77, 32)
    assert out[0] is out.last_hidden_state and out["last_hidden_state"] is out[0]
    assert (out[0] - expected).abs().max().item() <= 1e-5
    # Shorter inputs and an attention mask behave as in diffusers too.
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        masked = ours(ids[:, :10], attention_mask=mask)[0]
    assert (masked - reference_output(reference_folder, ids[:, :10], attention_mask=mask)).abs().max() <= 1e-5


def test_save_pretrained_is_read_by_diffusers(reference_folder, tmp_path):
    ours = LDMBertModel.from_pretrained(reference_folder)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ldmbert" and config["architectures"] == ["LDMBertModel"]
    assert "transformers_version" in config and "_class_name" not in config
    ids = token_ids(seed=2)
    with torch.no_grad():
        ours_out = ours(ids)[0]
    assert (reference_output(tmp_path, ids) - ours_out).abs().max().item() <= 1e-5
    again = LDMBertModel.from_pretrained(tmp_path)
    assert dict(again.config) == dict(ours.config)
    # Pickled weights go where transformers looks for them.
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (reference_output(tmp_path / "bin", ids) - ours_out).abs().max().item() <= 1e-5


def test_pytorch_model_bin_loads(tmp_path):
    reference = diffusers_bert(seed=3)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    reference.config.to_json_file(str(tmp_path / "config.json"))
    ours = LDMBertModel.from_pretrained(tmp_path)
    ids = token_ids(seed=4)
    with torch.no_grad():
        assert (ours(ids)[0] - reference(ids)[0]).abs().max().item() <= 1e-5


def test_mismatched_weights_raise(reference_folder, tmp_path):
    config = json.loads((reference_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "encoder_ffn_dim": 40}))
    (tmp_path / "model.safetensors").write_bytes((reference_folder / "model.safetensors").read_bytes())
    with pytest.raises(LDMKitError, match="fc1.weight"):
        LDMBertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "encoder_layers": 3}))
    with pytest.raises(LDMKitError, match="missing"):
        LDMBertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(LDMKitError, match="not LDMBert"):
        LDMBertModel.from_pretrained(tmp_path)


def test_too_long_input_raises(reference_folder):
    ours = LDMBertModel.from_pretrained(reference_folder)
    with pytest.raises(LDMKitError, match="at most 77 tokens"):
        ours(token_ids(length=78))


def test_dropout_only_in_training_and_checkpointing_keeps_gradients(reference_folder):
    ours = LDMBertModel.from_pretrained(reference_folder)
    ids = token_ids(batch=2, length=12)
    with torch.no_grad():
        assert torch.equal(ours(ids)[0], ours(ids)[0])
    ours.train()
    torch.manual_seed(0)
    plain = ours(ids)[0]
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    torch.manual_seed(0)
    checkpointed = ours(ids)[0]
    checkpointed.square().mean().backward()
    assert torch.allclose(plain, checkpointed)
    for before, p in zip(grads, [p for p in ours.parameters() if p.grad is not None]):
        assert torch.allclose(before, p.grad, atol=1e-6)
