"""Attention blocks: the transformer block and the spatial transformer, and the models' attention API.

The attention layer itself and its processors are in :mod:`ldmkit.models.attention_processor` (diffusers'
layout); by default attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused
kernels, no materialised score matrix where the backend allows it). :class:`AttentionMixin` and
:class:`AttentionSlicingMixin` give a model diffusers' methods to list and swap the processors.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError
from .attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

# Old diffusers checkpoints (before the unified Attention class) name the spatial attention's
# projections query/key/value/proj_attn; they are the same Linear layers.
_LEGACY_ATTENTION_KEY = re.compile(r"(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map legacy spatial-attention keys (``...attentions.0.query.weight``) to the current names."""
    renamed = {}
    for key, value in state.items():
        match = _LEGACY_ATTENTION_KEY.fullmatch(key)
        if match:
            prefix, name, kind = match.groups()
            key = f"{prefix}.{_LEGACY_ATTENTION_NAMES[name]}.{kind}"
        renamed[key] = value
    return renamed


class GEGLU(nn.Module):
    """Gated GELU, ``x W_a * gelu(x W_b)`` with one fused projection (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward layer with a GEGLU of width ``mult * dim`` (``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the conditioning, feed-forward.

    ``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))`` (Vaswani et al. 2017;
    the conditioning mechanism of LDM, Rombach et al. 2022, sec. 3.3). Without ``cross_attention_dim`` the
    block has no cross-attention.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        attention_bias: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        heads = {"heads": num_attention_heads, "dim_head": attention_head_dim, "dropout": dropout,
                 "bias": attention_bias, "upcast_attention": upcast_attention}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, **heads)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **heads)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        if self.attn2 is not None:
            hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states,
                                       encoder_attention_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """Spatial transformer: run transformer blocks over the ``H*W`` positions of a feature map.

    ``GroupNorm -> proj_in -> blocks -> proj_out`` plus a residual connection (Rombach et al. 2022,
    sec. 3.3). ``proj_in``/``proj_out`` are 1x1 convolutions, or linear layers when
    ``use_linear_projection`` (the layout of later checkpoints); both are the same map and are applied
    as a matrix product on the token layout.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim,
                                  cross_attention_dim=cross_attention_dim, dropout=dropout,
                                  upcast_attention=upcast_attention)
            for _ in range(num_layers)
        ])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        # (B, C, H, W) -> (B, H*W, C): the one layout copy on the way in; the way out is a view that the
        # residual addition writes back in (B, C, H, W) order.
        tokens = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        tokens = F.linear(tokens, _as_matrix(self.proj_in.weight), self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states, encoder_attention_mask)
        tokens = F.linear(tokens, _as_matrix(self.proj_out.weight), self.proj_out.bias)
        return hidden_states + tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight ``(out, in, 1, 1)`` as the equivalent linear weight ``(out, in)`` (a view)."""
    return weight.flatten(1) if weight.ndim == 4 else weight


class AttentionMixin:
    """diffusers' attention API for a model made of :class:`Attention` layers. Processor names are the
    layers' module paths plus ``.processor`` (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor``),
    as diffusers names them."""

    def _attention_layers(self) -> dict[str, Attention]:
        return {name: module for name, module in self.named_modules() if isinstance(module, Attention)}

    @property
    def attn_processors(self) -> dict:
        return {f"{name}.processor": layer.get_processor() for name, layer in self._attention_layers().items()}

    def set_attn_processor(self, processor) -> None:
        """One processor for every layer, or a dict ``{name: processor}`` naming every layer once."""
        layers = self._attention_layers()
        if not isinstance(processor, dict):
            for layer in layers.values():
                layer.set_processor(processor)
            return
        expected = {f"{name}.processor" for name in layers}
        missing, unknown = sorted(expected - set(processor)), sorted(set(processor) - expected)
        if missing or unknown:
            raise LDMKitError(f"set_attn_processor: the dict must name each of the {len(expected)} attention "
                              f"layers once (keys as in model.attn_processors); missing {missing[:3]}, "
                              f"unknown {unknown[:3]}.")
        for name, layer in layers.items():
            layer.set_processor(processor[f"{name}.processor"])

    def set_default_attn_processor(self) -> None:
        """The written-out attention (:class:`AttnProcessor`) everywhere, as diffusers' method of this name."""
        self.set_attn_processor(AttnProcessor())

    def fuse_qkv_projections(self) -> None:
        """One Linear for q/k/v (self-attention) or k/v (cross-attention) in every layer, with
        :class:`FusedAttnProcessor2_0`; ``unfuse_qkv_projections`` restores the layers and processors."""
        if not any(layer.fused_projections for layer in self._attention_layers().values()):
            self._original_attn_processors = self.attn_processors
        for layer in self._attention_layers().values():
            layer.fuse_projections()
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        for layer in self._attention_layers().values():
            layer.unfuse_projections()
        original = self.__dict__.pop("_original_attn_processors", None)
        if original is not None:
            self.set_attn_processor(original)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """No xformers here: SDPA is memory-efficient attention already (its fused kernels never hold the
        score matrix). Sets :class:`AttnProcessor2_0` everywhere and warns, so scripts keep running."""
        warnings.warn(XFORMERS_MESSAGE, UserWarning, stacklevel=2)
        self.set_attn_processor(AttnProcessor2_0())

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_attn_processor(AttnProcessor2_0())


XFORMERS_MESSAGE = ("xformers is not used by ldmkit: attention already runs through torch's "
                    "scaled_dot_product_attention, whose fused kernels do what xformers' memory-efficient "
                    "attention does. The SDPA processor is now set on every attention layer; remove this call.")


class AttentionSlicingMixin:
    """``set_attention_slice`` (diffusers' method of its UNets): sliced attention in every layer."""

    def set_attention_slice(self, slice_size: str | int | list[int | None] | None = "auto") -> None:
        """``"auto"``: half of each layer's heads at a time (at least one: diffusers' "auto" gives a one-head
        layer a slice of 0 rows, which fails); ``"max"``: one (batch x head) row at a time; an
        int: that many rows in every layer; a list: one value per layer (in ``attn_processors`` order); None: off."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if slice_size == "auto":
            sizes = [max(1, layer.sliceable_head_dim // 2) for layer in layers]
        elif slice_size == "max":
            sizes = [1] * len(layers)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(layers):
                raise LDMKitError(f"set_attention_slice: {len(slice_size)} sizes for {len(layers)} attention "
                                  "layers; give one per layer, or one int for all.")
            sizes = slice_size
        elif slice_size is None or (isinstance(slice_size, int) and slice_size >= 1):
            sizes = [slice_size] * len(layers)
        else:
            raise LDMKitError(f"slice_size must be 'auto', 'max', a positive int, a list or None, got "
                              f"{slice_size!r}.")
        for layer, size in zip(layers, sizes):
            layer.set_attention_slice(size)
