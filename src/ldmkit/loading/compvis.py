"""Original CompVis latent-diffusion checkpoints (a Lightning ``.ckpt`` plus its OmegaConf YAML) as pipelines.

The YAML is read with ``yaml.safe_load``; no ``target:`` is imported or run. Its ``LatentDiffusion`` section
is mapped onto ldmkit's models, and the checkpoint's keys are renamed by the explicit tables of
``compvis_unet`` (UNet), ``compvis_first_stage`` (autoencoder) and ``compvis_text`` (BERT, class embedder).
Five families are recognised by their conditioning (the published configs they come from):

===================  ===============================  ===============================================
family               conditioning                     pipeline
===================  ===============================  ===============================================
text-to-image        BERTEmbedder, crossattn          LDMTextToImagePipeline (txt2img-1p4B)
super-resolution     torch.nn.Identity, concat        LDMSuperResolutionPipeline (bsr_sr)
unconditional        __is_unconditional__             LDMPipeline (celeba256, ffhq, lsun, ...)
class-conditional    ClassEmbedder, crossattn         LDMClassConditionalPipeline (cin256)
inpainting           __is_first_stage__, concat       LDMInpaintPipeline (inpainting_big)
===================  ===============================  ===============================================

The sampler is the original DDIM: :meth:`DDIMScheduler.compvis` with the YAML's ``linear_start`` /
``linear_end`` (timesteps ``0, k, 2k, ... + 1``, last step against ``alphas_cumprod[0]``); PLMS is
``PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LDMKitError
from .compvis_checkpoint import read_checkpoint, split_checkpoint
from .compvis_first_stage import diffusers_first_stage_config, first_stage_rules
from .compvis_keys import KeyTable, Rule
from .compvis_text import (
    BERT_TARGET,
    CLASS_TARGET,
    bert_rules,
    class_embedder_config,
    class_embedder_rules,
    ldmbert_config,
)
from .compvis_unet import AdmUNet, diffusers_unet_config, parse_unet, unet_rules

LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
PIPELINES = {"text-to-image": "LDMTextToImagePipeline", "super-resolution": "LDMSuperResolutionPipeline",
             "unconditional": "LDMPipeline", "class-conditional": "LDMClassConditionalPipeline",
             "inpainting": "LDMInpaintPipeline"}
_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample"}
BERT_VOCAB_REPO = "bert-base-uncased"  # BERTTokenizer's vocabulary, not part of the checkpoint


# ----------------------------------------------------------------------------------------- reading
def read_config(config) -> dict:
    """A YAML file (path), YAML text already parsed (a dict), read with ``yaml.safe_load`` only."""
    if isinstance(config, Mapping):
        return dict(config)
    if config is None:
        raise LDMKitError("An original CompVis checkpoint needs its YAML config: pass config='config.yaml' "
                          "(the file shipped beside model.ckpt, e.g. models/ldm/<name>/config.yaml).")
    try:
        import yaml
    except ModuleNotFoundError:
        raise LDMKitError("Reading a CompVis config.yaml needs PyYAML: pip install pyyaml.") from None
    path = Path(config).expanduser()
    if not path.is_file():
        raise LDMKitError(f"Config file {path} does not exist. Pass the config.yaml of the checkpoint.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LDMKitError(f"{path} is not a plain YAML config ({e.__class__.__name__}: {e}). Only data is "
                          "read (yaml.safe_load): tags that build Python objects are refused.") from None
    if not isinstance(data, dict):
        raise LDMKitError(f"{path} must hold a YAML mapping with a 'model' section.")
    return data


# ----------------------------------------------------------------------------------------- the YAML
@dataclass(frozen=True)
class CompVisSpec:
    """What the YAML says about the model, mapped onto ldmkit classes and configs."""

    family: str
    unet: AdmUNet
    unet_class: str
    unet_config: dict
    first_stage_class: str
    first_stage_config: dict
    cond_stage: dict | str | None
    scheduler_config: dict
    use_ema: bool
    scale_by_std: bool
    learn_logvar: bool


def parse_config(config: dict) -> CompVisSpec:
    model = config.get("model")
    if not isinstance(model, dict):
        raise LDMKitError("The config has no 'model' section; pass the CompVis config.yaml of the checkpoint.")
    target = model.get("target")
    if target != LDM_TARGET:
        raise LDMKitError(f"model target {target!r} is not supported; ldmkit loads latent diffusion models "
                          f"({LDM_TARGET}).")
    p = dict(model.get("params") or {})
    if p.get("beta_schedule", "linear") != "linear" or p.get("given_betas") is not None:
        raise LDMKitError(f"beta_schedule {p.get('beta_schedule')!r} / given_betas is not supported; ldmkit "
                          "loads the 'linear' schedule of the published LDMs.")
    parameterization = p.get("parameterization", "eps")
    if parameterization not in _PREDICTION_TYPES:
        raise LDMKitError(f"parameterization {parameterization!r} is not supported (eps or x0).")
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in p:
            raise LDMKitError(f"The config's model.params lacks {key!r}.")
    scale_factor = float(p.get("scale_factor", 1.0))
    unet = parse_unet(p["unet_config"])
    unet_class, unet_config = diffusers_unet_config(unet)
    fs_class, fs_config = diffusers_first_stage_config(p["first_stage_config"], scale_factor)
    cond = p["cond_stage_config"]
    key = p.get("conditioning_key") or ("concat" if p.get("concat_mode", True) else "crossattn")
    if cond == "__is_unconditional__":
        key = None
    latent = fs_config.get("vq_embed_dim") or fs_config["latent_channels"]
    if unet.out_channels != latent:
        raise LDMKitError(f"The UNet predicts {unet.out_channels} channels but the first stage's latent has "
                          f"{latent}; the config is inconsistent.")
    family = _family(cond, key, unet, latent)
    timesteps = int(p.get("timesteps", 1000))
    scheduler = {"num_train_timesteps": timesteps, "beta_start": float(p.get("linear_start", 1e-4)),
                 "beta_end": float(p.get("linear_end", 2e-2)),
                 "prediction_type": _PREDICTION_TYPES[parameterization]}
    return CompVisSpec(family, unet, unet_class, unet_config, fs_class, fs_config, cond, scheduler,
                       use_ema=bool(p.get("use_ema", True)), scale_by_std=bool(p.get("scale_by_std", False)),
                       learn_logvar=bool(p.get("learn_logvar", False)))


def _family(cond, key, unet: AdmUNet, latent: int) -> str:
    if key not in (None, "concat", "crossattn"):
        raise LDMKitError(f"conditioning_key {key!r} is not supported (concat and crossattn are).")
    if cond == "__is_unconditional__":
        _require(not unet.spatial_transformer and unet.in_channels == latent, "an unconditional model")
        return "unconditional"
    if cond == "__is_first_stage__":
        # inpainting_big: concat of [first-stage latent of the masked image, mask at latent size].
        _require(key == "concat" and unet.in_channels == 2 * latent + 1,
                 "first-stage conditioning other than inpainting ([x, masked-image latent, mask])")
        return "inpainting"
    target = cond.get("target") if isinstance(cond, dict) else cond
    if target == BERT_TARGET:
        _require(key == "crossattn" and unet.spatial_transformer, "a BERTEmbedder without cross-attention")
        return "text-to-image"
    if target == CLASS_TARGET:
        _require(key == "crossattn" and unet.spatial_transformer, "a ClassEmbedder without cross-attention")
        return "class-conditional"
    if target == "torch.nn.Identity":
        _require(key == "concat" and unet.in_channels == latent + 3, "identity conditioning other than "
                 "super-resolution ([x, low-resolution RGB image])")
        return "super-resolution"
    raise LDMKitError(f"cond_stage_config target {target!r} is not supported. ldmkit loads {BERT_TARGET}, "
                      f"{CLASS_TARGET}, torch.nn.Identity (super-resolution), __is_first_stage__ (inpainting) "
                      "and __is_unconditional__.")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise LDMKitError(f"The config describes {what}, which ldmkit does not support.")


# ----------------------------------------------------------------------------------------- building
def _build(cls, config: dict, rules: list[Rule], component: str, prefix: str, state: dict, torch_dtype):
    with torch.device("meta"):
        expected = cls.from_config(config).state_dict()
    converted = KeyTable(component, prefix, rules).convert(state, expected)
    return cls.from_state_dict(config, converted, torch_dtype=torch_dtype, source=f"the checkpoint's {component}")


def _tokenizer(tokenizer, max_length: int, vocab_size: int):
    from ..tokenizer import LDMTokenizer
    from .hub import resolve_folder

    if tokenizer is None:
        patterns = ["vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"]
        try:
            folder = resolve_folder(BERT_VOCAB_REPO, allow_patterns=patterns)
        except LDMKitError as e:
            raise LDMKitError("The text-to-image model tokenizes with BERT's vocabulary (bert-base-uncased), "
                              f"which is not in the checkpoint and could not be fetched ({e}). Pass "
                              "tokenizer=<folder with vocab.txt> (or --tokenizer DIR).") from None
        tokenizer = folder
    if not isinstance(tokenizer, LDMTokenizer):
        tokenizer = LDMTokenizer.from_pretrained(tokenizer, model_max_length=max_length)
    if tokenizer.vocab_size > vocab_size:
        raise LDMKitError(f"The tokenizer has {tokenizer.vocab_size} tokens but the text encoder only "
                          f"{vocab_size} embeddings: it is not this model's tokenizer.")
    return tokenizer


def load_compvis_pipeline(checkpoint: str | os.PathLike | Mapping, config, use_ema: bool | None = None,
                          torch_dtype=None, tokenizer=None):
    """Build the pipeline of an original CompVis checkpoint (see the module docstring for the families).

    ``use_ema``: None uses the EMA weights when the YAML enables EMA (its default) and the file has them, as
    the original sampling scripts do; True requires them; False uses the live weights.
    ``tokenizer`` (text-to-image only): an LDMTokenizer or a folder / Hub id with BERT's ``vocab.txt``;
    None fetches bert-base-uncased's vocabulary, as the original BERTTokenizer does.
    """
    from .. import models, pipelines
    from ..schedulers import DDIMScheduler

    spec = parse_config(read_config(config))
    parts, scale_factor, _ = split_checkpoint(read_checkpoint(checkpoint), spec, use_ema)
    fs_config = {**spec.first_stage_config, "scaling_factor": scale_factor}
    vqvae = _build(getattr(models, spec.first_stage_class), fs_config,
                   first_stage_rules(fs_config, vq=spec.first_stage_class == "VQModel"), "first stage",
                   "first_stage_model.", parts["first_stage"], torch_dtype)
    unet = _build(getattr(models, spec.unet_class), spec.unet_config, unet_rules(spec.unet), "UNet",
                  "model.diffusion_model.", parts["unet"], torch_dtype)
    scheduler = DDIMScheduler.compvis(beta_schedule="scaled_linear", **spec.scheduler_config)
    components = {"vqvae": vqvae, "unet": unet, "scheduler": scheduler}
    if spec.family == "text-to-image":
        bert_config = ldmbert_config(spec.cond_stage)
        components["bert"] = _build(models.LDMBertModel, bert_config, bert_rules(bert_config), "text encoder",
                                    "cond_stage_model.", parts["cond_stage"], torch_dtype)
        components["tokenizer"] = _tokenizer(tokenizer, bert_config["max_position_embeddings"],
                                             bert_config["vocab_size"])
    elif spec.family == "class-conditional":
        components["class_embedder"] = _build(models.ClassEmbedder, class_embedder_config(spec.cond_stage),
                                              class_embedder_rules(), "class embedder", "cond_stage_model.",
                                              parts["cond_stage"], torch_dtype)
    return getattr(pipelines, PIPELINES[spec.family])(**components)
