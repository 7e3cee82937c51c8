"""The resolution levels of the UNets and of the autoencoder's encoder / decoder.

Every down block returns ``(hidden_states, skips)``, the tensors the matching up block concatenates back
(the U-Net skip connections, Ronneberger et al. 2015; the layout of DDPM / LDM, Ho et al. 2020, Rombach et
al. 2022). All down, up and mid blocks take the same keyword arguments, so the UNets call them uniformly;
blocks without cross-attention ignore ``encoder_hidden_states``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import LDMKitError
from .attention import Attention, Transformer2DModel
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _resnets(in_channels: int, out_channels: int, num_layers: int, temb_channels: int | None, eps: float,
             act_fn: str, groups: int, time_scale_shift: str, output_scale_factor: float, dropout: float,
             skip_channels: list[int] | None = None) -> nn.ModuleList:
    """``num_layers`` residual blocks; the first maps ``in_channels`` to ``out_channels``.

    ``skip_channels[i]`` is the width of the skip connection concatenated to the input of block ``i``
    (up blocks only).
    """
    blocks = []
    for i in range(num_layers):
        channels = in_channels if i == 0 else out_channels
        if skip_channels is not None:
            channels += skip_channels[i]
        blocks.append(ResnetBlock2D(
            in_channels=channels, out_channels=out_channels, temb_channels=temb_channels, groups=groups,
            eps=eps, act_fn=act_fn, time_embedding_norm=time_scale_shift,
            output_scale_factor=output_scale_factor, dropout=dropout))
    return nn.ModuleList(blocks)


def _spatial_attention(channels: int, head_dim: int, groups: int | None, eps: float,
                       output_scale_factor: float) -> Attention:
    """The single-block self-attention over all pixels used by UNet2DModel and the autoencoder."""
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_num_groups=groups, eps=eps, residual_connection=True,
                     rescale_output_factor=output_scale_factor)


def _per_layer(value: int | list[int], num_layers: int) -> list[int]:
    return [value] * num_layers if isinstance(value, int) else list(value)


def _up_skip_channels(in_channels: int, out_channels: int, num_layers: int) -> list[int]:
    """Skip widths of an up block; its last resnet gets the skip from the level below the matching one."""
    return [in_channels if i == num_layers - 1 else out_channels for i in range(num_layers)]


class DownBlock2D(nn.Module):
    """Residual blocks, then an optional stride-2 conv downsampler."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        skips = []
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class ResnetDownsampleBlock2D(nn.Module):
    """Residual blocks, then a residual block that halves the resolution by average pooling inside it.

    The ``resblock_updown`` levels of the ADM / LDM UNet (Dhariwal & Nichol 2021, sec. 3) without attention;
    diffusers' block of the same name and parameter names.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([ResnetBlock2D(
                in_channels=out_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor, dropout=dropout, down=True)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        skips = []
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            skips.append(hidden_states)
        return hidden_states, skips


class AttnDownBlock2D(nn.Module):
    """Residual blocks each followed by a spatial self-attention, then an optional downsampler.

    ``downsample_type`` "conv" is a stride-2 conv, "resnet" a residual block with average pooling.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1,
                 downsample_type: str = "conv", attention_head_dim: int | None = 1):
        super().__init__()
        head_dim = attention_head_dim or out_channels
        self.resnets = _resnets(in_channels, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.attentions = nn.ModuleList([
            _spatial_attention(out_channels, head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers)])
        self.downsamplers = None
        if add_downsample and downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])
        elif add_downsample and downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(
                in_channels=out_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor, dropout=dropout, down=True)])
        elif add_downsample:
            raise LDMKitError(f"downsample_type={downsample_type!r} is not supported; "
                              "use 'conv' or 'resnet'.")

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = attention(resnet(hidden_states, temb))
            skips.append(hidden_states)
        if self.downsamplers is not None:
            downsampler = self.downsamplers[0]
            if isinstance(downsampler, ResnetBlock2D):
                hidden_states = downsampler(hidden_states, temb)
            else:
                hidden_states = downsampler(hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class CrossAttnDownBlock2D(nn.Module):
    """Residual blocks each followed by a spatial transformer attending to the conditioning."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 transformer_layers_per_block: int | list[int] = 1, use_linear_projection: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        depths = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = _resnets(in_channels, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, out_channels,
                               num_layers=depths[i], norm_num_groups=resnet_groups,
                               cross_attention_dim=cross_attention_dim,
                               use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)
            for i in range(num_layers)])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class UpBlock2D(nn.Module):
    """Residual blocks over ``concat(hidden, skip)``, then an optional nearest-2x + conv upsampler."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True):
        super().__init__()
        self.resnets = _resnets(prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout, _up_skip_channels(in_channels, out_channels, num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states, skips, temb=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        """Consumes ``len(self.resnets)`` tensors from the end of the list ``skips``."""
        for resnet in self.resnets:
            hidden_states = resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class ResnetUpsampleBlock2D(nn.Module):
    """Residual blocks over ``concat(hidden, skip)``, then a residual block that doubles the resolution
    (nearest neighbour) inside it: the ``resblock_updown`` up levels of the ADM / LDM UNet without attention."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True):
        super().__init__()
        self.resnets = _resnets(prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout, _up_skip_channels(in_channels, out_channels, num_layers))
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([ResnetBlock2D(
                in_channels=out_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor, dropout=dropout, up=True)])

    def forward(self, hidden_states, skips, temb=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        for resnet in self.resnets:
            hidden_states = resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class AttnUpBlock2D(nn.Module):
    """Residual blocks over ``concat(hidden, skip)``, each followed by self-attention; then upsampling."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True,
                 upsample_type: str = "conv", attention_head_dim: int | None = 1):
        super().__init__()
        head_dim = attention_head_dim or out_channels
        self.resnets = _resnets(prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout, _up_skip_channels(in_channels, out_channels, num_layers))
        self.attentions = nn.ModuleList([
            _spatial_attention(out_channels, head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers)])
        self.upsamplers = None
        if add_upsample and upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])
        elif add_upsample and upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(
                in_channels=out_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor, dropout=dropout, up=True)])
        elif add_upsample:
            raise LDMKitError(f"upsample_type={upsample_type!r} is not supported; use 'conv' or 'resnet'.")

    def forward(self, hidden_states, skips, temb=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = attention(resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb))
        if self.upsamplers is not None:
            upsampler = self.upsamplers[0]
            if isinstance(upsampler, ResnetBlock2D):
                hidden_states = upsampler(hidden_states, temb)
            else:
                hidden_states = upsampler(hidden_states)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """Residual blocks over ``concat(hidden, skip)``, each followed by a spatial transformer; then
    upsampling."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 transformer_layers_per_block: int | list[int] = 1, use_linear_projection: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        depths = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = _resnets(prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout, _up_skip_channels(in_channels, out_channels, num_layers))
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, out_channels,
                               num_layers=depths[i], norm_num_groups=resnet_groups,
                               cross_attention_dim=cross_attention_dim,
                               use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states, skips, temb=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb)
            hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """``resnet -> (attention -> resnet) x num_layers`` at the lowest resolution; attention optional."""

    def __init__(self, in_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default",
                 output_scale_factor: float = 1.0, dropout: float = 0.0, add_attention: bool = True,
                 attention_head_dim: int | None = 1, attn_groups: int | None = None):
        super().__init__()
        if attn_groups is None:
            # As diffusers: the attention has a GroupNorm only with the plain additive time conditioning.
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        self.resnets = _resnets(in_channels, in_channels, num_layers + 1, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.attentions = None
        if add_attention:
            self.attentions = nn.ModuleList([
                _spatial_attention(in_channels, attention_head_dim or in_channels, attn_groups, resnet_eps,
                                   output_scale_factor)
                for _ in range(num_layers)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnet -> (spatial transformer -> resnet) x num_layers`` at the lowest resolution."""

    def __init__(self, in_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default",
                 output_scale_factor: float = 1.0, dropout: float = 0.0, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, transformer_layers_per_block: int | list[int] = 1,
                 use_linear_projection: bool = False, upcast_attention: bool = False):
        super().__init__()
        depths = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = _resnets(in_channels, in_channels, num_layers + 1, temb_channels, resnet_eps,
                                resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                                dropout)
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, in_channels // num_attention_heads, in_channels,
                               num_layers=depths[i], norm_num_groups=resnet_groups,
                               cross_attention_dim=cross_attention_dim,
                               use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)
            for i in range(num_layers)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class DownEncoderBlock2D(nn.Module):
    """Unconditioned residual blocks and a downsampler: one level of the autoencoder's encoder."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, None, resnet_eps, resnet_act_fn,
                                resnet_groups, "default", output_scale_factor, dropout)
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """Unconditioned residual blocks and an upsampler: one level of the autoencoder's decoder."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, None, resnet_eps, resnet_act_fn,
                                resnet_groups, "default", output_scale_factor, dropout)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


DOWN_BLOCKS = {
    "DownBlock2D": DownBlock2D,
    "ResnetDownsampleBlock2D": ResnetDownsampleBlock2D,
    "AttnDownBlock2D": AttnDownBlock2D,
    "CrossAttnDownBlock2D": CrossAttnDownBlock2D,
    "DownEncoderBlock2D": DownEncoderBlock2D,
}
UP_BLOCKS = {
    "UpBlock2D": UpBlock2D,
    "ResnetUpsampleBlock2D": ResnetUpsampleBlock2D,
    "AttnUpBlock2D": AttnUpBlock2D,
    "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
    "UpDecoderBlock2D": UpDecoderBlock2D,
}


def _build(kind: str, table: dict[str, type[nn.Module]], block_type: str, options: dict) -> nn.Module:
    # Very old diffusers configs spell the names with a "UNetRes" prefix (e.g. "UNetResDownBlock2D").
    name = block_type.removeprefix("UNetRes")
    if name not in table:
        raise LDMKitError(f"Unknown {kind} block type {block_type!r}; ldmkit supports {', '.join(table)}.")
    cls = table[name]
    # Each block takes the subset of the shared options that applies to it.
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted})


def get_down_block(block_type: str, **options) -> nn.Module:
    """Build the down block named ``block_type`` from the options that apply to it."""
    return _build("down", DOWN_BLOCKS, block_type, options)


def get_up_block(block_type: str, **options) -> nn.Module:
    """Build the up block named ``block_type`` from the options that apply to it."""
    return _build("up", UP_BLOCKS, block_type, options)


def check_spatial_input(model: str, tensor: torch.Tensor, channels: int, multiple: int,
                        name: str = "sample") -> None:
    """Raise a readable error for a tensor that is not ``(B, channels, H, W)`` with ``H, W`` multiples."""
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise LDMKitError(f"{model}: {name} must be a 4-D tensor (batch, channels, height, width), "
                          f"got {shape}.")
    if tensor.shape[1] != channels:
        raise LDMKitError(f"{model} expects {name} with {channels} channels, got {tensor.shape[1]} "
                          f"(shape {tuple(tensor.shape)}). Pass a (batch, {channels}, height, width) tensor.")
    height, width = tensor.shape[-2:]
    if height % multiple or width % multiple:
        raise LDMKitError(f"{model}: {name} height and width must be multiples of {multiple} (the model "
                          f"downsamples by {multiple}), got {height}x{width}. Resize or pad to a multiple of "
                          f"{multiple}.")
