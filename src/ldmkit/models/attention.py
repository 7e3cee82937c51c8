"""Attention blocks: multi-head (cross-)attention, the transformer block and the spatial transformer.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, no
materialised score matrix where the backend allows it).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017).

    Two uses:
    - token attention on ``(B, L, C)`` inputs, self- or cross-attention when ``encoder_hidden_states`` is
      given (the transformer blocks of the LDM UNet, Rombach et al. 2022, sec. 3.3);
    - the "spatial" attention block of the autoencoder / UNet2DModel on ``(B, C, H, W)`` inputs, with its
      own ``group_norm``, a residual connection and ``rescale_output_factor``.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
        context_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        # A ModuleList so that the keys are "to_out.0.*" as in diffusers checkpoints.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` is an additive bias broadcastable to ``(B, heads, L_q, L_kv)``."""
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            height, width = hidden_states.shape[-2:]
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            # (B, C, H, W) -> (B, H*W, C) as a view (contiguous for channels-last input).
            hidden_states = hidden_states.flatten(2).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self._split_heads(self.to_q(hidden_states))
        key = self._split_heads(self.to_k(context))
        value = self._split_heads(self.to_v(context))

        dtype = query.dtype
        if self.upcast_attention and dtype in (torch.float16, torch.bfloat16):
            # The softmax of large half-precision scores overflows; compute the attention in float32.
            query, key, value = query.float(), key.float(), value.float()
            if attention_mask is not None:
                attention_mask = attention_mask.float()
        elif attention_mask is not None:
            attention_mask = attention_mask.to(dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        batch, _, length, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.heads * head_dim).to(dtype)
        out = self.to_out[1](self.to_out[0](out))

        if spatial:
            # Back to (B, C, H, W) as a strided view; the residual addition writes the NCHW result.
            out = out.transpose(1, 2).unflatten(2, (height, width))
            out = residual + out if self.residual_connection else out.contiguous()
        elif self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, L, heads * d) -> (B, heads, L, d)`` as a view."""
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, self.heads, -1).transpose(1, 2)


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
