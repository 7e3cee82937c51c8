"""Original CompVis checkpoints (a Lightning ``.ckpt`` plus its YAML) as pipelines: the loader behind
``DiffusionPipeline.from_single_file``.

The low layer reads them as data: ``loading.compvis_config`` turns the YAML into a :class:`CompVisSpec`
(family, diffusers configs), ``loading.compvis_checkpoint`` sorts the state dict by component, and the key
tables (``compvis_unet``, ``compvis_first_stage``, ``compvis_text``) rename it. This module builds the models
from those, adds the original DDIM sampler (:meth:`DDIMScheduler.compvis`) and, for text-to-image, BERT's
tokenizer, and hands them to the pipeline that registered the family (``compvis_family=`` on its class).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..errors import LDMKitError
from ..loading.compvis_checkpoint import read_checkpoint, split_checkpoint
from ..loading.compvis_config import BERT_VOCAB_REPO, CompVisSpec, parse_config, read_config
from ..loading.compvis_first_stage import first_stage_rules
from ..loading.compvis_keys import KeyTable, Rule
from ..loading.compvis_text import bert_rules, class_embedder_config, class_embedder_rules, ldmbert_config
from ..loading.compvis_unet import unet_rules
from ..loading.hub import resolve_folder
from ..models import ClassEmbedder, LDMBertModel
from ..pipelines import DiffusionPipeline
from ..registry import COMPONENTS, COMPVIS_FAMILIES, register_loader
from ..schedulers import DDIMScheduler
from ..tokenizer import LDMTokenizer


def _build(cls, config: dict, rules: list[Rule], component: str, prefix: str, state: dict, torch_dtype):
    with torch.device("meta"):
        expected = cls.from_config(config).state_dict()
    converted = KeyTable(component, prefix, rules).convert(state, expected)
    return cls.from_state_dict(config, converted, torch_dtype=torch_dtype, source=f"the checkpoint's {component}")


def _model_class(diffusers_name: str) -> type:
    """The ldmkit class of a diffusers model name the spec gives (AutoencoderKL, VQModel, UNet2D...Model)."""
    cls = COMPONENTS.get(("diffusers", diffusers_name))
    assert cls is not None, f"compvis_config maps onto {diffusers_name}, which no ldmkit model registers"
    return cls


def _tokenizer(tokenizer, max_length: int, vocab_size: int) -> LDMTokenizer:
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


def _conditioning(spec: CompVisSpec, parts: dict, torch_dtype, tokenizer) -> dict:
    """The family's conditioning components: BERT and its tokenizer, or the class embedder, or none."""
    if spec.family == "text-to-image":
        config = ldmbert_config(spec.cond_stage)
        bert = _build(LDMBertModel, config, bert_rules(config), "text encoder", "cond_stage_model.",
                      parts["cond_stage"], torch_dtype)
        return {"bert": bert, "tokenizer": _tokenizer(tokenizer, config["max_position_embeddings"],
                                                      config["vocab_size"])}
    if spec.family == "class-conditional":
        return {"class_embedder": _build(ClassEmbedder, class_embedder_config(spec.cond_stage),
                                         class_embedder_rules(), "class embedder", "cond_stage_model.",
                                         parts["cond_stage"], torch_dtype)}
    return {}


def load_compvis_pipeline(checkpoint: str | os.PathLike | Mapping, config, use_ema: bool | None = None,
                          torch_dtype=None, tokenizer=None) -> DiffusionPipeline:
    """Build the pipeline of an original CompVis checkpoint (see ``loading.compvis_config`` for the families).

    ``use_ema``: None uses the EMA weights when the YAML enables EMA (its default) and the file has them, as
    the original sampling scripts do; True requires them; False uses the live weights.
    ``tokenizer`` (text-to-image only): an LDMTokenizer or a folder / Hub id with BERT's ``vocab.txt``;
    None fetches bert-base-uncased's vocabulary, as the original BERTTokenizer does.
    """
    spec = parse_config(read_config(config))
    parts, scale_factor, _ = split_checkpoint(read_checkpoint(checkpoint), spec, use_ema)
    fs_config = {**spec.first_stage_config, "scaling_factor": scale_factor}
    vqvae = _build(_model_class(spec.first_stage_class), fs_config,
                   first_stage_rules(fs_config, vq=spec.first_stage_class == "VQModel"), "first stage",
                   "first_stage_model.", parts["first_stage"], torch_dtype)
    unet = _build(_model_class(spec.unet_class), spec.unet_config, unet_rules(spec.unet), "UNet",
                  "model.diffusion_model.", parts["unet"], torch_dtype)
    scheduler = DDIMScheduler.compvis(beta_schedule="scaled_linear", **spec.scheduler_config)
    pipeline_cls = COMPVIS_FAMILIES.get(spec.family)
    assert pipeline_cls is not None, f"no pipeline registers compvis_family={spec.family!r}"
    return pipeline_cls(vqvae=vqvae, unet=unet, scheduler=scheduler,
                        **_conditioning(spec, parts, torch_dtype, tokenizer))


@register_loader("from_single_file")
def load_single_file(cls: type[DiffusionPipeline], path, *, config, use_ema, torch_dtype,
                     tokenizer) -> DiffusionPipeline:
    """``cls.from_single_file(...)``: the checkpoint's pipeline, which must be a ``cls``, sampling with the
    original samplers' noise stream (a draw at every step), so that seeds reproduce theirs."""
    pipe = load_compvis_pipeline(path, config, use_ema=use_ema, torch_dtype=torch_dtype, tokenizer=tokenizer)
    if cls is not DiffusionPipeline and not isinstance(pipe, cls):
        raise LDMKitError(f"{path} with this config is a {type(pipe).__name__}, not a {cls.__name__}. "
                          f"Load it with {type(pipe).__name__} or DiffusionPipeline.")
    pipe.draw_noise_every_step = True
    pipe._name_or_path = path if isinstance(path, str | os.PathLike) else None  # not a state dict in memory
    return pipe
