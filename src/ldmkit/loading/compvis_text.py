"""The original conditioning stages with weights: ``BERTEmbedder`` (an x-transformers encoder) as
:class:`LDMBertModel`, and ``ClassEmbedder`` as :class:`ClassEmbedder`."""

from __future__ import annotations

from ..errors import LDMKitError
from .compvis_keys import WHOLE, Rule

BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"

# x-transformers Attention -> BART-style attention; FeedForward net = [Sequential(Linear, GELU), Dropout, Linear].
BERT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
BERT_FEED_FORWARD = {"net.0.0": "fc1", "net.2": "fc2"}

# x-transformers' Encoder defaults that BERTEmbedder does not change: 8 heads of 64, feed-forward x4.
_HEADS, _HEAD_DIM, _FF_MULT = 8, 64, 4


def ldmbert_config(cond_stage_config: dict) -> dict:
    """LDMBertModel config for a ``BERTEmbedder(n_embed, n_layer, vocab_size, max_seq_len)``."""
    params = dict(cond_stage_config.get("params") or {})
    try:
        n_embed, n_layer = int(params["n_embed"]), int(params["n_layer"])
    except KeyError as e:
        raise LDMKitError(f"cond_stage_config (BERTEmbedder) lacks {e.args[0]!r}.") from None
    # embedding_dropout and the tokenizer flags change nothing at inference.
    return {"vocab_size": int(params.get("vocab_size", 30522)), "max_position_embeddings": int(params.get(
        "max_seq_len", 77)), "encoder_layers": n_layer, "encoder_ffn_dim": _FF_MULT * n_embed,
        "encoder_attention_heads": _HEADS, "head_dim": _HEAD_DIM, "d_model": n_embed, "dropout": 0.0,
        "activation_function": "gelu"}


def bert_rules(config: dict) -> list[Rule]:
    """The key table of ``cond_stage_model.transformer.*``: layers alternate attention (2i) and
    feed-forward (2i + 1), each ``[LayerNorm, block, residual]`` (pre-norm)."""
    rules = [Rule("transformer.token_emb", "model.embed_tokens", WHOLE),
             Rule("transformer.pos_emb.emb", "model.embed_positions", WHOLE),
             Rule("transformer.norm", "model.layer_norm", WHOLE),
             Rule("transformer.to_logits", "to_logits", WHOLE)]
    for i in range(config["encoder_layers"]):
        attn, ff = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
        rules += [Rule(f"{attn}.0", f"model.layers.{i}.self_attn_layer_norm", WHOLE),
                  Rule(f"{attn}.1", f"model.layers.{i}.self_attn", BERT_ATTENTION),
                  Rule(f"{ff}.0", f"model.layers.{i}.final_layer_norm", WHOLE),
                  Rule(f"{ff}.1", f"model.layers.{i}", BERT_FEED_FORWARD)]
    return rules


def class_embedder_config(cond_stage_config: dict) -> dict:
    params = dict(cond_stage_config.get("params") or {})
    if "embed_dim" not in params:
        raise LDMKitError("cond_stage_config (ClassEmbedder) lacks 'embed_dim'.")
    return {"n_classes": int(params.get("n_classes", 1000)), "embed_dim": int(params["embed_dim"])}


def class_embedder_rules() -> list[Rule]:
    return [Rule("embedding", "embedding", WHOLE)]
