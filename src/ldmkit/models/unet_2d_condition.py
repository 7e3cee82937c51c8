"""The conditional denoising UNet of latent diffusion (text-to-image, class-conditional)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import LDMKitError
from ..outputs import BaseOutput
from .attention import AttentionMixin, AttentionSlicingMixin
from .modeling_utils import ModelMixin
from .unet_2d_blocks import UNetMidBlock2DCrossAttn, build_down_blocks, build_up_blocks, check_spatial_input
from .unet_common import block_options, build_head, build_stem, count_levels, denoise, per_block


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor


def _level_options(config: Mapping, num_blocks: int) -> tuple[dict[str, list], dict[str, list]]:
    """The options that vary per level, for the down levels and for the up levels.

    The up levels take the down levels' in reverse, with one resnet more each; their transformer depths are
    the down levels' reversed unless ``reverse_transformer_layers_per_block`` gives them (it must when the
    depths are per layer, as the up levels have one layer more).
    """
    down = {
        "num_attention_heads": per_block(config["num_attention_heads"] or config["attention_head_dim"], num_blocks,
                                         "num_attention_heads"),
        "attention_head_dim": per_block(config["attention_head_dim"], num_blocks, "attention_head_dim"),
        "cross_attention_dim": per_block(config["cross_attention_dim"], num_blocks, "cross_attention_dim"),
        "num_layers": per_block(config["layers_per_block"], num_blocks, "layers_per_block"),
        "transformer_layers_per_block": per_block(config["transformer_layers_per_block"], num_blocks,
                                                  "transformer_layers_per_block"),
    }
    up = {name: values[::-1] for name, values in down.items()}
    up["num_layers"] = [layers + 1 for layers in up["num_layers"]]
    if config["reverse_transformer_layers_per_block"] is not None:
        up["transformer_layers_per_block"] = per_block(config["reverse_transformer_layers_per_block"], num_blocks,
                                                       "reverse_transformer_layers_per_block")
    elif any(isinstance(depth, list | tuple) for depth in down["transformer_layers_per_block"]):
        raise LDMKitError("Per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block for "
                          "the up blocks (they have one layer more).")
    return down, up


class UNet2DConditionModel(ModelMixin, AttentionMixin, AttentionSlicingMixin):
    """The LDM denoiser ``eps_theta(z_t, t, tau(y))`` (Rombach et al. 2022, eq. 3).

    A UNet of residual blocks (DDPM, Ho et al. 2020) whose levels carry spatial transformers that
    cross-attend to the conditioning ``encoder_hidden_states`` (sec. 3.3); the timestep enters every
    residual block through a sinusoidal embedding. Config fields and parameter names are those of
    diffusers' ``UNet2DConditionModel``. ``attention_head_dim`` is, as in diffusers, the number of heads
    of the cross-attention blocks (a historical misnomer) unless ``num_attention_heads`` is given.
    """

    _supports_gradient_checkpointing = True
    _feature_cache = None  # set by pipe.enable_feature_cache()
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
        **inert_features,
    ):
        super().__init__()
        self.register_config(locals())
        num_blocks = count_levels(down_block_types, up_block_types, block_out_channels)
        if norm_num_groups is None:
            raise LDMKitError("norm_num_groups=None (no output normalisation) is not supported by ldmkit.")
        levels, up_levels = _level_options(self.config, num_blocks)
        self._cross_attention_dims = set(levels["cross_attention_dim"])
        self._downsample_factor = 2 ** (num_blocks - 1)

        time_embed_dim = build_stem(self, in_channels, block_out_channels[0], flip_sin_to_cos, freq_shift,
                                    time_embedding_dim, num_class_embeds, act_fn)
        shared = {**block_options(self.config, time_embed_dim), "use_linear_projection": use_linear_projection,
                  "upcast_attention": upcast_attention}
        self.down_blocks = build_down_blocks(down_block_types, block_out_channels, levels,
                                             downsample_padding=downsample_padding, **shared)
        self.mid_block = UNetMidBlock2DCrossAttn(
            block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
            num_attention_heads=levels["num_attention_heads"][-1],
            cross_attention_dim=levels["cross_attention_dim"][-1],
            transformer_layers_per_block=levels["transformer_layers_per_block"][-1], **shared)
        self.up_blocks = build_up_blocks(up_block_types, block_out_channels, up_levels, **shared)
        build_head(self, block_out_channels[0], out_channels, norm_num_groups, norm_eps, act_fn)

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
        mask_bias = None
        if encoder_attention_mask is not None:
            # 1 = keep, 0 = drop, as an additive bias on the attention scores, broadcast over heads / queries.
            mask_bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        # A feature cache (pipelines/feature_cache.py, DeepCache) may run only the shallow levels.
        run = self._feature_cache.forward if self._feature_cache is not None else denoise
        hidden_states = run(self, sample, timestep, class_labels, encoder_hidden_states, mask_bias)
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
