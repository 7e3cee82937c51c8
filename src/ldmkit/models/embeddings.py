"""Timestep embeddings: the sinusoidal encoding of the diffusion step and the MLP that follows it."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LDMKitError
from .resnet import get_activation


def lookup_table(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, embedding_dim)``, without its random init when it is built on the meta
    device to be loaded: ``normal_`` has no meta kernel, and its Python fallback imports ``torch._dynamo``,
    1.5 s of every load of a model with an embedding. Elsewhere it is ``nn.Embedding`` as it is (same init,
    same random stream)."""
    weight = torch.empty(num_embeddings, embedding_dim)  # on the meta device inside ``torch.device("meta")``
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight if weight.is_meta else None)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``(N,) -> (N, dim)``.

    The Transformer position encoding (Vaswani et al. 2017, sec. 3.5) applied to the diffusion step, as in
    DDPM (Ho et al. 2020, appendix B): frequencies ``max_period ** (-i / (half - downscale_freq_shift))``.
    ``flip_sin_to_cos`` puts the cosines first (the order of the original LDM code, Rombach et al. 2022).
    """
    half = dim // 2
    # Computed in float32 whatever the model dtype: large timesteps lose too much precision in half.
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * freqs[None, :] * scale
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free module wrapper of :func:`timestep_embedding` (diffusers' ``time_proj``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                  self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding, ``linear_1 -> act -> linear_2`` (DDPM's ``temb`` layers)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


def broadcast_to_batch(values, batch_size: int, device: torch.device, name: str = "timestep") -> torch.Tensor:
    """A python number, 0-d or 1-d tensor as a ``(batch_size,)`` tensor on ``device`` (one value repeats)."""
    tensor = torch.as_tensor(values, device=device).reshape(-1)
    if tensor.numel() not in (1, batch_size):
        raise LDMKitError(f"{name} must be a number or hold 1 or batch-size ({batch_size}) values, "
                          f"got {tensor.numel()} values.")
    return tensor.expand(batch_size)


def embed_time_and_class(unet: nn.Module, timestep, class_labels, batch_size: int,
                         sample: torch.Tensor) -> torch.Tensor:
    """A UNet's conditioning vector: ``time_embedding(sinusoid(t))``, plus ``class_embedding(y)`` if any.

    ``unet`` provides ``time_proj``, ``time_embedding`` and ``class_embedding`` (None without classes).
    """
    timesteps = broadcast_to_batch(timestep, batch_size, sample.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(sample.dtype))
    if unet.class_embedding is not None:
        if class_labels is None:
            raise LDMKitError(f"This {type(unet).__name__} is class-conditional (num_class_embeds is set): "
                              "pass class_labels.")
        labels = broadcast_to_batch(class_labels, batch_size, sample.device, "class_labels")
        emb = emb + unet.class_embedding(labels).to(emb.dtype)
    elif class_labels is not None:
        raise LDMKitError(f"class_labels were given but this {type(unet).__name__} has no class embedding "
                          "(num_class_embeds).")
    return emb
