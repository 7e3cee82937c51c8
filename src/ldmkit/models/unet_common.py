"""What the two denoising UNets (UNet2DModel, UNet2DConditionModel) share: the checks of their per-level
config, the stem that embeds the timestep, the output head and the pass through the levels.

The levels themselves are built by :func:`~.unet_2d_blocks.build_down_blocks` / ``build_up_blocks``.
Parameter names are diffusers' (``conv_in``, ``time_proj``, ``time_embedding``, ``class_embedding``,
``down_blocks``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LDMKitError
from .conv import Conv2d
from .embeddings import TimestepEmbedding, Timesteps, embed_time_and_class, lookup_table
from .resnet import get_activation


def count_levels(down_block_types, up_block_types, block_out_channels) -> int:
    """The number of resolution levels, after checking that the three per-level lists agree on it."""
    num_blocks = len(down_block_types)
    if len(up_block_types) != num_blocks or len(block_out_channels) != num_blocks:
        raise LDMKitError(f"down_block_types ({len(down_block_types)}), up_block_types "
                          f"({len(up_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                          "must have the same length.")
    return num_blocks


def per_block(value, num_blocks: int, name: str) -> list:
    """A config value given once for all blocks or once per block, as a per-block list."""
    if isinstance(value, list | tuple):
        if len(value) != num_blocks:
            raise LDMKitError(f"{name} has {len(value)} entries but the UNet has {num_blocks} down blocks; "
                              "give one value or one per block.")
        return list(value)
    return [value] * num_blocks


def block_options(config: Mapping, temb_channels: int) -> dict:
    """The options every level of a UNet takes from its config (the residual blocks' norm, activation,
    time conditioning and dropout)."""
    return {"temb_channels": temb_channels, "resnet_eps": config["norm_eps"], "resnet_act_fn": config["act_fn"],
            "resnet_groups": config["norm_num_groups"], "resnet_time_scale_shift": config["resnet_time_scale_shift"],
            "dropout": config["dropout"]}


def build_stem(unet: nn.Module, in_channels: int, channels: int, flip_sin_to_cos: bool, freq_shift: int,
               time_embedding_dim: int | None, num_class_embeds: int | None, act_fn: str = "silu") -> int:
    """Give ``unet`` its input conv, the sinusoidal timestep embedding and its MLP (DDPM, Ho et al. 2020,
    appendix B) and, with ``num_class_embeds``, a class embedding added to it. Returns the embedding width
    (``4 * channels`` unless ``time_embedding_dim``)."""
    time_embed_dim = time_embedding_dim or channels * 4
    unet.conv_in = Conv2d(in_channels, channels, kernel_size=3, padding=1)
    unet.time_proj = Timesteps(channels, flip_sin_to_cos, freq_shift)
    unet.time_embedding = TimestepEmbedding(channels, time_embed_dim, act_fn)
    unet.class_embedding = lookup_table(num_class_embeds, time_embed_dim) if num_class_embeds else None
    return time_embed_dim


def build_head(unet: nn.Module, channels: int, out_channels: int, norm_num_groups: int, norm_eps: float,
               act_fn: str = "silu") -> None:
    """Give ``unet`` its output head: ``GroupNorm -> activation -> 3x3 conv`` to ``out_channels``."""
    unet.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
    unet.conv_act = get_activation(act_fn)
    unet.conv_out = Conv2d(channels, out_channels, kernel_size=3, padding=1)


def denoise(unet: nn.Module, sample: torch.Tensor, timestep, class_labels, *context) -> torch.Tensor:
    """The UNet's output for a checked ``sample``: stem, down levels (collecting the skips), mid block, up
    levels (consuming them), head. ``context`` (the conditioning and its mask) goes to every level."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = embed_time_and_class(unet, timestep, class_labels, sample.shape[0], sample)
    hidden_states = unet.conv_in(sample)
    skips = [hidden_states]
    for block in unet.down_blocks:
        hidden_states, block_skips = block(hidden_states, emb, *context)
        skips.extend(block_skips)
    if unet.mid_block is not None:
        hidden_states = unet.mid_block(hidden_states, emb, *context)
    for block in unet.up_blocks:
        hidden_states = block(hidden_states, skips, emb, *context)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden_states)))
