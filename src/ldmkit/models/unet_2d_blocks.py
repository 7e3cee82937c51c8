"""The resolution levels of the UNets and of the autoencoder's encoder / decoder.

Every down block returns ``(hidden_states, skips)``, the tensors the matching up block concatenates back
(the U-Net skip connections, Ronneberger et al. 2015; the layout of DDPM / LDM, Ho et al. 2020, Rombach et
al. 2022). All down, up and mid blocks take the same keyword arguments, so the UNets call them uniformly;
blocks without cross-attention ignore ``encoder_hidden_states``.

The blocks differ only in what they are built of (their names, arguments and parameter names are
diffusers'); one pass per kind runs them: :class:`_DownLevel`, :class:`_UpLevel` and :class:`_MidLevel`.
:func:`build_down_blocks` / :func:`build_up_blocks` build the levels of a UNet, encoder or decoder from its
config. The passes run each resnet and attention through ``run_part``, so that gradient checkpointing
(:mod:`.checkpointing`) can recompute them in the backward pass instead of keeping their activations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LDMKitError
from .attention import Attention, Transformer2DModel
from .checkpointing import Checkpointed
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class _ResnetOptions:
    """The options a block passes to each of its residual blocks (diffusers' ``resnet_*`` arguments)."""

    temb_channels: int | None
    eps: float
    act_fn: str
    groups: int
    time_scale_shift: str
    output_scale_factor: float
    dropout: float

    def block(self, in_channels: int, out_channels: int, **resample: bool) -> ResnetBlock2D:
        return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=self.temb_channels,
                             groups=self.groups, eps=self.eps, act_fn=self.act_fn,
                             time_embedding_norm=self.time_scale_shift,
                             output_scale_factor=self.output_scale_factor, dropout=self.dropout, **resample)

    def stack(self, in_channels: int, out_channels: int, num_layers: int,
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
            blocks.append(self.block(channels, out_channels))
        return nn.ModuleList(blocks)


def _up_skip_channels(in_channels: int, out_channels: int, num_layers: int) -> list[int]:
    """Skip widths of an up block; its last resnet gets the skip from the level below the matching one."""
    return [in_channels if i == num_layers - 1 else out_channels for i in range(num_layers)]


def _resampler(direction: str, kind: str | None, channels: int, resnet: _ResnetOptions,
               padding: int = 1) -> nn.ModuleList | None:
    """A level's 2x ``direction`` ("down" / "up") resampler; ``kind`` None: the level has none.

    "conv" is a stride-2 conv (down) or nearest-2x + conv (up); "resnet" a residual block that average-pools
    (down) or repeats pixels (up) inside it, the ``resblock_updown`` of ADM / LDM (Dhariwal & Nichol 2021,
    sec. 3).
    """
    if kind is None:
        return None
    if kind == "resnet":
        return nn.ModuleList([resnet.block(channels, channels, **{direction: True})])
    if kind == "conv":
        return nn.ModuleList([Downsample2D(channels, padding=padding) if direction == "down" else Upsample2D(channels)])
    raise LDMKitError(f"{direction}sample_type={kind!r} is not supported; use 'conv' or 'resnet'.")


def _resample(resampler: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    # A residual resampler is time-conditioned like the other residual blocks.
    if isinstance(resampler, ResnetBlock2D):
        return resampler(hidden_states, temb)
    return resampler(hidden_states)


def _spatial_attentions(channels: int, head_dim: int | None, num_layers: int, groups: int | None, eps: float,
                        output_scale_factor: float) -> nn.ModuleList:
    """Single-block self-attentions over all pixels (UNet2DModel, the autoencoder); ``head_dim`` None: one
    head over all channels."""
    head_dim = head_dim or channels
    return nn.ModuleList([
        Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True, norm_num_groups=groups,
                  eps=eps, residual_connection=True, rescale_output_factor=output_scale_factor)
        for _ in range(num_layers)])


def _transformers(channels: int, num_layers: int, num_heads: int, depth: int | list[int], groups: int,
                  cross_attention_dim: int, use_linear_projection: bool, upcast_attention: bool) -> nn.ModuleList:
    """One spatial transformer per layer; ``depth`` transformer blocks each (one value, or one per layer)."""
    depths = [depth] * num_layers if isinstance(depth, int) else list(depth)
    return nn.ModuleList([
        Transformer2DModel(num_heads, channels // num_heads, channels, num_layers=depths[i], norm_num_groups=groups,
                           cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
                           upcast_attention=upcast_attention)
        for i in range(num_layers)])


def _attend(level: Checkpointed, attention: nn.Module, hidden_states, encoder_hidden_states,
            encoder_attention_mask) -> torch.Tensor:
    # A spatial transformer cross-attends to the conditioning; spatial self-attention ignores it.
    if isinstance(attention, Transformer2DModel):
        return level.run_part(attention, hidden_states, encoder_hidden_states, encoder_attention_mask)
    return level.run_part(attention, hidden_states)


class _DownLevel(Checkpointed, nn.Module):
    """The pass of a down block: per layer a resnet (then its attention, if any), then the downsampler;
    every output is a skip. Subclasses choose the parts (their arguments are diffusers' block arguments)."""

    def __init__(self, resnets: nn.ModuleList, attentions: nn.ModuleList | None,
                 downsamplers: nn.ModuleList | None):
        super().__init__()
        self.resnets, self.attentions, self.downsamplers = resnets, attentions, downsamplers

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = self.run_part(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = _attend(self, self.attentions[i], hidden_states, encoder_hidden_states,
                                        encoder_attention_mask)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = _resample(self.downsamplers[0], hidden_states, temb)
            skips.append(hidden_states)
        return hidden_states, skips


class _UpLevel(Checkpointed, nn.Module):
    """The pass of an up block: per layer a resnet over ``concat(hidden, skip)`` (then its attention, if
    any), then the upsampler. Subclasses choose the parts (their arguments are diffusers' block arguments)."""

    def __init__(self, resnets: nn.ModuleList, attentions: nn.ModuleList | None,
                 upsamplers: nn.ModuleList | None):
        super().__init__()
        self.resnets, self.attentions, self.upsamplers = resnets, attentions, upsamplers

    def forward(self, hidden_states, skips, temb=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        """Consumes ``len(self.resnets)`` tensors from the end of the list ``skips`` (None: no skips)."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
            hidden_states = self.run_part(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = _attend(self, self.attentions[i], hidden_states, encoder_hidden_states,
                                        encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = _resample(self.upsamplers[0], hidden_states, temb)
        return hidden_states


class _MidLevel(Checkpointed, nn.Module):
    """The pass of a mid block: ``resnet -> (attention -> resnet) x num_layers``; attention optional."""

    def __init__(self, resnets: nn.ModuleList, attentions: nn.ModuleList | None):
        super().__init__()
        self.resnets, self.attentions = resnets, attentions

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, encoder_attention_mask=None):
        hidden_states = self.run_part(self.resnets[0], hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = _attend(self, self.attentions[i], hidden_states, encoder_hidden_states,
                                        encoder_attention_mask)
            hidden_states = self.run_part(resnet, hidden_states, temb)
        return hidden_states


class DownBlock2D(_DownLevel):
    """Residual blocks, then an optional stride-2 conv downsampler."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers), None,
                         _resampler("down", "conv" if add_downsample else None, out_channels, resnet,
                                    downsample_padding))


class ResnetDownsampleBlock2D(_DownLevel):
    """Residual blocks, then a residual block that halves the resolution by average pooling inside it.

    The ``resblock_updown`` levels of the ADM / LDM UNet (Dhariwal & Nichol 2021, sec. 3) without attention;
    diffusers' block of the same name and parameter names.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers), None,
                         _resampler("down", "resnet" if add_downsample else None, out_channels, resnet))


class AttnDownBlock2D(_DownLevel):
    """Residual blocks each followed by a spatial self-attention, then an optional downsampler.

    ``downsample_type`` "conv" is a stride-2 conv, "resnet" a residual block with average pooling.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1,
                 downsample_type: str = "conv", attention_head_dim: int | None = 1):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers),
                         _spatial_attentions(out_channels, attention_head_dim, num_layers, resnet_groups,
                                             resnet_eps, output_scale_factor),
                         _resampler("down", downsample_type if add_downsample else None, out_channels, resnet,
                                    downsample_padding))


class CrossAttnDownBlock2D(_DownLevel):
    """Residual blocks each followed by a spatial transformer attending to the conditioning."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 transformer_layers_per_block: int | list[int] = 1, use_linear_projection: bool = False,
                 upcast_attention: bool = False):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers),
                         _transformers(out_channels, num_layers, num_attention_heads, transformer_layers_per_block,
                                       resnet_groups, cross_attention_dim, use_linear_projection, upcast_attention),
                         _resampler("down", "conv" if add_downsample else None, out_channels, resnet,
                                    downsample_padding))


class UpBlock2D(_UpLevel):
    """Residual blocks over ``concat(hidden, skip)``, then an optional nearest-2x + conv upsampler."""

    _upsample_type = "conv"

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(prev_output_channel, out_channels, num_layers,
                                      _up_skip_channels(in_channels, out_channels, num_layers)), None,
                         _resampler("up", self._upsample_type if add_upsample else None, out_channels, resnet))


class ResnetUpsampleBlock2D(UpBlock2D):
    """Residual blocks over ``concat(hidden, skip)``, then a residual block that doubles the resolution
    (nearest neighbour) inside it: the ``resblock_updown`` up levels of the ADM / LDM UNet without attention."""

    _upsample_type = "resnet"


class AttnUpBlock2D(_UpLevel):
    """Residual blocks over ``concat(hidden, skip)``, each followed by self-attention; then upsampling."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int | None, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default", output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True,
                 upsample_type: str = "conv", attention_head_dim: int | None = 1):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(prev_output_channel, out_channels, num_layers,
                                      _up_skip_channels(in_channels, out_channels, num_layers)),
                         _spatial_attentions(out_channels, attention_head_dim, num_layers, resnet_groups,
                                             resnet_eps, output_scale_factor),
                         _resampler("up", upsample_type if add_upsample else None, out_channels, resnet))


class CrossAttnUpBlock2D(_UpLevel):
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
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(prev_output_channel, out_channels, num_layers,
                                      _up_skip_channels(in_channels, out_channels, num_layers)),
                         _transformers(out_channels, num_layers, num_attention_heads, transformer_layers_per_block,
                                       resnet_groups, cross_attention_dim, use_linear_projection, upcast_attention),
                         _resampler("up", "conv" if add_upsample else None, out_channels, resnet))


class UNetMidBlock2D(_MidLevel):
    """``resnet -> (attention -> resnet) x num_layers`` at the lowest resolution; attention optional."""

    def __init__(self, in_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default",
                 output_scale_factor: float = 1.0, dropout: float = 0.0, add_attention: bool = True,
                 attention_head_dim: int | None = 1, attn_groups: int | None = None):
        if attn_groups is None:
            # As diffusers: the attention has a GroupNorm only with the plain additive time conditioning.
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        resnets = resnet.stack(in_channels, in_channels, num_layers + 1)
        super().__init__(resnets, _spatial_attentions(in_channels, attention_head_dim, num_layers, attn_groups,
                                                      resnet_eps, output_scale_factor) if add_attention else None)


class UNetMidBlock2DCrossAttn(_MidLevel):
    """``resnet -> (spatial transformer -> resnet) x num_layers`` at the lowest resolution."""

    def __init__(self, in_channels: int, temb_channels: int | None, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "silu", resnet_groups: int = 32,
                 resnet_time_scale_shift: str = "default",
                 output_scale_factor: float = 1.0, dropout: float = 0.0, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, transformer_layers_per_block: int | list[int] = 1,
                 use_linear_projection: bool = False, upcast_attention: bool = False):
        resnet = _ResnetOptions(temb_channels, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                                output_scale_factor, dropout)
        super().__init__(resnet.stack(in_channels, in_channels, num_layers + 1),
                         _transformers(in_channels, num_layers, num_attention_heads, transformer_layers_per_block,
                                       resnet_groups, cross_attention_dim, use_linear_projection, upcast_attention))


class DownEncoderBlock2D(_DownLevel):
    """Unconditioned residual blocks and a downsampler: one level of the autoencoder's encoder."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1):
        resnet = _ResnetOptions(None, resnet_eps, resnet_act_fn, resnet_groups, "default", output_scale_factor,
                                dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers), None,
                         _resampler("down", "conv" if add_downsample else None, out_channels, resnet,
                                    downsample_padding))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states)[0]


class UpDecoderBlock2D(_UpLevel):
    """Unconditioned residual blocks and an upsampler: one level of the autoencoder's decoder."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "silu", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 dropout: float = 0.0, add_upsample: bool = True):
        resnet = _ResnetOptions(None, resnet_eps, resnet_act_fn, resnet_groups, "default", output_scale_factor,
                                dropout)
        super().__init__(resnet.stack(in_channels, out_channels, num_layers), None,
                         _resampler("up", "conv" if add_upsample else None, out_channels, resnet))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, None)


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


def build_down_blocks(block_types: list[str], block_out_channels: list[int],
                      per_level: dict[str, list] | None = None, **options) -> nn.ModuleList:
    """The down levels of a UNet or encoder from its config: level ``i`` maps the previous level's width
    (the stem's, ``block_out_channels[0]``, for the first) to ``block_out_channels[i]``, and all but the
    last halve the resolution. ``per_level[name][i]`` is level ``i``'s ``name``; ``options`` go to every
    level (each block takes those that apply to it)."""
    blocks = nn.ModuleList()
    last = len(block_out_channels) - 1
    out_ch = block_out_channels[0]
    for i, block_type in enumerate(block_types):
        in_ch, out_ch = out_ch, block_out_channels[i]
        level = {name: values[i] for name, values in (per_level or {}).items()}
        blocks.append(get_down_block(block_type, in_channels=in_ch, out_channels=out_ch, add_downsample=i < last,
                                     **level, **options))
    return blocks


def build_up_blocks(block_types: list[str], block_out_channels: list[int], per_level: dict[str, list] | None = None,
                    skip_connections: bool = True, **options) -> nn.ModuleList:
    """The up levels, from the lowest resolution: level ``i`` maps to ``block_out_channels[-1 - i]`` and all
    but the last double the resolution. ``per_level`` lists are in the up levels' order.

    With ``skip_connections`` (a UNet) a level's ``in_channels`` is the width of the skips it concatenates
    last (the input width of the matching down level); without (the autoencoder's decoder) it is the
    previous level's output width.
    """
    blocks = nn.ModuleList()
    reversed_channels = list(reversed(block_out_channels))
    last = len(block_out_channels) - 1
    out_ch = reversed_channels[0]
    for i, block_type in enumerate(block_types):
        prev_ch, out_ch = out_ch, reversed_channels[i]
        in_ch = reversed_channels[min(i + 1, last)] if skip_connections else prev_ch
        level = {name: values[i] for name, values in (per_level or {}).items()}
        blocks.append(get_up_block(block_type, in_channels=in_ch, prev_output_channel=prev_ch, out_channels=out_ch,
                                   add_upsample=i < last, **level, **options))
    return blocks


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
