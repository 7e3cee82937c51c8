"""Multi-head attention and its processors (diffusers' ``attention_processor`` module and names).

An :class:`Attention` layer owns the projections; its *processor* computes ``softmax(q k^T / sqrt(d)) v``
(Vaswani et al. 2017, eq. 1) from them. Swapping processors changes how, never what (the outputs agree to
float rounding):

- :class:`AttnProcessor2_0` (the default): ``torch.nn.functional.scaled_dot_product_attention``, whose fused
  kernels never materialise the ``L_q x L_kv`` score matrix where the backend has them;
- :class:`AttnProcessor`: the scores written out (``bmm`` or ``baddbmm``, softmax, ``bmm``), diffusers' "default"
  processor of ``set_default_attn_processor``;
- :class:`SlicedAttnProcessor`: SDPA on ``slice_size`` (batch x head) rows at a time, so that even SDPA's
  math kernel holds at most ``slice_size * L_q * L_kv`` scores at once (``enable_attention_slicing``);
- :class:`FusedAttnProcessor2_0`: SDPA after ``fuse_projections`` (one Linear for q, k and v).

A processor is any callable ``(attn, hidden_states, encoder_hidden_states=None, attention_mask=None)``;
the layer offers diffusers' helpers (``head_to_batch_dim``, ``get_attention_scores``,
``prepare_attention_mask``, ...) so processors written for diffusers run unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError


class _Processor:
    """Shared frame: tokens in, q/k/v by head, ``attend``, heads merged, output projection, tokens out."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        tokens, size = attn.tokens_in(hidden_states)
        query, key, value = attn.heads_qkv(tokens, encoder_hidden_states)
        dtype = query.dtype
        out = self.attend(attn, query, key, value, attention_mask)
        batch, _, length, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, length, attn.heads * head_dim).to(dtype)
        return attn.tokens_out(attn.to_out[1](attn.to_out[0](out)), residual, size)

    def attend(self, attn: Attention, query, key, value, mask) -> torch.Tensor:
        """``(B, heads, L_q, d)`` attention output from ``(B, heads, L, d)`` q, k, v and an additive mask."""
        raise NotImplementedError


class AttnProcessor2_0(_Processor):
    """Attention through ``F.scaled_dot_product_attention`` (fused kernels where the backend has them)."""

    def attend(self, attn, query, key, value, mask):
        return _sdpa(attn, query, key, value, mask)


class FusedAttnProcessor2_0(AttnProcessor2_0):
    """SDPA on fused projections (``to_qkv`` for self-attention, ``to_kv`` for cross-attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if not attn.fused_projections:
            raise LDMKitError("FusedAttnProcessor2_0 needs fused projections: call the model's "
                              "fuse_qkv_projections() (or attn.fuse_projections()) first.")
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


class AttnProcessor(_Processor):
    """The attention written out: ``softmax(scale * q k^T + mask) v`` with the score matrix in memory."""

    def attend(self, attn, query, key, value, mask):
        batch, heads, length, head_dim = query.shape
        query, key, value = (t.reshape(batch * heads, -1, head_dim) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, _rows(mask, batch, heads, key.shape[1]))
        return torch.bmm(probs, value).view(batch, heads, length, head_dim)


class SlicedAttnProcessor(_Processor):
    """Attention over ``slice_size`` of the ``batch * heads`` rows at a time (diffusers' slicing).

    Each slice goes through SDPA, so where SDPA falls back to its math kernel (which materialises the
    scores) at most ``slice_size * L_q * L_kv`` scores exist at once instead of ``B * heads * L_q * L_kv``,
    and where SDPA has a fused kernel slicing costs no memory (diffusers' sliced processor writes the
    scores out and so uses more memory than SDPA's fused kernels; the outputs agree to rounding).
    """

    def __init__(self, slice_size: int):
        if not isinstance(slice_size, int) or slice_size < 1:
            raise LDMKitError(f"slice_size must be a positive int, got {slice_size!r}.")
        self.slice_size = slice_size

    def attend(self, attn, query, key, value, mask):
        batch, heads, length, head_dim = query.shape
        query, key, value = (t.reshape(batch * heads, -1, head_dim) for t in (query, key, value))
        mask = _rows(mask, batch, heads, key.shape[1])
        parts = []
        for start in range(0, batch * heads, self.slice_size):
            rows = slice(start, start + self.slice_size)
            parts.append(_sdpa(attn, query[rows], key[rows], value[rows], None if mask is None else mask[rows]))
        return torch.cat(parts).view(batch, heads, length, head_dim)


def _sdpa(attn: Attention, query, key, value, mask) -> torch.Tensor:
    if attn.upcast_attention and query.dtype in (torch.float16, torch.bfloat16):
        # The softmax of large half-precision scores overflows; compute the attention in float32.
        query, key, value = query.float(), key.float(), value.float()
        mask = None if mask is None else mask.float()
    elif mask is not None:
        mask = mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def _rows(mask: torch.Tensor | None, batch: int, heads: int, kv_length: int) -> torch.Tensor | None:
    """An additive mask broadcastable to ``(B, heads, L_q, L_kv)`` as ``(B * heads, L_q or 1, L_kv)``."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return mask.expand(batch, heads, mask.shape[2], kv_length).reshape(batch * heads, -1, kv_length)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017).

    Two uses:
    - token attention on ``(B, L, C)`` inputs, self- or cross-attention when ``encoder_hidden_states`` is
      given (the transformer blocks of the LDM UNet, Rombach et al. 2022, sec. 3.3);
    - the "spatial" attention block of the autoencoder / UNet2DModel on ``(B, C, H, W)`` inputs, with its
      own ``group_norm``, a residual connection and ``rescale_output_factor``.
    The computation is the processor's (module docstring); the default is :class:`AttnProcessor2_0`.
    """

    # diffusers' processors read these; this layer has none of the features they switch on.
    spatial_norm = norm_cross = norm_q = norm_k = None
    upcast_softmax = False

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, bias: bool = False, out_bias: bool = True, upcast_attention: bool = False,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, processor=None):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = self.sliceable_head_dim = heads
        self.scale = dim_head**-0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.fused_projections = False
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
        self.set_processor(processor if processor is not None else AttnProcessor2_0())

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``attention_mask`` is an additive bias broadcastable to ``(B, heads, L_q, L_kv)``."""
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    # ----------------------------------------------------------------- processors
    def set_processor(self, processor) -> None:
        if not callable(processor):
            raise LDMKitError(f"An attention processor must be callable, got {type(processor).__name__}.")
        # A processor that is a Module (trainable) is a submodule; replacing it by a plain one drops it.
        if isinstance(getattr(self, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
            del self._modules["processor"]
        self.processor = processor

    def get_processor(self):
        return self.processor

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Sliced attention over ``slice_size`` (batch x head) rows, or the default processor for None."""
        if slice_size is not None and slice_size > self.sliceable_head_dim:
            raise LDMKitError(f"slice_size {slice_size} is larger than this layer's {self.sliceable_head_dim} "
                              "heads; use at most that many (or 'max' for 1).")
        self.set_processor(AttnProcessor2_0() if slice_size is None else SlicedAttnProcessor(slice_size))

    # ----------------------------------------------------------------- the steps processors share
    def tokens_in(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """``(B, L, C)`` tokens and the spatial size to restore (None for token input); group norm first."""
        if hidden_states.ndim != 4:
            return hidden_states, None
        size = tuple(hidden_states.shape[-2:])
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        # (B, C, H, W) -> (B, H*W, C) as a view (contiguous for channels-last input).
        return hidden_states.flatten(2).transpose(1, 2), size

    def heads_qkv(self, tokens: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """Query, key and value as ``(B, heads, L, d)`` views, through the fused projection when there is one."""
        context = tokens if encoder_hidden_states is None else encoder_hidden_states
        fused = self._modules if self.fused_projections else {}
        if encoder_hidden_states is None and "to_qkv" in fused:
            query, key, value = self.to_qkv(tokens).chunk(3, dim=-1)
        elif encoder_hidden_states is not None and "to_kv" in fused:
            query = self.to_q(tokens)
            key, value = self.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = self.to_q(tokens), self.to_k(context), self.to_v(context)
        return self._split_heads(query), self._split_heads(key), self._split_heads(value)

    def tokens_out(self, out: torch.Tensor, residual: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """Back to the input layout, residual connection and output rescaling."""
        if size is not None:
            # Back to (B, C, H, W) as a strided view; the residual addition writes the NCHW result.
            out = out.transpose(1, 2).unflatten(2, size)
            out = residual + out if self.residual_connection else out.contiguous()
        elif self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, L, heads * d) -> (B, heads, L, d)`` as a view."""
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, self.heads, -1).transpose(1, 2)

    # ----------------------------------------------------------------- diffusers' helpers for processors
    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """``(B, L, heads * d)`` -> ``(B * heads, L, d)`` (``out_dim=3``) or ``(B, heads, L, d)``."""
        tensor = self._split_heads(tensor)
        return tensor.reshape(-1, *tensor.shape[2:]) if out_dim == 3 else tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B * heads, L, d)`` -> ``(B, L, heads * d)``."""
        rows, length, head_dim = tensor.shape
        return tensor.view(rows // self.heads, self.heads, length, head_dim).transpose(1, 2).reshape(
            rows // self.heads, length, self.heads * head_dim)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """``softmax(scale * q k^T + mask)`` for ``(rows, L, d)`` q and k, in the query's dtype (computed in
        float32 when ``upcast_attention``)."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            scores = torch.bmm(query, key.transpose(1, 2)).mul_(self.scale)
        else:
            scores = torch.baddbmm(attention_mask.to(query.dtype), query, key.transpose(1, 2), alpha=self.scale)
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(self, attention_mask, target_length: int, batch_size: int, out_dim: int = 3):
        """A mask of ``(B, L_kv)``, ``(B, 1 or L_q, L_kv)`` or this layer's ``(B, 1, 1 or L_q, L_kv)`` per
        head: ``(B * heads, 1 or L_q, L_kv)`` (``out_dim=3``) or ``(B, heads, 1 or L_q, L_kv)``."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            raise LDMKitError(f"The attention mask covers {attention_mask.shape[-1]} keys, the keys are "
                              f"{target_length}.")
        mask = attention_mask
        if mask.ndim == 4 and mask.shape[1] == self.heads:  # already one mask per head
            return mask.flatten(0, 1) if out_dim == 3 else mask
        mask = mask[:, None] if mask.ndim == 2 else mask[:, 0] if mask.ndim == 4 else mask
        if out_dim == 3:
            return mask.repeat_interleave(self.heads, dim=0) if mask.shape[0] < batch_size * self.heads else mask
        return mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)

    # ----------------------------------------------------------------- fused projections
    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """One Linear for q, k, v (``to_qkv``, self-attention) or k, v (``to_kv``, cross-attention), as
        diffusers: the separate projections stay (their state_dict keys too) and the fused one is added."""
        if not fuse:
            self.unfuse_projections()
            return
        if self.fused_projections:
            return
        name, parts = ("to_kv", (self.to_k, self.to_v)) if self.is_cross_attention else \
            ("to_qkv", (self.to_q, self.to_k, self.to_v))
        weight = torch.cat([p.weight for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                          device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        setattr(self, name, fused)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        """Back to the separate projections: the fused weights are copied back (nothing trained while fused
        is lost) and the fused layer is removed, so the state_dict keys are the original ones."""
        for name, parts in (("to_qkv", (self.to_q, self.to_k, self.to_v)), ("to_kv", (self.to_k, self.to_v))):
            fused = self._modules.pop(name, None)
            if fused is None:
                continue
            for part, weight in zip(parts, fused.weight.chunk(len(parts))):
                part.weight.copy_(weight)
            if fused.bias is not None:
                for part, bias in zip(parts, fused.bias.chunk(len(parts))):
                    part.bias.copy_(bias)
        self.fused_projections = False
