"""The unconditional / concat-conditioned denoising UNet (LDM super-resolution and unconditional models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LDMKitError
from .attention import rename_legacy_attention_keys
from .embeddings import TimestepEmbedding, Timesteps, embed_time_and_class
from .modeling_utils import ModelMixin
from .unet_2d_blocks import UNetMidBlock2D, check_spatial_input, get_down_block, get_up_block


@dataclass
class UNet2DOutput:
    sample: torch.Tensor


class UNet2DModel(ModelMixin):
    """The DDPM UNet (Ho et al. 2020, appendix B) with self-attention at chosen levels.

    Used by LDM for unconditional latent generation and, with the low-resolution image concatenated to
    the latent as extra input channels, for super-resolution (Rombach et al. 2022, sec. 4.4). Here
    ``attention_head_dim`` is the size of one attention head (``None``: one head per block); ldmkit also
    accepts one value per block (the mid block uses the last), which original CompVis UNets with a fixed
    head count and growing widths need (diffusers takes only one value).
    Config fields and parameter names are those of diffusers' ``UNet2DModel``.
    """

    _inert_config_keys = {"time_embedding_type": "positional", "class_embed_type": None}

    def __init__(
        self,
        sample_size: int | list[int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: list[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                       "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: list[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: list[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | list[int | None] | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,  # only used by diffusers' "learned" time embedding
    ):
        super().__init__()
        self.register_config(locals())
        num_blocks = len(down_block_types)
        if len(up_block_types) != num_blocks or len(block_out_channels) != num_blocks:
            raise LDMKitError(f"down_block_types ({len(down_block_types)}), up_block_types "
                              f"({len(up_block_types)}) and block_out_channels ({len(block_out_channels)}) "
                              "must have the same length.")
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise LDMKitError(f"mid_block_type={mid_block_type!r} is not supported; "
                              "use 'UNetMidBlock2D' or None.")
        self._downsample_factor = 2 ** (num_blocks - 1)
        if isinstance(attention_head_dim, list | tuple):
            if len(attention_head_dim) != num_blocks:
                raise LDMKitError(f"attention_head_dim has {len(attention_head_dim)} entries but the UNet has "
                                  f"{num_blocks} down blocks; give one value or one per block.")
            head_dims = list(attention_head_dim)
        else:
            head_dims = [attention_head_dim] * num_blocks

        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None

        shared = {"temb_channels": time_embed_dim, "resnet_eps": norm_eps, "resnet_act_fn": act_fn,
                  "resnet_groups": norm_num_groups, "resnet_time_scale_shift": resnet_time_scale_shift,
                  "dropout": dropout, "num_layers": layers_per_block}
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, in_channels=in_ch, out_channels=out_ch, add_downsample=i < num_blocks - 1,
                downsample_padding=downsample_padding, downsample_type=downsample_type,
                attention_head_dim=head_dims[i] or out_ch, **shared))

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                block_out_channels[-1], time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift,
                output_scale_factor=mid_block_scale_factor, dropout=dropout, add_attention=add_attention,
                attention_head_dim=head_dims[-1] or block_out_channels[-1],
                attn_groups=attn_norm_num_groups)

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        out_ch = reversed_channels[0]
        shared["num_layers"] = layers_per_block + 1
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            skip_ch = reversed_channels[min(i + 1, num_blocks - 1)]
            self.up_blocks.append(get_up_block(
                block_type, in_channels=skip_ch, prev_output_channel=prev_ch, out_channels=out_ch,
                add_upsample=i < num_blocks - 1, upsample_type=upsample_type,
                attention_head_dim=head_dims[::-1][i] or out_ch, **shared))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        super().load_weights(rename_legacy_attention_keys(state), source=source)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict the noise for ``sample`` ``(B, in_channels, H, W)`` at ``timestep`` (number or tensor).

        For super-resolution the caller concatenates the low-resolution image to the latent along the
        channels, so ``in_channels`` counts both.
        """
        check_spatial_input(type(self).__name__, sample, self.config.in_channels, self._downsample_factor)
        batch = sample.shape[0]
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = embed_time_and_class(self, timestep, class_labels, batch, sample)

        hidden_states = self.conv_in(sample)
        skips = [hidden_states]
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            hidden_states = self.mid_block(hidden_states, emb)
        for block in self.up_blocks:
            hidden_states = block(hidden_states, skips, emb)
        hidden_states = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))
        return UNet2DOutput(sample=hidden_states) if return_dict else (hidden_states,)
