"""The conditional denoising UNet of latent diffusion (text-to-image, class-conditional)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LDMKitError
from .embeddings import TimestepEmbedding, Timesteps, embed_time_and_class
from .modeling_utils import ModelMixin
from .resnet import get_activation
from .unet_2d_blocks import UNetMidBlock2DCrossAttn, check_spatial_input, get_down_block, get_up_block


@dataclass
class UNet2DConditionOutput:
    sample: torch.Tensor


def per_block(value, num_blocks: int, name: str) -> list:
    """A config value given once for all blocks or once per block, as a per-block list."""
    if isinstance(value, list | tuple):
        if len(value) != num_blocks:
            raise LDMKitError(f"{name} has {len(value)} entries but the UNet has {num_blocks} down blocks; "
                              "give one value or one per block.")
        return list(value)
    return [value] * num_blocks


class UNet2DConditionModel(ModelMixin):
    """The LDM denoiser ``eps_theta(z_t, t, tau(y))`` (Rombach et al. 2022, eq. 3).

    A UNet of residual blocks (DDPM, Ho et al. 2020) whose levels carry spatial transformers that
    cross-attend to the conditioning ``encoder_hidden_states`` (sec. 3.3); the timestep enters every
    residual block through a sinusoidal embedding. Config fields and parameter names are those of
    diffusers' ``UNet2DConditionModel``. ``attention_head_dim`` is, as in diffusers, the number of heads
    of the cross-attention blocks (a historical misnomer) unless ``num_attention_heads`` is given.
    """

    _inert_config_keys = {
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": False,
        "mid_block_only_cross_attention": None,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "projection_class_embeddings_input_dim": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "addition_embed_type_num_heads": 64,
        "time_embedding_type": "positional",
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "cross_attention_norm": None,
    }

    def __init__(
        self,
        sample_size: int | list[int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: list[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D"),
        up_block_types: list[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D"),
        block_out_channels: list[int] = (320, 640, 1280, 1280),
        layers_per_block: int | list[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | list[int] = 1280,
        transformer_layers_per_block: int | list = 1,
        reverse_transformer_layers_per_block: list | None = None,
        attention_head_dim: int | list[int] = 8,
        num_attention_heads: int | list[int] | None = None,
        use_linear_projection: bool = False,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        time_embedding_dim: int | None = None,
    ):
        super().__init__()
        self.register_config(locals())
        num_blocks = len(down_block_types)
        if len(up_block_types) != num_blocks or len(block_out_channels) != num_blocks:
            raise LDMKitError(f"down_block_types ({len(down_block_types)}), up_block_types "
                              f"({len(up_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                              "must have the same length.")
        if norm_num_groups is None:
            raise LDMKitError("norm_num_groups=None (no output normalisation) is not supported by ldmkit.")
        heads = per_block(num_attention_heads or attention_head_dim, num_blocks, "num_attention_heads")
        head_dims = per_block(attention_head_dim, num_blocks, "attention_head_dim")
        cross_dims = per_block(cross_attention_dim, num_blocks, "cross_attention_dim")
        layers = per_block(layers_per_block, num_blocks, "layers_per_block")
        depths = per_block(transformer_layers_per_block, num_blocks, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None:
            if any(isinstance(depth, list | tuple) for depth in depths):
                raise LDMKitError("Per-layer transformer_layers_per_block needs "
                                  "reverse_transformer_layers_per_block for the up blocks (they have one "
                                  "layer more).")
            reverse_depths = depths[::-1]
        else:
            reverse_depths = per_block(reverse_transformer_layers_per_block, num_blocks,
                                       "reverse_transformer_layers_per_block")
        self._cross_attention_dims = set(cross_dims)
        self._downsample_factor = 2 ** (num_blocks - 1)

        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn)
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None

        shared = {"temb_channels": time_embed_dim, "resnet_eps": norm_eps, "resnet_act_fn": act_fn,
                  "resnet_groups": norm_num_groups, "resnet_time_scale_shift": resnet_time_scale_shift,
                  "dropout": dropout, "use_linear_projection": use_linear_projection,
                  "upcast_attention": upcast_attention}
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, in_channels=in_ch, out_channels=out_ch, num_layers=layers[i],
                add_downsample=i < num_blocks - 1, downsample_padding=downsample_padding,
                num_attention_heads=heads[i], attention_head_dim=head_dims[i] or out_ch,
                cross_attention_dim=cross_dims[i], transformer_layers_per_block=depths[i], **shared))

        self.mid_block = UNetMidBlock2DCrossAttn(
            block_out_channels[-1], output_scale_factor=mid_block_scale_factor, num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1], transformer_layers_per_block=depths[-1], **shared)

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            skip_ch = reversed_channels[min(i + 1, num_blocks - 1)]
            self.up_blocks.append(get_up_block(
                block_type, in_channels=skip_ch, prev_output_channel=prev_ch, out_channels=out_ch,
                num_layers=layers[::-1][i] + 1, add_upsample=i < num_blocks - 1,
                num_attention_heads=heads[::-1][i], attention_head_dim=head_dims[::-1][i] or out_ch,
                cross_attention_dim=cross_dims[::-1][i], transformer_layers_per_block=reverse_depths[i],
                **shared))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the noise (or v / x0, as trained) for ``sample`` at ``timestep``.

        sample: ``(B, in_channels, H, W)`` with H, W multiples of ``2 ** (len(down_block_types) - 1)``.
        timestep: a number, or a 0-d / 1-d tensor (broadcast to the batch).
        encoder_hidden_states: ``(B, L, cross_attention_dim)`` conditioning tokens.
        class_labels: ``(B,)`` class indices, for models built with ``num_class_embeds``.
        encoder_attention_mask: optional ``(B, L)``, 1 for tokens to attend to and 0 for padding.
        """
        self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask)
        batch = sample.shape[0]
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = embed_time_and_class(self, timestep, class_labels, batch, sample)

        mask_bias = None
        if encoder_attention_mask is not None:
            # 1 = keep, 0 = drop, as an additive bias on the attention scores, broadcast over heads / queries.
            mask_bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        hidden_states = self.conv_in(sample)
        skips = [hidden_states]
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb, encoder_hidden_states, mask_bias)
            skips.extend(block_skips)
        hidden_states = self.mid_block(hidden_states, emb, encoder_hidden_states, mask_bias)
        for block in self.up_blocks:
            hidden_states = block(hidden_states, skips, emb, encoder_hidden_states, mask_bias)
        hidden_states = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))
        return UNet2DConditionOutput(sample=hidden_states) if return_dict else (hidden_states,)

    def _check_inputs(self, sample, encoder_hidden_states, encoder_attention_mask) -> None:
        name = type(self).__name__
        check_spatial_input(name, sample, self.config.in_channels, self._downsample_factor)
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3:
            got = getattr(encoder_hidden_states, "shape", type(encoder_hidden_states).__name__)
            raise LDMKitError(f"{name}: encoder_hidden_states must be a (batch, tokens, features) tensor, "
                              f"got {tuple(got) if isinstance(got, torch.Size) else got}.")
        width = encoder_hidden_states.shape[-1]
        if self._cross_attention_dims != {width}:
            expected = " / ".join(str(d) for d in sorted(self._cross_attention_dims))
            raise LDMKitError(f"{name}: encoder_hidden_states have {width} features, the model's "
                              f"cross_attention_dim is {expected}. Use the text encoder this UNet was "
                              "trained with (its hidden size must equal cross_attention_dim).")
        if encoder_hidden_states.shape[0] != sample.shape[0]:
            raise LDMKitError(f"{name}: encoder_hidden_states batch size {encoder_hidden_states.shape[0]} != "
                              f"sample batch size {sample.shape[0]}; repeat the conditioning per sample.")
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != tuple(
                encoder_hidden_states.shape[:2]):
            raise LDMKitError(f"{name}: encoder_attention_mask must have shape (batch, tokens) = "
                              f"{tuple(encoder_hidden_states.shape[:2])}, got "
                              f"{tuple(encoder_attention_mask.shape)}.")
