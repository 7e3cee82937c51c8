"""LDMBert: the text encoder of CompVis/ldm-text2im-large-256.

A BART-style encoder with LayerNorm *before* each sub-block (pre-LN), learned absolute positions and a
final LayerNorm. The published folder is a transformers one (``bert/config.json`` in transformers'
``PretrainedConfig`` layout, ``model.safetensors`` or ``pytorch_model.bin``); parameter names equal
diffusers' ``LDMBertModel`` state_dict keys.

Prompts are padded to 77 tokens and the padding is attended, as in the original model, so no attention
mask is needed (one may still be passed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError
from ..outputs import BaseOutput
from .checkpointing import Checkpointed
from .embeddings import lookup_table
from .modeling_utils import ModelMixin

# The transformers release whose config.json layout we write; its LDMBert fields are unchanged since 4.21.
TRANSFORMERS_LAYOUT_VERSION = "4.46.3"

# transformers' generic PretrainedConfig keys: they carry no architecture, so they are dropped silently.
_TRANSFORMERS_GENERIC_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "num_hidden_layers", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_word_embeddings", "tie_encoder_decoder", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "torchscript", "pruned_heads", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "use_bfloat16", "keys_to_ignore_at_inference", "gradient_checkpointing",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
})
# transformers' attribute_map of LDMBertConfig: generic names that alias LDMBert's own fields.
_CONFIG_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class LDMBertOutput(BaseOutput):
    """transformers' ``BaseModelOutput``, which diffusers' LDMBert returns: read as ``out.last_hidden_state``,
    ``out[0]``, ``out["last_hidden_state"]`` or ``out.to_tuple()`` (diffusers' pipeline does ``bert(ids)[0]``).
    ``hidden_states`` (with ``output_hidden_states=True``) holds the input of each layer and the final output;
    ``attentions`` is always None (the attention runs in SDPA, which does not return its weights)."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class LDMBertAttention(nn.Module):
    """Multi-head self-attention; q/k/v have no bias, the output projection has one (as BART)."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        # SDPA's default scale is head_dim**-0.5, the scaling BART applies to q.
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x)),
            attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class LDMBertEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, ffn_dim: int, activation: str,
                 dropout: float, attention_dropout: float, activation_dropout: float):
        super().__init__()
        self.self_attn = LDMBertAttention(d_model, num_heads, head_dim, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.activation = _ACTIVATIONS[activation]
        self.dropout = dropout
        self.activation_dropout = activation_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.activation(self.fc1(self.final_layer_norm(x)))
        h = F.dropout(h, self.activation_dropout, self.training)
        x = x + F.dropout(self.fc2(h), self.dropout, self.training)
        if x.dtype == torch.float16:
            # As BART: keep fp16 overflow finite. Clamping always (instead of only when an inf appears)
            # changes nothing for finite values and avoids a device-to-host sync per layer.
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class LDMBertEncoder(Checkpointed, nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, d_model: int, num_layers: int, layer_kwargs: dict,
                 dropout: float):
        super().__init__()
        self.embed_tokens = lookup_table(vocab_size, d_model)
        self.embed_positions = lookup_table(max_positions, d_model)
        self.layers = nn.ModuleList([LDMBertEncoderLayer(d_model, **layer_kwargs) for _ in range(num_layers)])
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None, keep_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The final hidden states and, with ``keep_states``, each layer's input and the final states."""
        # Positions are computed here, not kept in a buffer, so the checkpoint's keys load strictly.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        x = F.dropout(x, self.dropout, self.training)
        states = []
        for layer in self.layers:
            states.append(x)
            x = self.run_part(layer, x, mask)
        x = self.layer_norm(x)
        return x, ((*states, x) if keep_states else None)


# diffusers keeps LDMBertModel in its latent_diffusion pipeline package, so model_index.json says so.
class LDMBertModel(ModelMixin, library="latent_diffusion"):
    """The LDMBert text encoder; ``forward(input_ids)`` gives ``.last_hidden_state`` ``[B, L, d_model]``.

    ``to_logits`` (the masked-LM head, 39M parameters in the published model) is unused at inference but
    kept so that the checkpoint loads strictly and saves back unchanged.
    """

    config_name = "config.json"
    # transformers' names: model.safetensors, pytorch_model.bin (ModelMixin.save_pretrained writes the first
    # stem as safetensors and the last as a pickle).
    weights_stems = ("model", "pytorch_model")
    _supports_gradient_checkpointing = True
    # transformers' BART ignores these fairseq leftovers when loading.
    _ignored_checkpoint_keys = (r".*encoder\.version", r".*decoder\.version")

    def __init__(
        self,
        vocab_size: int = 30522,
        max_position_embeddings: int = 77,
        encoder_layers: int = 32,
        encoder_ffn_dim: int = 5120,
        encoder_attention_heads: int = 8,
        head_dim: int = 64,
        encoder_layerdrop: float = 0.0,
        activation_function: str = "gelu",
        d_model: int = 1280,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        init_std: float = 0.02,
        classifier_dropout: float = 0.0,
        scale_embedding: bool = False,
        pad_token_id: int = 0,
    ):
        # encoder_layerdrop, classifier_dropout, scale_embedding and pad_token_id are kept for the config's
        # round trip only: diffusers' LDMBert never uses them (it does not scale embeddings), nor do we.
        super().__init__()
        self.register_config(locals())
        if activation_function not in _ACTIVATIONS:
            raise LDMKitError(f"LDMBertModel: activation_function={activation_function!r} is not supported "
                              f"(use one of {', '.join(sorted(_ACTIVATIONS))}).")
        layer_kwargs = dict(num_heads=encoder_attention_heads, head_dim=head_dim, ffn_dim=encoder_ffn_dim,
                            activation=activation_function, dropout=dropout,
                            attention_dropout=attention_dropout, activation_dropout=activation_dropout)
        self.model = LDMBertEncoder(vocab_size, max_position_embeddings, d_model, encoder_layers,
                                    layer_kwargs, dropout)
        self.to_logits = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init for a model trained from scratch (a no-op on the meta device used for loading).
        if isinstance(module, nn.Linear | nn.Embedding) and not module.weight.is_meta:
            module.weight.data.normal_(0.0, self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def gradient_checkpointing_enable(self) -> None:
        """transformers' name of :meth:`enable_gradient_checkpointing` (diffusers' LDMBert is a transformers
        model)."""
        self.enable_gradient_checkpointing()

    def gradient_checkpointing_disable(self) -> None:
        self.disable_gradient_checkpointing()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None
                ) -> LDMBertOutput | tuple:
        """Encode token ids ``[B, L]`` (L <= max_position_embeddings). ``attention_mask`` (1 = attend) is
        optional: the published pipeline attends to the padding. ``output_hidden_states`` and
        ``return_dict`` (default True: an :class:`LDMBertOutput`, else a tuple of its set fields) as
        transformers'."""
        if input_ids.ndim != 2:
            raise LDMKitError("LDMBertModel expects input_ids of shape [batch, length], "
                              f"got {tuple(input_ids.shape)}.")
        length, limit = input_ids.shape[1], self.config.max_position_embeddings
        if length > limit:
            raise LDMKitError(f"LDMBertModel reads at most {limit} tokens, got {length}. Tokenize with "
                              f"truncation=True and max_length={limit}.")
        mask = None
        if attention_mask is not None:
            # Additive mask [B, 1, 1, L], as transformers: masked keys get the dtype's lowest value.
            dtype = self.model.embed_tokens.weight.dtype
            blocked = attention_mask[:, None, None, :].to(device=input_ids.device) == 0
            mask = torch.zeros(blocked.shape, dtype=dtype, device=input_ids.device)
            mask = mask.masked_fill(blocked, torch.finfo(dtype).min)
        hidden, states = self.model(input_ids, mask, keep_states=bool(output_hidden_states))
        output = LDMBertOutput(last_hidden_state=hidden, hidden_states=states)
        return output if return_dict is None or return_dict else output.to_tuple()

    @classmethod
    def _split_config(cls, config) -> tuple[dict, dict]:
        config = dict(config)
        model_type = config.get("model_type")
        if model_type is not None and model_type != "ldmbert":
            raise LDMKitError(f"This config.json is for a {model_type!r} model, not LDMBert (model_type "
                              "'ldmbert'). Load it with the matching text-encoder class.")
        for alias, name in _CONFIG_ALIASES.items():
            if alias in config:
                config.setdefault(name, config.pop(alias))
        config = {k: v for k, v in config.items() if k not in _TRANSFORMERS_GENERIC_KEYS}
        return super()._split_config(config)

    def config_to_json(self) -> str:
        """A transformers config.json, which transformers/diffusers' LDMBertModel.from_pretrained reads."""
        data: dict[str, Any] = dict(self.config)
        data.update(
            architectures=["LDMBertModel"],
            model_type="ldmbert",
            num_hidden_layers=self.config.encoder_layers,
            use_cache=True,
            torch_dtype=str(self.dtype).removeprefix("torch."),
            transformers_version=TRANSFORMERS_LAYOUT_VERSION,
        )
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


__all__ = ["LDMBertModel", "LDMBertOutput"]
