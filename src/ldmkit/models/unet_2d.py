"""The unconditional / concat-conditioned denoising UNet (LDM super-resolution and unconditional models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LDMKitError
from ..outputs import BaseOutput
from .attention import AttentionMixin, AttentionSlicingMixin, rename_legacy_attention_keys
from .modeling_utils import ModelMixin
from .unet_2d_blocks import UNetMidBlock2D, build_down_blocks, build_up_blocks, check_spatial_input
from .unet_common import block_options, build_head, build_stem, count_levels, denoise, per_block


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor


class UNet2DModel(ModelMixin, AttentionMixin, AttentionSlicingMixin):
    """The DDPM UNet (Ho et al. 2020, appendix B) with self-attention at chosen levels.

    Used by LDM for unconditional latent generation and, with the low-resolution image concatenated to
    the latent as extra input channels, for super-resolution (Rombach et al. 2022, sec. 4.4). Here
    ``attention_head_dim`` is the size of one attention head (``None``: one head per block); ldmkit also
    accepts one value per block (the mid block uses the last), which original CompVis UNets with a fixed
    head count and growing widths need (diffusers takes only one value).
    Config fields and parameter names are those of diffusers' ``UNet2DModel``.
    """

    _supports_gradient_checkpointing = True
    _feature_cache = None  # set by pipe.enable_feature_cache()
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
        **inert_features,
    ):
        super().__init__()
        self.register_config(locals())
        num_blocks = count_levels(down_block_types, up_block_types, block_out_channels)
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise LDMKitError(f"mid_block_type={mid_block_type!r} is not supported; "
                              "use 'UNetMidBlock2D' or None.")
        self._downsample_factor = 2 ** (num_blocks - 1)
        head_dims = per_block(attention_head_dim, num_blocks, "attention_head_dim")  # None: one head per block

        time_embed_dim = build_stem(self, in_channels, block_out_channels[0], flip_sin_to_cos, freq_shift,
                                    time_embedding_dim, num_class_embeds)
        shared = block_options(self.config, time_embed_dim)
        self.down_blocks = build_down_blocks(
            down_block_types, block_out_channels, {"attention_head_dim": head_dims}, num_layers=layers_per_block,
            downsample_padding=downsample_padding, downsample_type=downsample_type, **shared)
        self.mid_block = None if mid_block_type is None else UNetMidBlock2D(
            block_out_channels[-1], output_scale_factor=mid_block_scale_factor, add_attention=add_attention,
            attention_head_dim=head_dims[-1], attn_groups=attn_norm_num_groups, **shared)
        self.up_blocks = build_up_blocks(
            up_block_types, block_out_channels, {"attention_head_dim": head_dims[::-1]},
            num_layers=layers_per_block + 1, upsample_type=upsample_type, **shared)
        # diffusers' UNet2DModel: the time MLP and the output activation are SiLU whatever act_fn says.
        build_head(self, block_out_channels[0], out_channels, norm_num_groups, norm_eps)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights", **cast) -> None:
        super().load_weights(rename_legacy_attention_keys(state), source=source, **cast)

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
        # A feature cache (pipelines/feature_cache.py, DeepCache) may run only the shallow levels.
        run = self._feature_cache.forward if self._feature_cache is not None else denoise
        hidden_states = run(self, sample, timestep, class_labels)
        return UNet2DOutput(sample=hidden_states) if return_dict else (hidden_states,)
